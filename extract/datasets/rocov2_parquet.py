"""ROCOv2 as published on the Hugging Face hub (eltorio/ROCOv2-radiology): parquet shards
`data/{train,validation,test}-NNNNN-of-NNNNN.parquet` (or directly in the folder) with the columns
`image` (the `datasets` Image struct: bytes + path), `image_id`, `caption` and `cui` (a list of CUIs, or
one ";"-joined string); optional `cui_mapping.csv` / `cui_names.csv` (CUI,Canonical name) in the folder.

Get it with `hf download eltorio/ROCOv2-radiology --repo-type dataset --local-dir FOLDER`.

The images stay inside the shards: a record's image is "SHARD.parquet::ROW" (the row index within the
shard), read by `medembed.extract.containers`. Only the text columns are read here, never the image
bytes, so reading the dataset costs seconds however large the shards are.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medembed.common.splits import split_key
from medembed.extract.containers import parquet_image_column
from medembed.extract.datasets.base import MAX_LINES_LISTED, DatasetError, concept_list, first_concept_names
from medembed.extract.record_table import BATCH_ROWS, RecordTableBuilder
from medembed.extract.records import ZIP_SEP, Dataset, Record

NAME = "rocov2-parquet"
LOOKS_FOR = "{train,validation,test}-*.parquet with an image_id column (in the folder or data/)"
SHARD = re.compile(r"^(?P<split>train|validation|valid|val|test)(?:[-_.][\w.-]*)?\.parquet$", re.IGNORECASE)
SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "val": "valid", "test": "test"}
TEXT_COLUMNS = ("image_id", "caption")


def shards(folder: Path) -> list[tuple[str, Path]]:
    """(split, shard) of the folder's data/ subfolder, else of the folder itself; train first."""
    for where in (folder / "data", folder):
        if not where.is_dir():
            continue
        found = [(SPLITS[m.group("split").lower()], where / n) for n in sorted(p.name for p in where.iterdir())
                 if (m := SHARD.match(n)) and (where / n).is_file()]
        if found:
            return sorted(found, key=lambda s: (split_key(s[0]), s[1].name))
    return []


def _schema(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{path}: cannot read the parquet file ({e})") from None


def detect(folder: Path, names: list[str]) -> bool:
    """The first shard's schema (its footer only) has an image_id column."""
    found = shards(folder)
    if not found:
        return False
    try:
        return "image_id" in _schema(found[0][1]).names
    except DatasetError:
        return False


def read_folder(root: Path, name: str) -> Dataset:
    """Every shard's text columns, a batch of rows at a time; one record per row, its image left
    inside the shard. Records stream into a `RecordTable`; image ids are checked for duplicates
    by an 8-byte hash a row (the strings of the few that collide are compared afterwards)."""
    builder = RecordTableBuilder()
    warnings: list[str] = []
    id_hashes: list[np.ndarray] = []
    for split, path in shards(root):
        empty, n_empty = [], 0
        for row, image_id, caption, cui in _rows(path, id_hashes):
            caption = (caption or "").strip()
            if not caption:
                n_empty += 1
                if len(empty) < MAX_LINES_LISTED:
                    empty.append(f"{image_id} (row {row})")
                continue
            builder.append(Record(image_id, f"{path}{ZIP_SEP}{row}", (caption,),
                                  tuple(concept_list(cui, f"{path}: row {row}: cui")), split))
        if n_empty:
            more = ", ..." if n_empty > MAX_LINES_LISTED else ""
            warnings.append(f"{path}: dropped {n_empty} empty caption(s) of {', '.join(empty)}{more}")
    _refuse_duplicates(root, np.concatenate(id_hashes) if id_hashes else np.zeros(0, np.int64))
    concept_names = first_concept_names(root, ("cui_mapping.csv", "cui_names.csv"))
    return Dataset(name, str(root), NAME, builder.finish(), concept_names, warnings=warnings)


def _rows(path: Path, id_hashes: list[np.ndarray] | None = None) -> Iterator[tuple[int, str, str | None, object]]:
    """(row, image id, caption, cui) of a shard, read a batch at a time, never the image column; each
    batch's id hashes are appended to `id_hashes`."""
    import pyarrow.parquet as pq

    schema = _schema(path)
    missing = [c for c in TEXT_COLUMNS if c not in schema.names]
    if parquet_image_column(schema) is None:
        missing.append("image (a struct with bytes, or binary)")
    if missing:
        raise DatasetError(f"{path}: missing required column(s) {', '.join(missing)} "
                           f"(columns are: {', '.join(schema.names)})")
    columns = [*TEXT_COLUMNS, *(["cui"] if "cui" in schema.names else [])]
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        ids = [str(i).strip() if i is not None else "" for i in batch.column("image_id").to_pylist()]
        captions = batch.column("caption").to_pylist()
        cuis = batch.column("cui").to_pylist() if "cui" in columns else [None] * len(ids)
        if id_hashes is not None:
            id_hashes.append(np.fromiter((hash(i) for i in ids), np.int64, count=len(ids)))
        for image_id, caption, cui in zip(ids, captions, cuis):
            if not image_id:
                raise DatasetError(f"{path}: row {row}: empty image_id")
            yield row, image_id, caption, cui
            row += 1


def _refuse_duplicates(root: Path, hashes: np.ndarray) -> None:
    """The first image id read twice, with where it was first read; nothing when all are distinct."""
    ordered = np.sort(hashes)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    first_seen: dict[str, tuple[Path, int]] = {}
    for _, path in shards(root):
        for row, image_id, _, _ in _rows(path):
            if hash(image_id) not in repeated:
                continue
            if image_id in first_seen:
                other, other_row = first_seen[image_id]
                raise DatasetError(f"{path}: row {row}: duplicate image_id {image_id!r} "
                                   f"(first in {other.name} row {other_row})")
            first_seen[image_id] = (path, row)
