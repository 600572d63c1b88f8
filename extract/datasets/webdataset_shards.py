"""WebDataset tar shards as img2dataset writes them: uncompressed `*.tar` files directly in the folder
(e.g. `00000.tar`, `train-000000.tar`) or in `train/`, `valid/`, `test/` subfolders; each sample is
`KEY.jpg|jpeg|png|webp|dcm` + `KEY.txt` (the caption) + an optional `KEY.json` that may hold "caption",
"split" and "labels" / "concepts" (a list, or one ";"-joined string).

Make them with img2dataset (`--output_format webdataset`) or any WebDataset writer.

Only the headers and the small .txt/.json members are read here (the reader seeks past the images);
a record's image is "SHARD.tar::MEMBER" (e.g. "shards/00000.tar::000000017.jpg"), read in place by
`medembed.extract.containers`. image_id is the shard's path below the folder without ".tar", then
"/KEY" ("00000/000000017", "train/00000/000000017"), unique across shards. A sample's split is its
subfolder's, else its shard name's prefix (train/valid/validation/val/test), else its json "split",
else "train"; when no sample says (img2dataset's plain output), 80/10/10 by a hash of its key. Records come out shard by shard in tar order, so a resumed extraction sees the same order.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from medembed.common.splits import split_key
from medembed.extract.access import DataAccess, Refusals, name_problem
from medembed.extract.datasets.base import MAX_LINES_LISTED, DatasetError, concept_list, hash_split
from medembed.extract.record_table import RecordTableBuilder
from medembed.extract.records import ZIP_SEP, Dataset, Record

NAME = "webdataset"
LOOKS_FOR = "WebDataset *.tar shards (in the folder or in train/ valid/ test/)"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "dcm")  # a sample with several images uses the first here
SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
LINK_MEMBER = "link member (a tar's links are not read)"
NAME_SPLIT = re.compile(r"^(train|validation|valid|val|test)(?=[-_.])", re.IGNORECASE)


def shards(folder: Path) -> list[tuple[str | None, Path]]:
    """(split from the subfolder or the shard name, or None; shard) for every shard, train first."""
    found: list[tuple[str | None, Path]] = []
    with os.scandir(folder) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        if entry.name.lower().endswith(".tar") and entry.is_file():
            m = NAME_SPLIT.match(entry.name)
            found.append((SPLITS[m.group(1).lower()] if m else None, Path(entry.path)))
        elif entry.name.lower() in SPLITS and entry.is_dir():
            with os.scandir(entry.path) as inner:
                tars = sorted(e.path for e in inner if e.name.lower().endswith(".tar") and e.is_file())
            found += [(SPLITS[entry.name.lower()], Path(t)) for t in tars]
    return sorted(found, key=lambda s: (split_key(s[0] or "train"), s[1]))


def detect(folder: Path, names: list[str]) -> bool:
    """A .tar in the folder, or in one of its train/ valid/ test/ subfolders (a few names each)."""
    if any(n.lower().endswith(".tar") for n in names):
        return True
    for sub in SPLITS:
        if (folder / sub).is_dir():
            with os.scandir(folder / sub) as entries:
                if any(e.name.lower().endswith(".tar") for e in itertools.islice(entries, 50)):
                    return True
    return False


@dataclass
class _Sample:
    images: dict[str, str] = field(default_factory=dict)  # extension -> member name
    caption: str | None = None
    meta: dict = field(default_factory=dict)


def read_folder(root: Path, name: str, follow_links: bool = False) -> Dataset:
    """Every sample of every shard with an image and a caption, shard by shard, in tar order. One
    shard's samples are held at a time; the records stream into a `RecordTable`. A shard that is a link
    out of the folder (unless `follow_links`), a member named outside the shard (`..`, absolute) and a
    link member are not read, and are counted in `Dataset.refused`."""
    builder = RecordTableBuilder()
    dropped: list[str] = []
    n_dropped, any_split, any_unsplit = 0, False, False
    access, refused = DataAccess(str(root), follow_links), Refusals()
    for split, shard in shards(root):
        rel = shard.relative_to(root).as_posix()
        if (why := access.refusal(str(shard))) is not None:
            refused.add(rel, why)
            continue
        prefix = shard.relative_to(root).with_suffix("").as_posix()
        for key, sample in _samples(shard, rel, refused).items():
            image = next((sample.images[e] for e in IMAGE_EXTENSIONS if e in sample.images), None)
            if image is None:
                continue  # a caption without an image: nothing to embed
            image_id = f"{prefix}/{key}"
            caption = (sample.caption if sample.caption is not None else str(sample.meta.get("caption") or "")).strip()
            if not caption:
                n_dropped += 1
                if len(dropped) < MAX_LINES_LISTED:
                    dropped.append(image_id)
                continue
            sample_split = split or _split_of(sample.meta.get("split"), shard, key) or ""
            any_split, any_unsplit = any_split or bool(sample_split), any_unsplit or not sample_split
            concepts = concept_list(sample.meta.get("labels", sample.meta.get("concepts")), f"{shard}::{key}.json: labels")
            builder.append(Record(image_id, f"{shard}{ZIP_SEP}{image}", (caption,), tuple(concepts), sample_split))
    records = builder.finish()
    warnings = []
    if any_unsplit and not any_split:
        # img2dataset writes no splits at all: a deterministic 80/10/10 by sample, so adapt has a valid split
        records = records.with_splits(hash_split)
        warnings.append(f"{root}: no split in folders, shard names or sample json: split 80/10/10 train/valid/test "
                        "by a hash of each sample's key")
    elif any_unsplit:
        records = records.with_splits(lambda _: "train")
    if n_dropped:
        shown = ", ".join(dropped) + (", ..." if n_dropped > MAX_LINES_LISTED else "")
        warnings.append(f"{root}: dropped {n_dropped} sample(s) with an image but no caption: {shown}")
    return Dataset(name, str(root), NAME, records, {}, warnings=warnings, refused=refused, follow_links=follow_links)


def _samples(shard: Path, rel: str, refused: Refusals) -> dict[str, _Sample]:
    """KEY -> sample, in tar order. The tar is opened seekable, so image data is skipped, not read.
    Link members and members whose names leave the shard are counted in `refused` (as `rel::NAME`)."""
    samples: dict[str, _Sample] = {}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for info in tf:
                if info.issym() or info.islnk():
                    refused.add(f"{rel}{ZIP_SEP}{info.name}", LINK_MEMBER)
                    continue
                if not info.isfile():
                    continue
                if (why := name_problem(info.name)) is not None:
                    refused.add(f"{rel}{ZIP_SEP}{info.name}", why)
                    continue
                folder, base = os.path.split(info.name)
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("._"):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                sample = samples.setdefault(key, _Sample())
                if ext in IMAGE_EXTENSIONS:
                    sample.images.setdefault(ext, info.name)
                elif ext in ("txt", "json"):
                    data = tf.extractfile(info).read()
                    try:
                        text = data.decode("utf-8-sig")
                        if ext == "txt":
                            sample.caption = text
                        else:
                            meta = json.loads(text)
                            if not isinstance(meta, dict):
                                raise DatasetError(f"{shard}::{info.name}: expected a JSON object")
                            sample.meta = meta
                    except UnicodeDecodeError:
                        raise DatasetError(f"{shard}::{info.name}: not valid UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{shard}::{info.name}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{shard}: cannot read the tar shard ({e}); shards must be uncompressed .tar") from None
    return samples


def _split_of(value: object, shard: Path, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DatasetError(f"{shard}::{key}.json: split must be a string, found {type(value).__name__}")
    return SPLITS.get(value.strip().lower(), value.strip())

