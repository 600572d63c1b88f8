"""Generic: one CSV/TSV/JSONL file with image and caption columns (optional split, labels); several
rows of one image are several captions of it. Pass the file itself, or a folder holding exactly one."""
from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medembed.extract.access import name_problem
from medembed.extract.datasets.base import (
    ANNOTATION_EXTENSIONS,
    CAPTION_ALIASES,
    IMAGE_ALIASES,
    LABEL_ALIASES,
    MAX_LINES_LISTED,
    SPLIT_ALIASES,
    DatasetError,
    empty_caption_warning,
    find_column,
    inside,
    read_text,
    split_concepts,
    table_rows,
)
from medembed.extract.datasets.csv_reader import LongFieldReader
from medembed.extract.record_table import RecordTableBuilder
from medembed.extract.records import Dataset, Record

NAME = "generic"
LOOKS_FOR = (f"one .csv/.tsv/.jsonl file with an image column ({'/'.join(IMAGE_ALIASES)}) and a caption column "
             f"({'/'.join(CAPTION_ALIASES)})")


def annotation_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(every CSV/TSV/JSONL file of the folder, those whose header names image and caption columns)."""
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ANNOTATION_EXTENSIONS)
    return candidates, [p for p in candidates if _has_image_and_caption(p)]


def annotation_file(folder: Path) -> Path | None:
    """The one annotations file of a folder (None when there is none; several are refused by name)."""
    _, usable = annotation_files(folder)
    if len(usable) > 1:
        raise DatasetError(
            f"{folder}: several annotations files ({', '.join(p.name for p in usable)}); pass the one to use"
        )
    return usable[0] if usable else None


def detect(folder: Path, names: list[str]) -> bool:
    return annotation_file(folder) is not None


def read_folder(folder: Path, name: str) -> Dataset:
    return read(annotation_file(folder), name)


def _has_image_and_caption(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    if path.suffix.lower() == ".jsonl":
        try:
            keys = list(json.loads(first)) if first.strip() else []
        except (json.JSONDecodeError, TypeError):
            return False
    else:
        keys = next(LongFieldReader([first], len(first), delimiter=_generic_delimiter(path, first)), [])
    return find_column(keys, IMAGE_ALIASES) is not None and find_column(keys, CAPTION_ALIASES) is not None


def _generic_delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() == ".tsv" or ("\t" in first_line and "," not in first_line):
        return "\t"
    return ","


@dataclass
class _GenericRow:
    line: int
    image: str
    captions: list[str]
    split: str
    concepts: list[str]


def _generic_rows(path: Path) -> Iterator[_GenericRow]:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_rows(path)
        return
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        delimiter = _generic_delimiter(path, f.readline())
    rows = table_rows(path, delimiter)
    first = next(rows, None)
    if first is None:
        raise DatasetError(f"{path}:1: empty annotations file")
    line, header = first
    image_col = find_column(header, IMAGE_ALIASES)
    caption_col = find_column(header, CAPTION_ALIASES)
    if image_col is None or caption_col is None:
        missing = [label for label, col in (("image", image_col), ("caption", caption_col)) if col is None]
        raise DatasetError(
            f"{path}:{line}: missing required column(s) {', '.join(missing)} (header is: {', '.join(header)}; "
            f"image may be called {'/'.join(IMAGE_ALIASES)}, caption {'/'.join(CAPTION_ALIASES)})"
        )
    split_col = find_column(header, SPLIT_ALIASES)
    label_col = find_column(header, LABEL_ALIASES)

    def cell(row: list[str], col: int | None) -> str:
        return row[col] if col is not None and col < len(row) else ""

    for line, row in rows:
        caption = cell(row, caption_col)
        yield _GenericRow(line, cell(row, image_col), [caption], cell(row, split_col) or "train",
                          split_concepts(cell(row, label_col)))


def _jsonl_rows(path: Path) -> Iterator[_GenericRow]:
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{line}: expected a JSON object, found {type(obj).__name__}")
        keys = list(obj)
        image_key = find_column(keys, IMAGE_ALIASES)
        caption_key = find_column(keys, CAPTION_ALIASES)
        if image_key is None or caption_key is None:
            missing = [label for label, col in (("image", image_key), ("caption", caption_key)) if col is None]
            raise DatasetError(f"{path}:{line}: missing required key(s) {', '.join(missing)} (keys: {', '.join(keys)})")
        image = obj[keys[image_key]]
        if not isinstance(image, str):
            raise DatasetError(f"{path}:{line}: image must be a string, found {type(image).__name__}")
        captions = _string_list(obj[keys[caption_key]], path, line, "caption")
        split_key = find_column(keys, SPLIT_ALIASES)
        split = obj[keys[split_key]] if split_key is not None else None
        if split is not None and not isinstance(split, str):
            raise DatasetError(f"{path}:{line}: split must be a string, found {type(split).__name__}")
        label_key = find_column(keys, LABEL_ALIASES)
        labels = obj[keys[label_key]] if label_key is not None else None
        if isinstance(labels, str):
            concepts = split_concepts(labels)
        else:
            concepts = [c for c in (s.strip() for s in _string_list(labels, path, line, "labels")) if c]
        yield _GenericRow(line, image.strip(), [c.strip() for c in captions], (split or "").strip() or "train", concepts)


def _string_list(value: object, path: Path, line: int, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DatasetError(f"{path}:{line}: {what} must be a string or a list of strings")


def _resolve_generic_image(folder: Path, image: str, path: Path, line: int) -> str:
    """Relative to the annotations file's folder, else to its images/ subfolder; never outside the folder."""
    if not image:
        raise DatasetError(f"{path}:{line}: empty image path")
    if os.path.isabs(image):
        candidates = [os.path.normpath(image)]
    else:
        candidates = [os.path.normpath(str(folder / image)), os.path.normpath(str(folder / "images" / image))]
    for candidate in candidates:
        if not inside(folder, candidate):
            raise DatasetError(f"{path}:{line}: image path {image!r} points outside the data folder {folder}")
    existing = next((c for c in candidates if os.path.isfile(c)), None)
    if existing is not None:
        return existing
    return candidates[-1] if (folder / "images").is_dir() else candidates[0]


def read(path: Path, name: str) -> Dataset:
    """The rows, one record each, streamed into a `RecordTable` with 16 bytes a row beside it (the
    image key's hash and the row's line); then the rows of one image, wherever they are in the file,
    are joined into one record in the order images first appear. No dictionary of the whole file is
    built, so an annotations file of tens of millions of rows reads in bounded memory."""
    folder = path.parent
    rows = RecordTableBuilder()
    hashes, lines = array("q"), array("q")
    empty: list[tuple[int, str]] = []
    n_empty = 0
    for row in _generic_rows(path):
        key = row.image.replace("\\", "/")
        captions = [c for c in row.captions if c]
        if len(captions) < len(row.captions) or not row.captions:
            n_empty += 1
            if len(empty) < MAX_LINES_LISTED:
                empty.append((row.line, key))
        image = _resolve_generic_image(folder, key, path, row.line)
        if name_problem(key) is not None:  # an absolute path or a ".." part: named by its place below the folder
            key = os.path.relpath(image, folder).replace(os.sep, "/")
        rows.append(Record(key, image, tuple(captions), tuple(row.concepts), row.split))
        hashes.append(hash(key))
        lines.append(row.line)
    table = rows.finish()
    records, dropped, n_dropped = RecordTableBuilder(), [], 0
    for group in _groups(np.frombuffer(hashes, np.int64)):
        for merged in _join(table, group, np.frombuffer(lines, np.int64), path):
            if merged.captions:
                records.append(merged)
            else:
                n_dropped += 1
                if len(dropped) < MAX_LINES_LISTED:
                    dropped.append(merged.image_id)
    warnings = []
    if n_empty:
        message = empty_caption_warning(path, empty, n_empty)
        if n_dropped:
            message += (f"; {n_dropped} image(s) left with no caption were dropped: "
                        + ", ".join(dropped) + (", ..." if n_dropped > MAX_LINES_LISTED else ""))
        warnings.append(message)
    return Dataset(name, str(folder), "generic", records.finish(), {}, warnings=warnings)


def _groups(hashes: np.ndarray) -> Iterator[np.ndarray]:
    """The rows of each key hash, in the order keys first appear; each group's rows in file order."""
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    bounds = np.r_[starts, len(order)]
    firsts = order[starts]  # stable: a group's first row is its earliest
    for g in np.argsort(firsts, kind="stable"):
        yield order[bounds[g]:bounds[g + 1]]


def _join(table, group: np.ndarray, lines: np.ndarray, path: Path) -> Iterator[Record]:
    """The records of one hash group joined by image key (keys that only share a hash stay apart):
    captions in file order, concepts without repeats; a key in two splits is refused by line."""
    rows = [table[int(i)] for i in group] if len(group) == 1 or group[-1] - group[0] == len(group) - 1 \
        else list(table.select(group))  # adjacent rows come from the decoded window, scattered ones in one take
    by_key: dict[str, tuple[int, Record, list[str], list[str]]] = {}
    for i, r in zip(group.tolist(), rows):
        first = by_key.get(r.image_id)
        if first is None:
            by_key[r.image_id] = (i, r, list(r.captions), list(r.concepts))
            continue
        line, rec = int(lines[first[0]]), first[1]
        if rec.split != r.split:
            raise DatasetError(f"{path}:{int(lines[i])}: image {r.image_id!r} is in split {r.split!r} here but in "
                               f"{rec.split!r} on line {line}")
        first[2].extend(r.captions)
        first[3].extend(c for c in r.concepts if c not in first[3])
    for _, rec, captions, concepts in by_key.values():
        yield Record(rec.image_id, rec.image, tuple(captions), tuple(concepts), rec.split)
