"""Decode images inside DataLoader workers, never letting one bad file stop the run.

Each item comes back as (record index, pixels or None, reason); the collate keeps failures beside
the batch instead of raising, so the caller can count, report, or (with --strict) stop.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from medembed.extract.imaging import DecodeOptions, DecompressionBomb, NotAnImage, image_size, open_image
from medembed.extract.records import Record


def describe_failure(location: str, exc: BaseException) -> str:
    if image_size(location) < 0:
        return "missing file"
    if image_size(location) == 0:
        return "zero-byte file"
    return describe_error(exc)


def describe_error(exc: BaseException) -> str:
    """Why image bytes could not be decoded, in a few words."""
    if isinstance(exc, (DecompressionBomb, Image.DecompressionBombError)):
        return f"decompression bomb ({exc})"
    if isinstance(exc, NotAnImage):
        return str(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "truncated" in msg.lower() or "less than expected" in msg:
        return f"truncated image ({msg.split(' - ')[0]})"
    if "Unable to decode" in msg or "plugin" in msg.lower():
        hint = "; 12-bit JPEG Extended needs pip install 'medembed[jpeg12]'" if "12-bit" in str(exc) and \
            "pylibjpeg" not in str(exc) else ""
        return f"undecodable pixel data ({_decoder_reasons(exc)}{hint})"
    if "cannot identify image file" in msg:
        return "not an image (unrecognised format)"
    return f"unreadable image ({type(exc).__name__}: {msg})"


def _decoder_reasons(exc: BaseException) -> str:
    """pydicom lists one line per decoder plug-in that refused the data; the last is the most specific."""
    lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return "; ".join(lines[:3]) if lines else str(exc).splitlines()[0]


@dataclass
class ImageItems(TorchDataset):
    records: list[Record]
    preprocess: Callable
    augment: Callable | None = None
    views: int = 0
    seed: int = 0
    first: int = 0  # the split's row of records[0] (a shard or part starts inside its split)
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            img = open_image(rec.image, self.decode)
            pixels = self.preprocess(img)
            view_px = None
            if self.views:
                # seeded per record by its row in the split: the same views whichever worker, batch, resume,
                # shard or part computes them
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 1_000_003 + self.first + i)
                    view_px = torch.stack([self.augment(img) for _ in range(self.views)])
            return i, pixels, view_px, ""
        except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
            return i, None, None, describe_failure(rec.image, e)


def collate_items(items):
    """(indices_ok, pixels [B,3,H,W] | None, views [B,V,3,H,W] | None, failures [(index, reason)])."""
    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3]) for it in items if it[1] is None]
    idx = [it[0] for it in ok]
    pixels = torch.stack([it[1] for it in ok]) if ok else None
    views = torch.stack([it[2] for it in ok]) if ok and ok[0][2] is not None else None
    return idx, pixels, views, failures
