"""Read a data folder in any supported layout into one `Dataset`.

People point the toolkit at whatever they downloaded, so the layout is recognised from file names
rather than configured: a wrong guess would silently mis-pair images and captions, hence every problem
with the annotations stops with the file and line to fix, and only harmless gaps are tolerated (empty
captions dropped and counted in `Dataset.warnings`; images missing on disk kept, so the extractor can
report them next to unreadable ones).

Layouts, tried in this order:
    imageclef2023  `{split}_captions.csv` (ID,Caption), optional `{split}_concepts.csv` (ID,CUIs), and
                   `cui_names.csv` / `cui_mapping.csv` (CUI,Canonical name): ROCOv2, ImageCLEFmedical 2023.
    imageclef2022  tab-separated `caption_prediction_{split}.csv` / `concept_detection_{split}.csv`
                   (header row optional) and `concepts.txt` (CUI<TAB>name); images in a folder or a zip.
    generic        one CSV/TSV/JSONL file with image and caption columns (optional split, labels);
                   several rows of one image are several captions of it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medembed.common.errors import MedembedError
from medembed.common.splits import sort_splits
from medembed.extract.records import ZIP_SEP, Dataset, Record

SYNTHETIC_MARKER = "SYNTHETIC"  # a file of this name in the data folder marks generated (not real) data
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ANNOTATION_EXTENSIONS = (".csv", ".tsv", ".jsonl")

IMAGE_ALIASES = ("image", "filepath", "file", "path", "image_path", "filename", "file_name", "img", "image_file")
CAPTION_ALIASES = ("caption", "text", "title", "captions", "sentence")
LABEL_ALIASES = ("labels", "label", "concepts", "cuis", "cui")
SPLIT_ALIASES = ("split", "subset")

_SPLIT_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]*?"
_CLEF2023_CAPTIONS = re.compile(rf"^(?P<split>{_SPLIT_NAME})_captions\.csv$")
_CLEF2022_CAPTIONS = re.compile(rf"^caption_prediction_(?P<split>{_SPLIT_NAME})\.csv$")
_MAX_LINES_LISTED = 5


class DatasetError(MedembedError, ValueError):
    """Annotations that cannot be read unambiguously; the message names the file and line."""


def load_dataset(path: str | Path, name: str | None = None) -> Dataset:
    """Read a data folder (or one annotations file) of any supported layout, all splits at once."""
    path = Path(os.path.normpath(Path(path).expanduser().absolute()))
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    layout = detect_layout(path)
    folder = path if path.is_dir() else path.parent
    dataset_name = name or folder.name
    if layout == "imageclef2023":
        dataset = _read_imageclef2023(folder, dataset_name)
    elif layout == "imageclef2022":
        dataset = _read_imageclef2022(folder, dataset_name)
    else:
        dataset = _read_generic(path if path.is_file() else _generic_annotation_file(folder), dataset_name)
    dataset.synthetic = (folder / SYNTHETIC_MARKER).is_file()
    return dataset


def detect_layout(path: str | Path) -> str:
    """'imageclef2023', 'imageclef2022' or 'generic'; DatasetError listing what was looked for."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in ANNOTATION_EXTENSIONS:
            return "generic"
        raise DatasetError(f"{path}: not an annotations file (expected one of {', '.join(ANNOTATION_EXTENSIONS)})")
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(_CLEF2023_CAPTIONS.match(n) for n in names):
        return "imageclef2023"
    if any(_CLEF2022_CAPTIONS.match(n) for n in names):
        return "imageclef2022"
    _generic_annotation_file(path)  # raises with the list of what was looked for
    return "generic"


# ----------------------------------------------------------------------------------------------- text & rows


def _read_text(path: Path) -> str:
    """Whole file as text; a byte that is not UTF-8 is reported with its line, not as a codec traceback."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); re-save the file as UTF-8"
        ) from None


def _rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row starts, fields) for every non-blank row.

    Tab-separated files are read without quote handling: ImageCLEF's TSVs hold captions with bare
    quote characters, which a quoting parser would glue across lines.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if any(f.strip() for f in row):
                yield line, [f.strip() for f in row]
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: malformed {kind}: {e}") from None


def _find_column(header: list[str], aliases: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for alias in aliases:
        if alias in lowered:
            return lowered.index(alias)
    return None


def _split_concepts(value: str) -> list[str]:
    out: list[str] = []
    for cui in value.split(";"):
        cui = cui.strip()
        if cui and cui not in out:
            out.append(cui)
    return out


@dataclass
class _IdRows:
    """id -> (line, value) of one ImageCLEF annotation file, in file order."""

    path: Path
    values: dict[str, tuple[int, str]] = field(default_factory=dict)

    def add(self, line: int, image_id: str, value: str) -> None:
        if not image_id:
            raise DatasetError(f"{self.path}:{line}: empty ID")
        if image_id in self.values:
            first = self.values[image_id][0]
            raise DatasetError(f"{self.path}:{line}: duplicate ID {image_id!r} (first on line {first})")
        self.values[image_id] = (line, value)


def _read_header_table(path: Path, value_aliases: tuple[str, ...], value_label: str) -> _IdRows:
    """A comma-separated file with a required header naming an ID and a value column."""
    out = _IdRows(path)
    rows = _rows(path, ",")
    first = next(rows, None)
    if first is None:
        return out
    line, header = first
    id_col = _find_column(header, ("id", "image_id", "imageid"))
    value_col = _find_column(header, value_aliases)
    missing = [label for label, col in (("ID", id_col), (value_label, value_col)) if col is None]
    if missing:
        raise DatasetError(
            f"{path}:{line}: missing required column(s) {', '.join(missing)} (header is: {', '.join(header)})"
        )
    for line, row in rows:
        value = row[value_col] if value_col < len(row) else ""
        out.add(line, row[id_col] if id_col < len(row) else "", value)
    return out


_HEADER_FIRST = {"id", "image_id", "imageid", "image", "cui", "cuis", "concept", "concept_id", "name", "filename"}


def _looks_like_header(row: list[str]) -> bool:
    """Judged by the first field alone: an ID is never literally "ID", while a caption may well be "Caption"."""
    return row[0].lower() in _HEADER_FIRST


def _read_positional_table(path: Path, delimiter: str) -> _IdRows:
    """ID then value, no header required (one is detected and skipped)."""
    out = _IdRows(path)
    for index, (line, row) in enumerate(_rows(path, delimiter)):
        if index == 0 and _looks_like_header(row):
            continue
        while len(row) > 2 and not row[-1]:  # trailing separators
            row = row[:-1]
        if len(row) > 2 and delimiter == "\t":
            raise DatasetError(f"{path}:{line}: expected ID<TAB>value, found {len(row)} tab-separated fields")
        out.add(line, row[0], delimiter.join(row[1:]) if len(row) > 1 else "")
    return out


def _read_concept_names(path: Path, delimiter: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for cui, (_, name) in _read_positional_table(path, delimiter).values.items():
        names[cui] = name
    return names


# --------------------------------------------------------------------------------------------- image lookup


def _inside(root: Path, location: str) -> bool:
    """Lexical containment (symlinked images that point elsewhere are the data owner's choice)."""
    archive = location.split(ZIP_SEP, 1)[0]
    full = os.path.normpath(archive)
    base = os.path.normpath(str(root))
    return full == base or full.startswith(base.rstrip(os.sep) + os.sep)


class _ImageIndex:
    """Finds an image by ID in the folders and zips ImageCLEF releases use, listing each source once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, dict[str, str]] = {}
        self._sources: dict[str, list[Path]] = {}

    def sources(self, split: str) -> list[Path]:
        """Existing folders (images/, {split}/, resized_{split}/, the root itself), then zips."""
        if split not in self._sources:
            folders = [self.root / "images", self.root / split, self.root / f"resized_{split}", self.root]
            zips = [self.root / f"{split}.zip", self.root / f"resized_{split}.zip", self.root / "images.zip"]
            self._sources[split] = [p for p in folders if p.is_dir()] + [p for p in zips if p.is_file()]
        return self._sources[split]

    def _listing(self, source: Path) -> dict[str, str]:
        """stem -> name (and name -> name) of the images in a folder or zip; .jpg wins over .png."""
        if source not in self._listings:
            if source.is_dir():
                names = [e.name for e in os.scandir(source) if e.is_file()]
            else:
                try:
                    with zipfile.ZipFile(source) as z:
                        names = [
                            n for n in z.namelist()
                            if not n.endswith("/") and not n.startswith("__MACOSX/")
                            and not os.path.basename(n).startswith("._")
                        ]
                except (OSError, zipfile.BadZipFile) as e:
                    raise DatasetError(f"{source}: cannot read the image archive ({e})") from None
            listing: dict[str, str] = {}
            for name in sorted(names, key=lambda n: _ext_rank(n)):
                base = os.path.basename(name)
                stem, ext = os.path.splitext(base)
                if ext.lower() in IMAGE_EXTENSIONS:
                    listing.setdefault(stem, name)
                    listing.setdefault(base, name)
            self._listings[source] = listing
        return self._listings[source]

    def locate(self, image_id: str, split: str) -> str:
        sources = self.sources(split)
        for source in sources:
            name = self._listing(source).get(image_id)
            if name is not None:
                return f"{source}{ZIP_SEP}{name}" if source.is_file() else str(source / name)
        guess = image_id if os.path.splitext(image_id)[1].lower() in IMAGE_EXTENSIONS else f"{image_id}.jpg"
        fallback = sources[0] if sources else self.root
        return f"{fallback}{ZIP_SEP}{guess}" if fallback.is_file() else os.path.normpath(str(fallback / guess))


def _ext_rank(name: str) -> int:
    ext = os.path.splitext(name)[1].lower()
    return IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------------ imageclef layouts


def _split_files(folder: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    """split -> file, train first and test last so records come out in the usual order."""
    found = {}
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            found[m.group("split")] = p
    return {s: found[s] for s in sort_splits(found)}


def _empty_caption_warning(path: Path, rows: list[tuple[int, str]]) -> str:
    """Which captions were empty, by line and by the image they belong to (the image is what a user
    will miss in the cache)."""
    shown = ", ".join(f"{image} (line {n})" for n, image in rows[:_MAX_LINES_LISTED])
    more = ", ..." if len(rows) > _MAX_LINES_LISTED else ""
    return f"{path}: dropped {len(rows)} empty caption(s) of {shown}{more}"


def _imageclef_records(
    root: Path, split: str, captions: _IdRows, concepts: _IdRows | None, index: _ImageIndex, warnings: list[str]
) -> list[Record]:
    records = []
    empty: list[tuple[int, str]] = []
    concept_values = concepts.values if concepts is not None else {}
    for image_id, (line, caption) in captions.values.items():
        if not caption:
            empty.append((line, image_id))  # the image has no other caption here: it is dropped
            continue
        location = index.locate(image_id, split)
        if not _inside(root, location):
            raise DatasetError(f"{captions.path}:{line}: image of ID {image_id!r} lies outside the data folder {root}")
        cuis = _split_concepts(concept_values[image_id][1]) if image_id in concept_values else []
        records.append(Record(image_id, location, (caption,), tuple(cuis), split))
    if empty:
        warnings.append(_empty_caption_warning(captions.path, empty))
    return records


def _read_imageclef2023(root: Path, name: str) -> Dataset:
    index = _ImageIndex(root)
    records: list[Record] = []
    warnings: list[str] = []
    for split, caption_path in _split_files(root, _CLEF2023_CAPTIONS).items():
        captions = _read_header_table(caption_path, ("caption", "captions"), "Caption")
        concept_path = root / f"{split}_concepts.csv"
        concepts = _read_header_table(concept_path, ("cuis", "cui", "concepts"), "CUIs") if concept_path.is_file() else None
        records += _imageclef_records(root, split, captions, concepts, index, warnings)
    concept_names: dict[str, str] = {}
    for candidate in ("cui_names.csv", "cui_mapping.csv"):
        if (root / candidate).is_file():
            concept_names = _read_concept_names(root / candidate, ",")
            break
    return Dataset(name, str(root), "imageclef2023", records, concept_names, warnings=warnings)


def _read_imageclef2022(root: Path, name: str) -> Dataset:
    index = _ImageIndex(root)
    records: list[Record] = []
    warnings: list[str] = []
    for split, caption_path in _split_files(root, _CLEF2022_CAPTIONS).items():
        captions = _read_positional_table(caption_path, _delimiter_of(caption_path))
        concept_path = root / f"concept_detection_{split}.csv"
        concepts = _read_positional_table(concept_path, _delimiter_of(concept_path)) if concept_path.is_file() else None
        records += _imageclef_records(root, split, captions, concepts, index, warnings)
    names_path = root / "concepts.txt"
    concept_names = _read_concept_names(names_path, _delimiter_of(names_path)) if names_path.is_file() else {}
    return Dataset(name, str(root), "imageclef2022", records, concept_names, warnings=warnings)


def _delimiter_of(path: Path) -> str:
    """Tab unless the first line has a comma and no tab (some re-releases switched to CSV)."""
    with open(path, "rb") as f:
        first = f.readline()
    return "," if b"\t" not in first and b"," in first else "\t"


# ---------------------------------------------------------------------------------------------- generic layout


def _generic_annotation_file(folder: Path) -> Path:
    """The one annotations file of a folder: the CSV/TSV/JSONL whose header names image and caption columns."""
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ANNOTATION_EXTENSIONS)
    usable = [p for p in candidates if _has_image_and_caption(p)]
    if len(usable) == 1:
        return usable[0]
    if len(usable) > 1:
        raise DatasetError(
            f"{folder}: several annotations files ({', '.join(p.name for p in usable)}); pass the one to use"
        )
    raise DatasetError(
        f"{folder}: no dataset layout recognised. Looked for: {{split}}_captions.csv (imageclef2023), "
        f"caption_prediction_{{split}}.csv (imageclef2022), or one .csv/.tsv/.jsonl file with an image column "
        f"({'/'.join(IMAGE_ALIASES)}) and a caption column ({'/'.join(CAPTION_ALIASES)})"
        + (f"; found {', '.join(p.name for p in candidates)} without those columns" if candidates else "")
    )


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
    return _find_column(keys, IMAGE_ALIASES) is not None and _find_column(keys, CAPTION_ALIASES) is not None


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
    rows = _rows(path, delimiter)
    first = next(rows, None)
    if first is None:
        raise DatasetError(f"{path}:1: empty annotations file")
    line, header = first
    image_col = _find_column(header, IMAGE_ALIASES)
    caption_col = _find_column(header, CAPTION_ALIASES)
    if image_col is None or caption_col is None:
        missing = [label for label, col in (("image", image_col), ("caption", caption_col)) if col is None]
        raise DatasetError(
            f"{path}:{line}: missing required column(s) {', '.join(missing)} (header is: {', '.join(header)}; "
            f"image may be called {'/'.join(IMAGE_ALIASES)}, caption {'/'.join(CAPTION_ALIASES)})"
        )
    split_col = _find_column(header, SPLIT_ALIASES)
    label_col = _find_column(header, LABEL_ALIASES)

    def cell(row: list[str], col: int | None) -> str:
        return row[col] if col is not None and col < len(row) else ""

    for line, row in rows:
        caption = cell(row, caption_col)
        yield _GenericRow(line, cell(row, image_col), [caption], cell(row, split_col) or "train",
                          _split_concepts(cell(row, label_col)))


def _jsonl_rows(path: Path) -> Iterator[_GenericRow]:
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{line}: expected a JSON object, found {type(obj).__name__}")
        keys = list(obj)
        image_key = _find_column(keys, IMAGE_ALIASES)
        caption_key = _find_column(keys, CAPTION_ALIASES)
        if image_key is None or caption_key is None:
            missing = [label for label, col in (("image", image_key), ("caption", caption_key)) if col is None]
            raise DatasetError(f"{path}:{line}: missing required key(s) {', '.join(missing)} (keys: {', '.join(keys)})")
        image = obj[keys[image_key]]
        if not isinstance(image, str):
            raise DatasetError(f"{path}:{line}: image must be a string, found {type(image).__name__}")
        captions = _string_list(obj[keys[caption_key]], path, line, "caption")
        split_key = _find_column(keys, SPLIT_ALIASES)
        split = obj[keys[split_key]] if split_key is not None else None
        if split is not None and not isinstance(split, str):
            raise DatasetError(f"{path}:{line}: split must be a string, found {type(split).__name__}")
        label_key = _find_column(keys, LABEL_ALIASES)
        labels = obj[keys[label_key]] if label_key is not None else None
        if isinstance(labels, str):
            concepts = _split_concepts(labels)
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
        if not _inside(folder, candidate):
            raise DatasetError(f"{path}:{line}: image path {image!r} points outside the data folder {folder}")
    existing = next((c for c in candidates if os.path.isfile(c)), None)
    if existing is not None:
        return existing
    return candidates[-1] if (folder / "images").is_dir() else candidates[0]


def _read_generic(path: Path, name: str) -> Dataset:
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
        message = _empty_caption_warning(path, empty)
        dropped = [key for key, row in grouped.items() if not row.captions]
        if dropped:
            message += (f"; {len(dropped)} image(s) left with no caption were dropped: "
                        + ", ".join(dropped[:_MAX_LINES_LISTED]) + (", ..." if len(dropped) > _MAX_LINES_LISTED else ""))
        warnings.append(message)
    return Dataset(name, str(folder), "generic", records, {}, warnings=warnings)
