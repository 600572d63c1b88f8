"""MIMIC-CXR (DICOM) and MIMIC-CXR-JPG: images `files/pXX/pNNNNNNNN/sNNNNNNNN/*.dcm` or `*.jpg`, free-text
reports `files/pXX/pNNNNNNNN/sNNNNNNNN.txt` in the same tree or in a sibling `mimic-cxr-reports/files/...`
or `reports/files/...` tree, and the official split `mimic-cxr-2.0.0-split.csv[.gz]`
(dicom_id,study_id,subject_id,split).

Get it from PhysioNet (credentialed access): https://physionet.org/content/mimic-cxr-jpg/ (JPG and the
split file) or https://physionet.org/content/mimic-cxr/ (DICOM and `mimic-cxr-reports.zip`, unzipped
into the folder).

One record per image; every image of a study shares the study's report. The caption is chosen
sections of the report (`report_sections`, FINDINGS and IMPRESSION by default): the other sections
(indication, history, comparison) describe why the study was ordered, not what the image shows.

Privacy: the path holds the subject and study numbers, which must not travel with the embeddings, so
a record's image_id is a keyed hash (HMAC-SHA256, 16 hex digits; see `path_key`) of the image's path
relative to the data folder (e.g. "files/p10/p10000032/s50414267/02aa804e-....jpg") -- stable, unique,
and not found again from guessed paths without the user's key. Caches made before ids were keyed
(a plain sha256) are still read.
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import re
from pathlib import Path
from typing import Any

from medembed.common.errors import BadOption
from medembed.extract.datasets.base import MAX_LINES_LISTED, DatasetError, find_column, hash_split, read_text
from medembed.extract.datasets.csv_reader import LongFieldReader
from medembed.extract.limits import GZIP_WBITS, CorruptStream, DecompressionBomb, inflate, inflate_limit
from medembed.extract.path_key import load_path_key
from medembed.extract.records import Dataset, Record

NAME = "mimic-cxr"
LOOKS_FOR = "files/pXX/pNNNNNNNN/sNNNNNNNN/ image folders or mimic-cxr-2.0.0-split.csv[.gz]"
SPLIT_FILES = ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
REPORT_TREES = ("files", "mimic-cxr-reports/files", "reports/files")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".dcm")  # one file per stem, the first found in this order
OFFICIAL_SPLITS = {"train": "train", "validate": "valid", "valid": "valid", "validation": "valid", "test": "test"}

REPORT_SECTIONS = ("findings", "impression", "findings+impression", "all")
HEADERS = ("FINDINGS AND IMPRESSION", "FINDINGS", "IMPRESSION", "INDICATION", "INDICATIONS", "COMPARISON", "HISTORY", "CLINICAL HISTORY",
           "TECHNIQUE", "EXAMINATION", "EXAM", "REASON FOR EXAMINATION", "REASON FOR EXAM", "PROCEDURE",
           "NOTIFICATION", "RECOMMENDATION(S)", "RECOMMENDATIONS", "RECOMMENDATION", "WET READ", "CONCLUSION")
HEADER = re.compile(r"^[ \t]*(" + "|".join(re.escape(h) for h in sorted(HEADERS, key=len, reverse=True))
                    + r")[ \t]*:", re.IGNORECASE | re.MULTILINE)
FINAL_REPORT = re.compile(r"^\s*FINAL REPORT[ \t]*(\r?\n|$)", re.IGNORECASE)


# ------------------------------------------------------------------------------- shared with other layouts


def check_sections(report_sections: str) -> str:
    if report_sections not in REPORT_SECTIONS:
        raise BadOption(f"report_sections must be one of {', '.join(REPORT_SECTIONS)}, not {report_sections!r}")
    return report_sections


def collapse(text: str) -> str:
    return " ".join(text.split())


def choose_caption(sections: dict[str, str], whole: str, report_sections: str) -> tuple[str, bool]:
    """(caption, whether it fell back): the chosen sections joined, else IMPRESSION, else the whole
    text; `sections` maps upper-case header -> its collapsed text, `whole` is the collapsed report."""
    if report_sections == "all":
        return whole, False
    wanted = {"findings+impression": ("FINDINGS", "IMPRESSION", "FINDINGS AND IMPRESSION"),
              "findings": ("FINDINGS", "FINDINGS AND IMPRESSION"),
              "impression": ("IMPRESSION", "FINDINGS AND IMPRESSION", "CONCLUSION")}[report_sections]
    chosen = " ".join(sections[s] for s in wanted if sections.get(s))
    if chosen:
        return chosen, False
    return sections.get("IMPRESSION") or sections.get("CONCLUSION") or whole, True


def fallback_warning(where: str, what: str, report_sections: str, examples: list[str]) -> str:
    shown = ", ".join(examples[:MAX_LINES_LISTED]) + (", ..." if len(examples) > MAX_LINES_LISTED else "")
    return (f"{where}: {len(examples)} {what} had no {report_sections.replace('+', ' or ').upper()} section; "
            f"captioned with the IMPRESSION, else the whole report: {shown}")


# ----------------------------------------------------------------------------------------------- reports


def parse_report(text: str) -> tuple[dict[str, str], str]:
    """(upper-case header -> collapsed section text, the whole report collapsed without its leading
    "FINAL REPORT" line). Headers are recognised at line start only, from a fixed list, so a line
    such as "Heart size: normal" inside FINDINGS does not cut the section short."""
    text = FINAL_REPORT.sub("", text, count=1)
    sections: dict[str, str] = {}
    matches = list(HEADER.finditer(text))
    for m, nxt in zip(matches, [*matches[1:], None]):
        header = collapse(m.group(1)).upper()
        body = collapse(text[m.end():nxt.start() if nxt else len(text)])
        if body:
            sections[header] = f"{sections[header]} {body}" if header in sections else body
    return sections, collapse(text)


# ---------------------------------------------------------------------------------------------- the layout


def detect(folder: Path, names: list[str]) -> bool:
    """The split file, or a files/ folder whose first entries include a pXX subject group."""
    if any(n in SPLIT_FILES for n in names):
        return True
    files = folder / "files"
    if not files.is_dir():
        return False
    with os.scandir(files) as entries:
        return any(re.fullmatch(r"p1\d", e.name) and e.is_dir() for e in itertools.islice(entries, 50))


def read_folder(root: Path, name: str, report_sections: str = "findings+impression") -> Dataset:
    """One record per image of every study that has a report, in path order.

    `report_sections`: "findings", "impression", "findings+impression" (default) or "all" (the whole
    report); a study without the chosen sections is captioned with its IMPRESSION, else its whole
    report, and listed in the warnings.
    """
    check_sections(report_sections)
    split_file = next((root / n for n in SPLIT_FILES if (root / n).is_file()), None)
    by_dicom, by_study = read_split_file(split_file) if split_file else ({}, {})
    by_subject: dict[str, str] = {}  # a subject keeps one split: its studies never straddle train and test
    records: list[Record] = []
    no_report: list[str] = []
    no_report_images = 0
    fell_back: list[str] = []
    hashed = 0
    key = load_path_key(create=True)
    for study_dir in _study_dirs(root / "files"):
        images = _images(study_dir)
        if not images:
            continue
        rel_study = study_dir.relative_to(root).as_posix()
        report = _report(root, study_dir)
        text = read_text(report) if report else ""
        sections, whole = parse_report(text)
        if not whole:
            no_report.append(rel_study)
            no_report_images += len(images)
            continue
        caption, fallback = choose_caption(sections, whole, report_sections)
        if fallback:
            fell_back.append(rel_study)
        study_number = study_dir.name[1:]
        subject = study_dir.parent.name
        for image in images:
            split = by_dicom.get(image.stem) or by_study.get(study_number)
            if split is None:  # not listed: the split of the subject's other studies, else a hash of the subject
                split = by_subject.get(subject) or hash_split(subject)
                hashed += 1
            by_subject.setdefault(subject, split)
            rel = image.relative_to(root).as_posix()
            image_id = key.image_id(rel)
            records.append(Record(image_id, str(image), (caption,), (), split))
    warnings = []
    if hashed:
        why = (f"{hashed} image(s) of studies not listed in {split_file.name}" if split_file
               else f"no {SPLIT_FILES[1]}[.gz]: {hashed} image(s)")
        warnings.append(f"{root}: {why} split 80/10/10 train/valid/test by a hash of the subject id (all studies "
                        "of a patient in one split, the split of its listed studies when it has some)")
    if no_report:
        shown = ", ".join(no_report[:MAX_LINES_LISTED]) + (", ..." if len(no_report) > MAX_LINES_LISTED else "")
        warnings.append(f"{root}: skipped {no_report_images} image(s) of {len(no_report)} studies without a report "
                        f"(looked in {', '.join(REPORT_TREES)}): {shown}")
    if fell_back:
        warnings.append(fallback_warning(str(root), "studies", report_sections, fell_back))
    # the paths hold subject and study numbers: the cache keeps only the hashed id (see records.Dataset)
    return Dataset(name, str(root), NAME, records, {}, warnings=warnings, private_paths=True, id_key=key.key_id)


def _subdirs(folder: Path, pattern: str) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if re.fullmatch(pattern, e.name) and e.is_dir())


def _study_dirs(files: Path) -> list[Path]:
    """files/pXX/pNNNNNNNN/sNNNNNNNN, sorted."""
    if not files.is_dir():
        return []
    return [study for group in _subdirs(files, r"p\d+") for subject in _subdirs(group, r"p\d+")
            for study in _subdirs(subject, r"s\d+")]


def _images(study_dir: Path) -> list[Path]:
    """The study's images, one per stem (.jpg before .dcm when both are there), sorted by name."""
    chosen: dict[str, Path] = {}
    with os.scandir(study_dir) as entries:
        found = [Path(e.path) for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()]
    for image in sorted(found, key=lambda p: IMAGE_EXTENSIONS.index(p.suffix.lower())):
        chosen.setdefault(image.stem, image)
    return [chosen[s] for s in sorted(chosen)]


def _report(root: Path, study_dir: Path) -> Path | None:
    rel = study_dir.relative_to(root / "files").with_suffix(".txt")
    return next((root / tree / rel for tree in REPORT_TREES if (root / tree / rel).is_file()), None)


def read_split_file(path: Path, max_bytes: int = inflate_limit()) -> tuple[dict[str, str], dict[str, str]]:
    """(dicom_id -> split, study_id -> split) of the official split file; an image missing from it
    takes its study's split, so a study never straddles splits. A gzipped one is inflated to at most
    `max_bytes` (the decoders' limit: the real file inflates to about 40 MB)."""
    if path.suffix == ".gz":
        try:
            text = inflate(path.read_bytes(), GZIP_WBITS, max_bytes, "the gzipped split file").decode("utf-8-sig")
        except DecompressionBomb as e:
            raise DatasetError(f"{path}: {e}") from None
        except (OSError, CorruptStream, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: cannot read the gzipped split file ({e})") from None
    else:
        text = read_text(path)
    reader = LongFieldReader(io.StringIO(text, newline=""), len(text))
    try:
        return _split_rows(path, reader)
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None


def _split_rows(path: Path, reader: Any) -> tuple[dict[str, str], dict[str, str]]:
    header = next(reader, [])
    cols = [find_column(header, (c,)) for c in ("dicom_id", "study_id", "split")]
    if None in cols:
        raise DatasetError(f"{path}:1: missing required column(s) dicom_id, study_id, split (header is: {', '.join(header)})")
    dicom_col, study_col, split_col = cols
    by_dicom: dict[str, str] = {}
    by_study: dict[str, str] = {}
    for row in reader:
        if not any(f.strip() for f in row):
            continue
        if len(row) <= max(cols):
            raise DatasetError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(row)}")
        split = OFFICIAL_SPLITS.get(row[split_col].strip().lower())
        if split is None:
            raise DatasetError(f"{path}:{reader.line_num}: unknown split {row[split_col]!r} "
                               f"(expected train, validate or test)")
        study = row[study_col].strip().lstrip("s")
        by_dicom[row[dicom_col].strip()] = split
        by_study.setdefault(study, split)
    return by_dicom, by_study
