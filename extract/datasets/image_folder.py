"""Image-only collections: a folder (and its subfolders) of images with no captions at all, e.g. a
DICOM export from the archive. Every image becomes one record of the split `all`, identified by its
path relative to the folder, so the collection can be extracted and then searched by text or by
image with any trained run; evaluation, which needs captions, says so instead of failing later.

Recognised by suffix (JPEG, PNG, TIFF, WebP, BMP, DICOM .dcm/.dicom, NIfTI .nii/.nii.gz) or, for
DICOM files without a suffix (as archives often write them), by the "DICM" marker of Part 10 files.
Tried last: a folder that also holds a CSV/TSV/JSONL file is never taken for an image-only one, so
an annotations file with misnamed columns is reported rather than silently ignored.
"""
from __future__ import annotations

import os
from pathlib import Path

from medembed.extract.datasets.base import ANNOTATION_EXTENSIONS, SYNTHETIC_MARKER
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
from medembed.extract.imaging.nifti import NIFTI_SUFFIXES
from medembed.extract.imaging.raster import RASTER_SUFFIXES
from medembed.extract.records import Dataset, Record

NAME = "images"
SPLIT = "all"
LOOKS_FOR = "image files (JPEG, PNG, TIFF, DICOM, NIfTI) and no annotations file, for an image-only collection"
SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
DETECT_LIMIT = 2000  # files looked at before deciding a folder holds no image


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _dicom_marker(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_image(path: str, name: str) -> bool:
    if _has_image_suffix(name):
        return True
    return "." not in name.lstrip(".") and _dicom_marker(path)  # suffix-less files only: cheap and safe


def _walk(folder: Path):
    """(absolute path, relative posix path) of every non-hidden file, in a stable order."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                full = os.path.join(root, name)
                yield full, os.path.relpath(full, folder).replace(os.sep, "/")


def detect(folder: Path, names: list[str]) -> bool:
    if any(n.lower().endswith(ANNOTATION_EXTENSIONS) for n in names):
        return False
    for seen, (full, rel) in enumerate(_walk(folder)):
        if seen >= DETECT_LIMIT:
            return False
        if _is_image(full, os.path.basename(rel)):
            return True
    return False


def read_folder(folder: Path, name: str) -> Dataset:
    records = [
        Record(rel, full, (), (), SPLIT)
        for full, rel in _walk(folder)
        if os.path.basename(rel) != SYNTHETIC_MARKER and _is_image(full, os.path.basename(rel))
    ]
    return Dataset(name, str(folder), NAME, records, {})
