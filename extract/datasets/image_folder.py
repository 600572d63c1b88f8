"""Image-only collections: a folder (and its subfolders) of images with no captions at all, e.g. a
DICOM export from the archive. Every image becomes one record of the split `all`, identified by its
path relative to the folder, so the collection can be extracted and then searched by text or by
image with any trained run; evaluation, which needs captions, says so instead of failing later.

Recognised by suffix (JPEG, PNG, TIFF, WebP, BMP, DICOM .dcm/.dicom, NIfTI .nii/.nii.gz) or, for
DICOM files without a known suffix (archives write them bare, or named by their SOP Instance UID), by
the "DICM" marker of Part 10 files. When a path holds a DICOM UID (a file or folder named by one),
the paths identify studies: every record is then identified by a hash of its path instead, and the
cache keeps no path (see `records.Dataset.private_paths`).
Tried last: a folder that also holds a CSV/TSV/JSONL file is never taken for an image-only one, so
an annotations file with misnamed columns is reported rather than silently ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from medembed.extract.datasets.base import ANNOTATION_EXTENSIONS, SYNTHETIC_MARKER
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
from medembed.extract.imaging.locations import path_hash
from medembed.extract.imaging.nifti import NIFTI_SUFFIXES
from medembed.extract.imaging.raster import RASTER_SUFFIXES
from medembed.extract.record_table import RecordTableBuilder
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
    return _has_image_suffix(name) or _dicom_marker(path)  # 132 bytes read of a file with another suffix


UID = re.compile(r"^\d+(\.\d+){3,}$")  # a DICOM UID: dotted digits, e.g. 1.2.840.113619.2.55.3.604688


def _holds_uid(rel: str) -> bool:
    parts = rel.split("/")
    return any(UID.match(p) or UID.match(p.rsplit(".", 1)[0]) for p in parts)


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
    """Every image file under the folder, walked in a stable order and streamed into a `RecordTable`;
    when any path holds a DICOM UID, every record is then renamed by a hash of its path."""
    builder, private = RecordTableBuilder(), False
    for full, rel in _walk(folder):
        if os.path.basename(rel) != SYNTHETIC_MARKER and _is_image(full, os.path.basename(rel)):
            private = private or _holds_uid(rel)
            builder.append(Record(rel, full, (), (), SPLIT))
    records = builder.finish()
    if private:
        records = records.replace_column("image_id", path_hash)
    warnings = [f"{folder}: paths hold DICOM UIDs, which identify studies: records are named by a hash of their "
                "path and the cache keeps no path"] if private else []
    return Dataset(name, str(folder), NAME, records, {}, warnings=warnings, private_paths=private)



