"""Generic: one CSV/TSV/JSONL file with image and caption columns (optional split, labels); several
rows of one image are several captions of it. Pass the file itself, or a folder holding exactly one."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
        keys = next(csv.reader([first], delimiter=_generic_delimiter(path, first)), [])
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
    folder = path.parent
    grouped: dict[str, _GenericRow] = {}
    locations: dict[str, str] = {}
    empty: list[tuple[int, str]] = []
    for row in _generic_rows(path):
        key = row.image.replace("\\", "/")
        captions = [c for c in row.captions if c]
        if len(captions) < len(row.captions) or not row.captions:
            empty.append((row.line, key))
        first = grouped.get(key)
        if first is None:
            locations[key] = _resolve_generic_image(folder, key, path, row.line)
            grouped[key] = _GenericRow(row.line, key, captions, row.split, list(row.concepts))
            continue
        if first.split != row.split:
            raise DatasetError(
                f"{path}:{row.line}: image {key!r} is in split {row.split!r} here but in {first.split!r} "
                f"on line {first.line}"
            )
        first.captions += captions
        first.concepts += [c for c in row.concepts if c not in first.concepts]
    records = [
        Record(key, locations[key], tuple(row.captions), tuple(row.concepts), row.split)
        for key, row in grouped.items()
        if row.captions
    ]
    warnings = []
    if empty:
        message = empty_caption_warning(path, empty)
        dropped = [key for key, row in grouped.items() if not row.captions]
        if dropped:
            message += (f"; {len(dropped)} image(s) left with no caption were dropped: "
                        + ", ".join(dropped[:MAX_LINES_LISTED]) + (", ..." if len(dropped) > MAX_LINES_LISTED else ""))
        warnings.append(message)
    return Dataset(name, str(folder), "generic", records, {}, warnings=warnings)
