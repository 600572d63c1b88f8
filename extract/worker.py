"""Decode images inside DataLoader workers, never letting one bad file stop the run.

Each item comes back as (record index, pixels or None, reason); the collate keeps failures beside
the batch instead of raising, so the caller can count, report, or (with --strict) stop.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from medembed.extract.access import DataAccess, OutsideDataFolder
from medembed.extract.imaging import (
    CorruptStream,
    DecodeOptions,
    DecompressionBomb,
    NotAnImage,
    UndecodableImage,
    image_size,
    open_image,
)
from medembed.extract.imaging.dicom import DamagedDicom
from medembed.extract.path_key import PathKeyError
from medembed.extract.records import Record


def describe_failure(location: str, exc: BaseException) -> str:
    if isinstance(exc, (OutsideDataFolder, PathKeyError)):
        return str(exc)
    if image_size(location) < 0:
        return "missing file"
    if image_size(location) == 0:
        return "zero-byte file"
    return describe_error(exc)


def describe_error(exc: BaseException) -> str:
    """Why image bytes could not be decoded, in a few words."""
    if isinstance(exc, UndecodableImage) and exc.__cause__ is not None:
        exc = exc.__cause__  # the decoder's own error, classified by its type and message below
    if isinstance(exc, (OutsideDataFolder, PathKeyError)):
        return str(exc)  # already the reason, in a line
    if isinstance(exc, (DecompressionBomb, Image.DecompressionBombError)):
        return f"decompression bomb ({exc})"
    if isinstance(exc, (NotAnImage, DamagedDicom, CorruptStream)):
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
    access: DataAccess | None = None  # the data folder's rule every image is read under
    private: bool = False  # the paths may identify patients: no reason names one

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            img = open_image(rec.image, self.decode, access=self.access)
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
            why = describe_failure(rec.image, e)
            return i, None, None, redact(why, rec.image) if self.private else why


def redact(reason: str, location: str) -> str:
    """A failure's reason with the image's path, resolved path and member name taken out (an OS or
    archive error quotes them), for datasets whose paths may identify patients."""
    path, _, member = location.partition("::")
    for name in sorted({location, path, member, os.path.realpath(path)} - {""}, key=len, reverse=True):
        reason = reason.replace(name, "<image>")
    return reason


def collate_items(items):
    """(indices_ok, pixels [B,3,H,W] | None, views [B,V,3,H,W] | None, failures [(index, reason)])."""
    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3]) for it in items if it[1] is None]
    idx = [it[0] for it in ok]
    pixels = torch.stack([it[1] for it in ok]) if ok else None
    views = torch.stack([it[2] for it in ok]) if ok and ok[0][2] is not None else None
    return idx, pixels, views, failures
