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
from pathlib import Path
from typing import Any

from medembed.common.splits import split_key
from medembed.extract.containers import parquet_image_column
from medembed.extract.datasets.base import MAX_LINES_LISTED, DatasetError, concept_list, first_concept_names
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
    """Every shard's text columns; one record per row, its image left inside the shard."""
    import pyarrow.parquet as pq

    records: list[Record] = []
    warnings: list[str] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for split, path in shards(root):
        schema = _schema(path)
        missing = [c for c in TEXT_COLUMNS if c not in schema.names]
        if parquet_image_column(schema) is None:
            missing.append("image (a struct with bytes, or binary)")
        if missing:
            raise DatasetError(f"{path}: missing required column(s) {', '.join(missing)} "
                               f"(columns are: {', '.join(schema.names)})")
        columns = [*TEXT_COLUMNS, *(["cui"] if "cui" in schema.names else [])]
        table = pq.ParquetFile(path).read(columns=columns)  # never the image column
        ids, captions = table.column("image_id").to_pylist(), table.column("caption").to_pylist()
        cuis = table.column("cui").to_pylist() if "cui" in columns else [None] * len(ids)
        empty: list[str] = []
        for row, (image_id, caption, cui) in enumerate(zip(ids, captions, cuis)):
            image_id = str(image_id).strip() if image_id is not None else ""
            if not image_id:
                raise DatasetError(f"{path}: row {row}: empty image_id")
            if image_id in first_seen:
                other, other_row = first_seen[image_id]
                raise DatasetError(f"{path}: row {row}: duplicate image_id {image_id!r} (first in {other.name} row {other_row})")
            first_seen[image_id] = (path, row)
            caption = (caption or "").strip()
            if not caption:
                empty.append(f"{image_id} (row {row})")
                continue
            records.append(Record(image_id, f"{path}{ZIP_SEP}{row}", (caption,), tuple(concept_list(cui, f"{path}: row {row}: cui")), split))
        if empty:
            more = ", ..." if len(empty) > MAX_LINES_LISTED else ""
            warnings.append(f"{path}: dropped {len(empty)} empty caption(s) of {', '.join(empty[:MAX_LINES_LISTED])}{more}")
    concept_names = first_concept_names(root, ("cui_mapping.csv", "cui_names.csv"))
    return Dataset(name, str(root), NAME, records, concept_names, warnings=warnings)

