"""Image-only collections: a folder (and its subfolders) of images with no captions at all, e.g. a
DICOM export from the archive. Every image becomes one record of the split `all`, identified by its
path relative to the folder, so the collection can be extracted and then searched by text or by
image with any trained run; evaluation, which needs captions, says so instead of failing later.

Recognised by suffix (JPEG, PNG, TIFF, WebP, BMP, DICOM .dcm/.dicom, NIfTI .nii/.nii.gz) or, for
DICOM files without a known suffix (archives write them bare, or named by their SOP Instance UID), by
the "DICM" marker of Part 10 files. Archive exports name folders by patient name or ID and files by
UID, so `load_dataset` identifies the records of this layout by a keyed hash of their path and the
cache keeps no path (see `records.Dataset.private_paths`), unless the user asks for readable paths.
The walk keeps to the data folder (`access.walk`): a link leading out of it is refused and counted,
unless links are followed.
Tried last: a folder that also holds a CSV/TSV/JSONL file is never taken for an image-only one, so
an annotations file with misnamed columns is reported rather than silently ignored.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from medembed.extract.access import Refusals, walk
from medembed.extract.datasets.base import ANNOTATION_EXTENSIONS, SYNTHETIC_MARKER
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
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


def dicom_marker(path: str) -> bool:
    """Whether a file starts as a DICOM Part 10 file does (its 132 first bytes read)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_image(path: str, name: str) -> bool:
    return _has_image_suffix(name) or dicom_marker(path)  # 132 bytes read of a file with another suffix


UID = re.compile(r"^\d+(\.\d+){3,}$")  # a DICOM UID: dotted digits, e.g. 1.2.840.113619.2.55.3.604688


def _holds_uid(rel: str) -> bool:
    parts = rel.split("/")
    return any(UID.match(p) or UID.match(p.rsplit(".", 1)[0]) for p in parts)


def _walk(folder: Path, follow_links: bool = False):
    """Every non-hidden file (`access.Entry`), in a stable order."""
    return walk(str(folder), follow_links, hidden=False)


def detect(folder: Path, names: list[str]) -> bool:
    if any(n.lower().endswith(ANNOTATION_EXTENSIONS) for n in names):
        return False
    for seen, entry in enumerate(_walk(folder)):
        if seen >= DETECT_LIMIT:
            return False
        if _has_image_suffix(entry.rel) or (entry.refusal is None and dicom_marker(entry.path)):
            return True  # a refused entry (a link out of the folder, a pipe) is never opened
    return False


def read_folder(folder: Path, name: str, follow_links: bool = False) -> Dataset:
    """Every image file under the folder, walked in a stable order and streamed into a `RecordTable`,
    each identified by its path below the folder (`load_dataset` hashes these); what the walk may not
    read (links out of the folder, pipes) is counted in `Dataset.refused`."""
    builder, uids, refused = RecordTableBuilder(), False, Refusals()
    for entry in _walk(folder, follow_links):
        base = os.path.basename(entry.rel)
        if entry.refusal is not None:
            refused.add(entry.rel, entry.refusal)
        elif base != SYNTHETIC_MARKER and _is_image(entry.path, base):
            uids = uids or _holds_uid(entry.rel)
            builder.append(Record(entry.rel, entry.path, (), (), SPLIT))
    return Dataset(name, str(folder), NAME, builder.finish(), {}, private_paths=uids, refused=refused,
                   follow_links=follow_links)
