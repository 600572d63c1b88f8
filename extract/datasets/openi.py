"""IU X-ray / OpenI (Indiana University chest X-rays): one XML per report (e.g. `ecgen-radiology/*.xml`,
any folder of *.xml) with `<AbstractText Label="FINDINGS">`, `<AbstractText Label="IMPRESSION">`, one
`<parentImage id="CXR1_1_IM-0001-3001">` per view and MeSH terms (`<MeSH><major>`, `<minor>`); images as
PNG named by that id (e.g. `NLMCXR_png/CXR1_1_IM-0001-3001.png`) anywhere under the folder.

Get it from https://openi.nlm.nih.gov/faq (NLMCXR_reports.tgz and NLMCXR_png.tgz), unpacked side by side.

One record per view, named by its parentImage id; the views of one report share its caption (the
chosen `report_sections`, as for MIMIC-CXR) and its MeSH terms, which are the concepts (each term is
its own id and name). There is no official split: reports are split 80/10/10 by a hash of the report
file's path, so the views of one report stay together.
"""
from __future__ import annotations

import itertools
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from medembed.extract.datasets.base import MAX_LINES_LISTED, DatasetError
from medembed.extract.datasets.mimic_cxr import check_sections, choose_caption, collapse, fallback_warning, hash_split
from medembed.extract.records import Dataset, Record

NAME = "openi"
LOOKS_FOR = "report *.xml files with <parentImage> (in the folder or a subfolder)"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # one file per stem, the first found in this order
SNIFF_BYTES = 1 << 16


def detect(folder: Path, names: list[str]) -> bool:
    """One *.xml of the folder, else of each subfolder, whose first 64 KiB mention parentImage."""
    candidates = [folder / n for n in sorted(names) if _is_xml(n)][:1]
    if not candidates:
        with os.scandir(folder) as entries:
            subfolders = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
        for sub in subfolders[:20]:
            with os.scandir(sub) as entries:
                head = itertools.islice(entries, 200)  # a folder of 100k images is not listed whole
                first = next((e.path for e in head if _is_xml(e.name) and e.is_file()), None)
            if first:
                candidates.append(Path(first))
    for path in candidates:
        try:
            with open(path, "rb") as f:
                if b"<parentImage" in f.read(SNIFF_BYTES):
                    return True
        except OSError:
            continue
    return False


def _is_xml(name: str) -> bool:
    return name.lower().endswith(".xml") and not name.startswith("._")  # ._*: macOS resource forks


def read_folder(root: Path, name: str, report_sections: str = "findings+impression") -> Dataset:
    """Every report XML under the folder, paired with its PNGs by parentImage id."""
    check_sections(report_sections)
    reports, images = _walk(root)
    records: list[Record] = []
    concept_names: dict[str, str] = {}
    first_report: dict[str, Path] = {}
    skipped: list[str] = []
    fell_back: list[str] = []
    default_dir = next(iter(images.values())).parent if images else root
    for path in reports:
        rel = path.relative_to(root).as_posix()
        ids, sections, whole, terms = _parse(path)
        if not ids or not whole:
            skipped.append(rel)
            continue
        caption, fallback = choose_caption(sections, whole, report_sections)
        if fallback:
            fell_back.append(rel)
        for term in terms:
            concept_names[term] = term
        split = hash_split(rel)
        for image_id in ids:
            if image_id in first_report:
                raise DatasetError(f"{path}: image {image_id!r} is also in {first_report[image_id]}")
            first_report[image_id] = path
            location = images.get(image_id) or default_dir / f"{image_id}.png"  # missing: the extractor reports it
            records.append(Record(image_id, str(location), (caption,), tuple(terms), split))
    warnings = []
    if records:
        warnings.append(f"{root}: no official split: reports split 80/10/10 train/valid/test by a hash of the report's path")
    if skipped:
        shown = ", ".join(skipped[:MAX_LINES_LISTED]) + (", ..." if len(skipped) > MAX_LINES_LISTED else "")
        warnings.append(f"{root}: skipped {len(skipped)} report(s) with no images or no text: {shown}")
    if fell_back:
        warnings.append(fallback_warning(str(root), "reports", report_sections, fell_back))
    return Dataset(name, str(root), NAME, records, concept_names, warnings=warnings)


def _walk(root: Path) -> tuple[list[Path], dict[str, Path]]:
    """(every report XML, image stem -> image file) under the folder, both sorted by path."""
    reports: list[Path] = []
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if _is_xml(f):
                reports.append(Path(folder) / f)
            elif f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("._"):
                found.append(Path(folder) / f)
    images: dict[str, Path] = {}
    for image in sorted(found, key=lambda p: IMAGE_EXTENSIONS.index(p.suffix.lower())):
        images.setdefault(image.stem, image)
    return reports, images


def _parse(path: Path) -> tuple[list[str], dict[str, str], str, list[str]]:
    """(parentImage ids, LABEL -> text, all labelled sections as one text, MeSH terms) of one report."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DatasetError(f"{path}:{e.position[0]}: malformed XML: {e}") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    ids = []
    for node in tree.iter("parentImage"):
        image_id = (node.get("id") or "").strip()
        if image_id and image_id not in ids:
            ids.append(image_id)
    sections: dict[str, str] = {}
    parts = []
    for node in tree.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        text = collapse("".join(node.itertext()))
        if text:
            sections[label] = f"{sections[label]} {text}" if label in sections else text
            parts.append(f"{label}: {text}" if label else text)
    terms = []
    for mesh in tree.iter("MeSH"):
        for node in mesh:
            term = collapse(node.text or "")
            if term and term not in terms:
                terms.append(term)
    return ids, sections, " ".join(parts), terms
