"""Where an image's bytes are, written as one string that caches and the search page store.

    /data/a/image.png                        a file
    /data/train.zip::train/image.png         a member of a container (zip, tar shard, parquet row)
    /data/study/ct.dcm::frame=12             one frame of a multi-frame DICOM, one slice of a volume
    /data/shard-0001.tar::k0001.dcm::frame=3 both
    /data/mimic::private:3f2a9c...           an image whose path identifies a patient, by its hashed id

A plain file never needs the separator; a frame is only ever written by the dataset reader that
expanded a multi-frame file into one record per frame. A private location names the data folder and
the record's id only, a hash of the image's path relative to that folder (`path_hash`): the path is
found again by hashing the folder's file paths (once per process), so caches, exports and the page
never hold it.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading

from medembed.cache.schema import PRIVATE_LOCATION, ZIP_SEP
from medembed.extract.containers import is_container, member_size, read_member

_FRAME = re.compile(re.escape(ZIP_SEP) + r"frame=(\d+)$")
_PRIVATE = ZIP_SEP + PRIVATE_LOCATION


def path_hash(relative: str) -> str:
    """The id of an image whose path identifies a patient: 16 hex digits of the sha256 of its path
    relative to the data folder (with "/" separators)."""
    return hashlib.sha256(relative.encode()).hexdigest()[:16]


class _PrivatePaths:
    """path_hash -> file of the data folders holding private paths, built once per process."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, str], dict[str, str]] = {}
        self._lock = threading.Lock()

    def resolve(self, root: str, image_id: str) -> str:
        key = (os.getpid(), os.path.abspath(root))
        with self._lock:
            if key not in self._maps:
                found: dict[str, str] = {}
                for folder, dirs, files in os.walk(root):
                    dirs.sort()
                    for name in files:
                        full = os.path.join(folder, name)
                        found[path_hash(os.path.relpath(full, root).replace(os.sep, "/"))] = full
                self._maps[key] = found
            found = self._maps[key].get(image_id)
        if found is None:
            raise FileNotFoundError(f"{root}: no image of id {image_id} (the data folder changed since extraction)")
        return found


_PRIVATE_PATHS = _PrivatePaths()


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
    if _PRIVATE in rest:
        root, image_id = rest.split(_PRIVATE, 1)
        rest = _PRIVATE_PATHS.resolve(root, image_id)
    start = 0
    while (at := rest.find(ZIP_SEP, start)) >= 0:  # the first "::" after a container (a folder may hold "::")
        if is_container(rest[:at]):
            return rest[:at], rest[at + len(ZIP_SEP):], frame
        start = at + len(ZIP_SEP)
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
    return read_at(path, member)


def read_at(path: str, member: str | None) -> bytes:
    """The bytes of a file, or of a member of the container at `path` (see `split_location`)."""
    if member is not None:
        return read_member(path, member)
    with open(path, "rb") as f:
        return f.read()
