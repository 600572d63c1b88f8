"""Where an image's bytes are, written as one string that caches and the search page store.

    /data/a/image.png                        a file
    /data/train.zip::train/image.png         a member of a container (zip, tar shard, parquet row)
    /data/study/ct.dcm::frame=12             one frame of a multi-frame DICOM, one slice of a volume
    /data/shard-0001.tar::k0001.dcm::frame=3 both

A plain file never needs the separator; a frame is only ever written by the dataset reader that
expanded a multi-frame file into one record per frame.
"""
from __future__ import annotations

import os
import re

from medembed.cache.schema import ZIP_SEP
from medembed.extract.containers import is_container, member_size, read_member

_FRAME = re.compile(re.escape(ZIP_SEP) + r"frame=(\d+)$")


def frame_of(location: str) -> int | None:
    m = _FRAME.search(location)
    return int(m.group(1)) if m else None


def with_frame(location: str, frame: int) -> str:
    return f"{location}{ZIP_SEP}frame={int(frame)}"


def split_location(location: str) -> tuple[str, str | None, int | None]:
    """(file or container, member inside the container or None, frame or None)."""
    m = _FRAME.search(location)
    frame = int(m.group(1)) if m else None
    rest = location[: m.start()] if m else location
    if ZIP_SEP in rest:
        container, member = rest.split(ZIP_SEP, 1)
        if is_container(container):
            return container, member, frame
    return rest, None, frame


def image_size(location: str) -> int:
    """Byte size of the file or container member; -1 when it does not exist."""
    path, member, _ = split_location(location)
    if member is not None:
        return member_size(path, member)
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def fingerprint_size(location: str) -> int:
    """The size a dataset fingerprint records for an image: its own size, except for a parquet row,
    whose size is only known by reading the shard's image column; there the shard's size stands in
    (any edit to the shard changes it)."""
    path, member, _ = split_location(location)
    if member is not None and path.lower().endswith(".parquet"):
        try:
            return os.path.getsize(path)
        except OSError:
            return -1
    return image_size(location)


def read_image_bytes(location: str) -> bytes:
    path, member, _ = split_location(location)
    if member is not None:
        return read_member(path, member)
    with open(path, "rb") as f:
        return f.read()
