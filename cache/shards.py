"""Join the per-shard files of a sharded extraction into one file per split.

Shards are contiguous blocks of a split's records, so joining them in shard order restores the
dataset order. A shard counts only when its file carries a completion marker; a missing or
unfinished shard stops the merge with its name, never leaving a gap of silent zeros.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from medembed.cache.provenance import ProvenanceMismatch, differences
from medembed.cache.reader import read_attrs
from medembed.cache.writer import write_split

SHARD_RE = re.compile(r"^(?P<split>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>h5|parts|done)$")


class MergeError(RuntimeError):
    pass


def marker_path(shard_file: Path) -> Path:
    return shard_file.with_suffix(".done")


def write_done_marker(shard_file: str | Path, *, n_images: int, n_captions: int, shard: str) -> None:
    shard_file = Path(shard_file)
    tmp = shard_file.with_suffix(f".done.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"file": shard_file.name, "shard": shard, "n_images": n_images, "n_captions": n_captions}))
    os.replace(tmp, marker_path(shard_file))


def _scan(folder: Path) -> dict[str, dict]:
    found: dict[str, dict] = defaultdict(lambda: {"n": set(), "files": {}, "partial": set(), "markers": set()})
    for p in folder.iterdir():
        m = SHARD_RE.match(p.name)
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


def _strings(ds) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


def merge_shards(folder: str | Path) -> list[Path]:
    """Merge every split found as shards in `folder`; returns the merged files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder")
    groups = _scan(folder)
    if not groups:
        raise MergeError(f"{folder}: no shard files (SPLIT.shard-I-of-N.h5) to merge")
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
        merged.append(_merge_split(folder, split, [g["files"][i] for i in range(n)]))
    return merged


def _merge_split(folder: Path, split: str, files: list[Path]) -> Path:
    first = read_attrs(files[0])
    for f in files[1:]:
        diffs = [d for d in differences(first, read_attrs(f)) if not d.startswith("shard:")]
        if diffs:
            raise ProvenanceMismatch(f, diffs)
    final = folder / f"{split}.h5"
    wanted = {**first, "shard": ""}
    if final.exists():
        diffs = differences(read_attrs(final), wanted)
        if diffs:
            raise ProvenanceMismatch(final, diffs)
        return final
    cols: dict[str, list] = defaultdict(list)
    img_off = 0
    nnz_off = 0
    for path in files:
        with h5py.File(path, "r") as f:
            n_img = f["images/ids"].shape[0]
            cols["ids"] += _strings(f["images/ids"])
            cols["locations"] += _strings(f["images/locations"])
            cols["features"].append(f["images/features"][()])
            if "images/view_features" in f:
                cols["views"].append(f["images/view_features"][()])
            cols["captions"] += _strings(f["captions/text"])
            cols["caption_image"].append(f["captions/image_row"][()] + img_off)
            cols["caption_features"].append(f["captions/features"][()])
            indptr = f["concepts/indptr"][()]
            cols["indptr"].append((indptr[1:] if cols["indptr"] else indptr) + nnz_off)
            cols["indices"].append(f["concepts/indices"][()])
            nnz_off += int(indptr[-1])
            cols["skipped"] += list(zip(_strings(f["skipped/ids"]), _strings(f["skipped/locations"]),
                                        _strings(f["skipped/reasons"])))
            img_off += n_img
    with h5py.File(files[0], "r") as f:
        concept_ids, concept_names = _strings(f["concepts/ids"]), _strings(f["concepts/names"])
        templates = _strings(f["concepts/templates"]) if "concepts/templates" in f else []
        ctf = f["concepts/text_features"][()] if "concepts/text_features" in f else None
        feature_attrs = {"images": dict(f["images/features"].attrs), "captions": dict(f["captions/features"].attrs)}
    attrs = {k: v for k, v in first.items() if k not in ("format", "dtype", "n_images", "n_captions", "n_skipped", "complete")}
    attrs.update(shard="", merged_from_shards=len(files), n_records=sum(int(read_attrs(p)["n_records"]) for p in files))
    write_split(
        final,
        attrs=attrs,
        image_ids=cols["ids"],
        image_locations=cols["locations"],
        image_features=np.concatenate(cols["features"]),
        view_features=np.concatenate(cols["views"]) if cols["views"] else None,
        captions=cols["captions"],
        caption_image=np.concatenate(cols["caption_image"]),
        caption_features=np.concatenate(cols["caption_features"]),
        concept_ids=concept_ids,
        concept_names=concept_names,
        concept_indptr=np.concatenate(cols["indptr"]),
        concept_indices=np.concatenate(cols["indices"]),
        templates=templates,
        concept_text_features=ctf,
        skipped=cols["skipped"],
        dtype=str(first.get("dtype", "float16")),
        feature_attrs=feature_attrs,
    )
    return final
