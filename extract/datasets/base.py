"""What every layout reader shares: the dataset error, column aliases, table readers that name the
file and line of every problem, the image lookup, and the ImageCLEF-style record builder."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medembed.common.errors import BadInput
from medembed.common.splits import sort_splits
from medembed.extract.access import name_problem
from medembed.extract.datasets.csv_reader import LongFieldReader
from medembed.extract.records import ZIP_SEP, Record

SYNTHETIC_MARKER = "SYNTHETIC"  # a file of this name in the data folder marks generated (not real) data
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ANNOTATION_EXTENSIONS = (".csv", ".tsv", ".jsonl")

IMAGE_ALIASES = ("image", "filepath", "file", "path", "image_path", "filename", "file_name", "img", "image_file")
CAPTION_ALIASES = ("caption", "text", "title", "captions", "sentence")
LABEL_ALIASES = ("labels", "label", "concepts", "cuis", "cui")
SPLIT_ALIASES = ("split", "subset")

SPLIT_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]*?"
MAX_LINES_LISTED = 5


def hash_split(key: str) -> str:
    """A deterministic 80/10/10 train/valid/test split by a key (a patient, a report, a sample) for
    corpora that ship none: everything under one key lands in one split, so nothing leaks from test
    into train, and the same folder splits the same way on every machine."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10
    return "train" if bucket < 8 else "valid" if bucket == 8 else "test"


class DatasetError(BadInput):
    """Annotations that cannot be read unambiguously; the message names the file and line."""



# ----------------------------------------------------------------------------------------------- text & rows


def read_text(path: Path) -> str:
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


def table_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the row starts, fields) for every non-blank row.

    Tab-separated files are read without quote handling: ImageCLEF's TSVs hold captions with bare
    quote characters, which a quoting parser would glue across lines.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    kind = "TSV" if delimiter == "\t" else "CSV"
    text = read_text(path)
    reader = LongFieldReader(io.StringIO(text, newline=""), len(text), delimiter=delimiter, quoting=quoting)
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if any(f.strip() for f in row):
                yield line, [f.strip() for f in row]
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: malformed {kind}: {e}") from None


def find_column(header: list[str], aliases: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for alias in aliases:
        if alias in lowered:
            return lowered.index(alias)
    return None


def split_concepts(value: str) -> list[str]:
    out: list[str] = []
    for cui in value.split(";"):
        cui = cui.strip()
        if cui and cui not in out:
            out.append(cui)
    return out


@dataclass
class IdRows:
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


def read_header_table(path: Path, value_aliases: tuple[str, ...], value_label: str) -> IdRows:
    """A comma-separated file with a required header naming an ID and a value column."""
    out = IdRows(path)
    rows = table_rows(path, ",")
    first = next(rows, None)
    if first is None:
        return out
    line, header = first
    id_col = find_column(header, ("id", "image_id", "imageid"))
    value_col = find_column(header, value_aliases)
    missing = [label for label, col in (("ID", id_col), (value_label, value_col)) if col is None]
    if missing:
        raise DatasetError(
            f"{path}:{line}: missing required column(s) {', '.join(missing)} (header is: {', '.join(header)})"
        )
    for line, row in rows:
        value = row[value_col] if value_col < len(row) else ""
        out.add(line, row[id_col] if id_col < len(row) else "", value)
    return out


HEADER_FIRST = {"id", "image_id", "imageid", "image", "cui", "cuis", "concept", "concept_id", "name", "filename"}


def looks_like_header(row: list[str]) -> bool:
    """Judged by the first field alone: an ID is never literally "ID", while a caption may well be "Caption"."""
    return row[0].lower() in HEADER_FIRST


def read_positional_table(path: Path, delimiter: str) -> IdRows:
    """ID then value, no header required (one is detected and skipped)."""
    out = IdRows(path)
    for index, (line, row) in enumerate(table_rows(path, delimiter)):
        if index == 0 and looks_like_header(row):
            continue
        while len(row) > 2 and not row[-1]:  # trailing separators
            row = row[:-1]
        if len(row) > 2 and delimiter == "\t":
            raise DatasetError(f"{path}:{line}: expected ID<TAB>value, found {len(row)} tab-separated fields")
        out.add(line, row[0], delimiter.join(row[1:]) if len(row) > 1 else "")
    return out


def concept_list(value: object, where: str) -> list[str]:
    """Concept ids given as a list of strings or one ";"-joined string (None: none); `where` names the
    file, row and field for the error ("{where} must be a list of strings or a ';'-joined string")."""
    if value is None:
        return []
    if isinstance(value, str):
        return split_concepts(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return split_concepts(";".join(value))
    raise DatasetError(f"{where} must be a list of strings or a ';'-joined string")


def first_concept_names(root: Path, candidates: tuple[str, ...]) -> dict[str, str]:
    """CUI -> name from the first of `candidates` (CUI,Canonical name files) present in `root`."""
    for candidate in candidates:
        if (root / candidate).is_file():
            return read_concept_names(root / candidate, ",")
    return {}


def read_concept_names(path: Path, delimiter: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for cui, (_, name) in read_positional_table(path, delimiter).values.items():
        names[cui] = name
    return names


# --------------------------------------------------------------------------------------------- image lookup


def inside(root: Path, location: str) -> bool:
    """Lexical containment, checked as annotations are read; where links lead is checked when an image
    is read (`access.DataAccess`)."""
    archive = location.split(ZIP_SEP, 1)[0]
    full = os.path.normpath(archive)
    base = os.path.normpath(str(root))
    return full == base or full.startswith(base.rstrip(os.sep) + os.sep)


class ImageIndex:
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
                            and not os.path.basename(n).startswith("._") and name_problem(n) is None
                        ]
                except (OSError, zipfile.BadZipFile) as e:
                    raise DatasetError(f"{source}: cannot read the image archive ({e})") from None
            listing: dict[str, str] = {}
            for name in sorted(names, key=lambda n: ext_rank(n)):
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


def ext_rank(name: str) -> int:
    ext = os.path.splitext(name)[1].lower()
    return IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------------ imageclef layouts


def split_files(folder: Path, pattern: re.Pattern[str]) -> dict[str, Path]:
    """split -> file, train first and test last so records come out in the usual order."""
    found = {}
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            found[m.group("split")] = p
    return {s: found[s] for s in sort_splits(found)}


def empty_caption_warning(path: Path, rows: list[tuple[int, str]], total: int | None = None) -> str:
    """Which captions were empty, by line and by the image they belong to (the image is what a user
    will miss in the cache); `total` when `rows` holds only the first few of them."""
    total = len(rows) if total is None else total
    shown = ", ".join(f"{image} (line {n})" for n, image in rows[:MAX_LINES_LISTED])
    more = ", ..." if total > MAX_LINES_LISTED else ""
    return f"{path}: dropped {total} empty caption(s) of {shown}{more}"


def imageclef_splits(root: Path, captions_file: re.Pattern[str], read_captions: Callable[[Path], IdRows],
                      concepts_path: Callable[[str], Path], read_concepts: Callable[[Path], IdRows],
                      ) -> tuple[list[Record], list[str]]:
    """Records and warnings of every split of an ImageCLEF-style folder: the split's captions file
    (found by `captions_file`), its concepts file when there is one, images found by ID."""
    index = ImageIndex(root)
    records: list[Record] = []
    warnings: list[str] = []
    for split, caption_path in split_files(root, captions_file).items():
        concept_path = concepts_path(split)
        concepts = read_concepts(concept_path) if concept_path.is_file() else None
        records += imageclef_records(root, split, read_captions(caption_path), concepts, index, warnings)
    return records, warnings


def imageclef_records(
    root: Path, split: str, captions: IdRows, concepts: IdRows | None, index: ImageIndex, warnings: list[str]
) -> list[Record]:
    records = []
    empty: list[tuple[int, str]] = []
    concept_values = concepts.values if concepts is not None else {}
    for image_id, (line, caption) in captions.values.items():
        if not caption:
            empty.append((line, image_id))  # the image has no other caption here: it is dropped
            continue
        location = index.locate(image_id, split)
        if not inside(root, location):
            raise DatasetError(f"{captions.path}:{line}: image of ID {image_id!r} lies outside the data folder {root}")
        if (why := name_problem(image_id)) is not None:
            raise DatasetError(f"{captions.path}:{line}: image ID {image_id!r}: {why}")
        cuis = split_concepts(concept_values[image_id][1]) if image_id in concept_values else []
        records.append(Record(image_id, location, (caption,), tuple(cuis), split))
    if empty:
        warnings.append(empty_caption_warning(captions.path, empty))
    return records



def delimiter_of(path: Path) -> str:
    """Tab unless the first line has a comma and no tab (some re-releases switched to CSV)."""
    with open(path, "rb") as f:
        first = f.readline()
    return "," if b"\t" not in first and b"," in first else "\t"


