"""Join the per-shard files of a sharded extraction into one file per split.

Shards are contiguous blocks of a split's records, so joining them in shard order restores the
dataset order. A shard counts only when its file carries a completion marker; a missing or
unfinished shard stops the merge with its name, never leaving a gap of silent zeros.

By default the join copies no feature: the split file's features are HDF5 virtual datasets over
the shard files (`writer.write_joined`), so joining a 10M-image extraction writes only its ids,
captions and labels, and every phase reads the shards through it. `copy=True` writes a
self-contained file instead (the shard files can then be deleted).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from medembed.cache import schema
from medembed.cache.provenance import ProvenanceMismatch, differences
from medembed.cache.reader import CachedSplit, load_split, open_cache, read_attrs
from medembed.cache.writer import write_joined, write_split
from medembed.common.errors import MedembedError
from medembed.common.files import atomic_write


class MergeError(MedembedError, RuntimeError):
    pass


def marker_path(shard_file: Path) -> Path:
    return shard_file.with_suffix(".done")


def write_done_marker(shard_file: str | Path, *, n_images: int, n_captions: int, shard: str) -> None:
    shard_file = Path(shard_file)
    marker = json.dumps({"file": shard_file.name, "shard": shard, "n_images": n_images, "n_captions": n_captions})
    atomic_write(marker_path(shard_file), lambda tmp: tmp.write_text(marker))


def _scan(folder: Path) -> dict[str, dict]:
    found: dict[str, dict] = defaultdict(lambda: {"n": set(), "files": {}, "partial": set(), "markers": set()})
    for p in folder.iterdir():
        m = schema.SHARD_RE.match(p.name)
        if not m:
            continue
        g = found[m["split"]]
        i, n = int(m["i"]), int(m["n"])
        g["n"].add(n)
        if m["ext"] == "h5":
            g["files"][i] = p
        elif m["ext"] == "parts":
            g["partial"].add(i)
        else:
            g["markers"].add(i)
    return found


def merge_shards(folder: str | Path, copy: bool = False, splits: list[str] | None = None) -> list[Path]:
    """Join every split found as shards in `folder` (or those of `splits`; features left in the shards,
    or copied with `copy`); returns the split files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder")
    groups = {k: v for k, v in _scan(folder).items() if splits is None or k in splits}
    if not groups:
        raise MergeError(f"{folder}: no shard files ({schema.SHARD_NAMING}) to merge")
    merged = []
    for split, g in sorted(groups.items()):
        if len(g["n"]) != 1:
            raise MergeError(f"{folder}: split {split} has shards of different counts N={sorted(g['n'])}")
        n = g["n"].pop()
        complete = {i for i in g["files"] if i in g["markers"]}
        missing = [i for i in range(n) if i not in complete]
        if missing:
            why = [f"shard {i}/{n} " + ("is still being written" if i in g["partial"] else
                                          "has no completion marker" if i in g["files"] else "is missing")
                   for i in missing]
            raise MergeError(f"{folder}: cannot merge split {split}: " + "; ".join(why))
        merged.append(_merge_split(folder, split, [g["files"][i] for i in range(n)], copy))
    return merged


def concat_splits(parts: list[CachedSplit]) -> CachedSplit:
    """Consecutive blocks of one split (shards, in order) as one split: rows appended, caption rows
    and concept rows re-based, the shared vocabulary and prompt features taken from the first."""
    first = parts[0]
    offsets = np.cumsum([0] + [p.n_images for p in parts[:-1]])
    labels = sp.vstack([p.concepts for p in parts], format="csr") if first.concepts is not None else None
    views = [p.view_features for p in parts]
    return replace(
        first,
        image_ids=[i for p in parts for i in p.image_ids],
        image_locations=[loc for p in parts for loc in p.image_locations],
        image_features=torch.cat([p.image_features for p in parts]),
        view_features=torch.cat(views) if views[0] is not None else None,
        captions=[c for p in parts for c in p.captions],
        caption_image=torch.cat([p.caption_image + int(o) for p, o in zip(parts, offsets)]),
        caption_features=torch.cat([p.caption_features for p in parts]),
        concepts=labels,
        skipped=[x for p in parts for x in p.skipped],
    )


def _check_contiguous(split: str, files: list[Path], attrs: list[dict]) -> None:
    """Shards must tile the split: each starts where the one before it ended (shards extracted with
    different --batch-size values would overlap or leave a gap). Files written before shards
    recorded their rows are taken as they are."""
    if not all(schema.SHARD_ROWS in a for a in attrs):
        return
    at = 0
    for f, a in zip(files, attrs):
        lo, hi = (int(x) for x in str(a[schema.SHARD_ROWS]).split(":"))
        if lo != at:
            raise MergeError(f"{f}: cannot merge split {split}: this shard starts at record {lo}, the shards before it "
                             f"end at {at} (were the shards extracted with different --batch-size values?)")
        at = hi
    if at != int(attrs[-1].get(schema.SPLIT_RECORDS, at)):
        raise MergeError(f"{files[-1]}: cannot merge split {split}: the shards end at record {at} of "
                         f"{attrs[-1][schema.SPLIT_RECORDS]}")


def _merge_split(folder: Path, split: str, files: list[Path], copy: bool = False) -> Path:
    attrs = [read_attrs(f) for f in files]
    first = attrs[0]
    for f, a in zip(files[1:], attrs[1:]):
        diffs = [d for d in differences(first, a) if not d.startswith(f"{schema.SHARD}:")]
        if diffs:
            raise ProvenanceMismatch(f, diffs)
    _check_contiguous(split, files, attrs)
    final = folder / schema.split_file(split)
    wanted = {**first, schema.SHARD: ""}
    if final.exists():
        existing = read_attrs(final)
        diffs = differences(existing, wanted)
        if diffs:
            raise ProvenanceMismatch(final, diffs)
        if not (copy and existing.get(schema.FEATURES_IN_SHARDS)):
            return final  # already joined as asked (a copy, or read from the shards and no copy asked)
        # --copy over a file that reads the shards: rewritten self-contained (write_split swaps it in whole)
    joined = {k: v for k, v in first.items() if k not in (schema.SHARD_ROWS, schema.SPLIT_RECORDS)}
    joined.update({schema.SHARD: "", schema.MERGED_FROM_SHARDS: len(files),
                   schema.N_RECORDS: sum(int(a[schema.N_RECORDS]) for a in attrs)})
    if not copy:
        return write_joined(final, files, joined)
    parts = [load_split(p, dtype=None) for p in files]  # stored dtype: no float32 copy of the shards
    merged = concat_splits(parts)
    merged.attrs = joined
    with open_cache(files[0]) as f:
        feature_attrs = {"images": dict(f[schema.IMAGE_FEATURES].attrs), "captions": dict(f[schema.CAPTION_FEATURES].attrs)}
    write_split(final, merged, dtype=str(first.get(schema.DTYPE, "float16")), feature_attrs=feature_attrs)
    return final
