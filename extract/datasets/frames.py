"""Which frames of multi-frame DICOM files and which slices of NIfTI volumes become records.

`middle` (the default) keeps one record per file and lets the decoder take the middle frame or the
middle axial slice: one picture per study, as a caption describes it. `all` makes one record per
frame or slice, `N` one per N evenly spaced ones (the centre of each of N equal stretches), each
sharing the file's captions and concepts and named `ID::frame=K` like its location. Only files that
are DICOM or NIfTI are opened (their headers only); everything else passes through unchanged.
"""
from __future__ import annotations

from dataclasses import replace

from medembed.common.errors import BadOption
from medembed.extract.access import DataAccess
from medembed.extract.imaging.dicom import frame_count, is_dicom
from medembed.extract.imaging.locations import read_at, split_location, with_frame
from medembed.extract.imaging.nifti import is_nifti, nifti_slice_count
from medembed.extract.record_table import RecordTableBuilder
from medembed.extract.records import Dataset

DEFAULT_FRAMES = "middle"


class FramesError(BadOption):
    pass


def parse_frames(text: str) -> str | int:
    """"middle", "all", or a whole number >= 1 of evenly spaced frames; FramesError otherwise."""
    value = str(text).strip().lower()
    if value in ("middle", "all"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise FramesError(f"--frames {text!r}: expected middle, all, or a whole number of frames >= 1")
    return n


def chosen_frames(n_frames: int, spec: str | int) -> list[int]:
    if spec == "all":
        return list(range(n_frames))
    if spec == "middle":
        return [n_frames // 2]
    k = min(int(spec), n_frames)
    return [int((i + 0.5) * n_frames / k) for i in range(k)]


def _frames_of(location: str, access: DataAccess | None = None) -> int:
    """Frames (DICOM) or axial slices (NIfTI) of an image; 1 for anything else or what cannot be read
    or may not be (the decoder reports the problem with the record, where it is counted)."""
    try:
        path, member, frame = split_location(location, access)
    except (OSError, ValueError):
        return 1
    name = member or path
    if frame is not None or (member is not None and is_nifti(name)):
        return 1
    try:
        if is_nifti(name):
            return nifti_slice_count(path)  # from the header alone
        if member is not None:  # a container member is read whole anyway
            data = read_at(path, member)
            return max(frame_count(data), 1) if is_dicom(data, name) else 1
        with open(path, "rb") as f:
            head = f.read(132)
        return max(frame_count(path), 1) if is_dicom(head, name) else 1  # the header, not the pixels
    except Exception:  # noqa: BLE001 - unreadable: one record, reported when it is decoded
        return 1


def expand_frames(dataset: Dataset, spec: str | int) -> Dataset:
    """The dataset with multi-frame files expanded per `spec` (unchanged for `middle`)."""
    if spec == DEFAULT_FRAMES:
        return dataset
    records, access = RecordTableBuilder(), dataset.access  # one rule for all (each `access` resolves the root)
    for rec in dataset.records:
        n = _frames_of(rec.image, access)
        if n <= 1:
            records.append(rec)
            continue
        records.extend(replace(rec, image_id=with_frame(rec.image_id, k), image=with_frame(rec.image, k))
                       for k in chosen_frames(n, spec))
    return replace(dataset, records=records.finish())
