"""Where an image's bytes are, written as one string that caches and the search page store.

    /data/a/image.png                        a file
    /data/train.zip::train/image.png         a member of a container (zip, tar shard, parquet row)
    /data/study/ct.dcm::frame=12             one frame of a multi-frame DICOM, one slice of a volume
    /data/shard-0001.tar::k0001.dcm::frame=3 both
    /data/pacs::private:KEYID:3f2a9c...      an image whose path identifies a patient, by its keyed id

A plain file never needs the separator; a frame is only ever written by the dataset reader that
expanded a multi-frame file into one record per frame. A private location names the data folder, the
id of the path key (`path_key`) and the record's id, an HMAC of the image's path below that folder:
the path is found again by hashing the folder's file paths (and, when not found among them, its zip
and tar members) with the same key, once per process, so caches, exports and the page never hold it.
Caches made before ids were keyed hold `private:ID`, a plain sha256 (`path_hash`), still resolved.

Every read through a location may be bound to a data folder's rule (`access.DataAccess`): the file
or container it resolves to must stay inside the folder. A private location is always bound to the
folder it names.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Callable

from medembed.cache.schema import PRIVATE_LOCATION, ZIP_SEP
from medembed.extract.access import NOT_REGULAR, DataAccess, name_problem, walk
from medembed.extract.containers import is_container, member_size, read_member
from medembed.extract.limits import inflate_limit
from medembed.extract.path_key import check_key_id, load_path_key

_FRAME = re.compile(re.escape(ZIP_SEP) + r"frame=(\d+)$")
_PRIVATE = ZIP_SEP + PRIVATE_LOCATION
_LISTED = (".zip", ".tar")  # containers whose member names are paths (a parquet member is a row number)


def path_hash(relative: str) -> str:
    """The unkeyed id of caches made before ids were keyed: 16 hex digits of the sha256 of the path
    relative to the data folder. Only resolved, never made any more (see `path_key`)."""
    return hashlib.sha256(relative.encode()).hexdigest()[:16]


def private_location(image_id: str, key_id: str) -> str:
    """What a cache keeps as the location of a record identified by a keyed hash of its path."""
    return f"{PRIVATE_LOCATION}{key_id}:{image_id}"


def relative_location(location: str, root: str) -> str:
    """A location below `root`, "/"-separated, as ids are hashed from: "a/b.dcm", "shards/0.tar::k.dcm"."""
    path, sep, member = location.partition(ZIP_SEP)
    return os.path.relpath(path, root).replace(os.sep, "/") + sep + member


class _Found:
    """id -> location of one data folder under one hash; the containers' members are hashed the first
    time an id is not among the files."""

    def __init__(self, root: str, hasher: Callable[[str], str], follow_links: bool) -> None:
        self.hasher = hasher
        self.ids: dict[str, str] = {}
        self.containers: list[tuple[str, str]] | None = []
        for entry in walk(root, follow_links):
            if entry.refusal == NOT_REGULAR:
                continue
            self.ids[hasher(entry.rel)] = entry.path  # a link leading outside is refused when it is read
            if entry.refusal is None and entry.rel.lower().endswith(_LISTED):
                self.containers.append((entry.path, entry.rel))

    def get(self, image_id: str) -> str | None:
        if image_id not in self.ids and self.containers:
            for path, rel in self.containers:
                for member in _member_names(path):
                    self.ids[self.hasher(f"{rel}{ZIP_SEP}{member}")] = f"{path}{ZIP_SEP}{member}"
            self.containers = None
        return self.ids.get(image_id)


def _member_names(path: str) -> list[str]:
    """The file members of a zip or tar with names that may identify a record; [] when unreadable."""
    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
        else:
            with tarfile.open(path, mode="r:") as tf:
                names = [m.name for m in tf if m.isfile()]
    except (OSError, zipfile.BadZipFile, tarfile.TarError):
        return []
    return [n for n in names if name_problem(n) is None]


class _PrivatePaths:
    """id -> location of the data folders holding private paths, built once per process and key."""

    def __init__(self) -> None:
        self._maps: dict[tuple, _Found] = {}
        self._lock = threading.Lock()

    def resolve(self, root: str, token: str, follow_links: bool = False) -> str:
        """The location of `token` ("KEYID:ID", or a legacy "ID") in the data folder `root`."""
        key_id, _, image_id = token.rpartition(":")
        if key_id:
            key = load_path_key()
            check_key_id(key, key_id, root)
            hasher: Callable[[str], str] = key.image_id
        else:
            hasher = path_hash
        found_key = (os.getpid(), os.path.abspath(root), key_id, follow_links)
        with self._lock:
            if found_key not in self._maps:
                self._maps[found_key] = _Found(root, hasher, follow_links)
            found = self._maps[found_key].get(image_id)
        if found is None:
            raise FileNotFoundError(f"{root}: no image of id {image_id} (the data folder changed since extraction)")
        return found


_PRIVATE_PATHS = _PrivatePaths()


def frame_of(location: str) -> int | None:
    m = _FRAME.search(location)
    return int(m.group(1)) if m else None


def with_frame(location: str, frame: int) -> str:
    return f"{location}{ZIP_SEP}frame={int(frame)}"


def split_location(location: str, access: DataAccess | None = None) -> tuple[str, str | None, int | None]:
    """(file or container, member inside the container or None, frame or None). With `access` (and
    always for a private location, bound to the folder it names), OutsideDataFolder when the file or
    container lies outside the data folder."""
    m = _FRAME.search(location)
    frame = int(m.group(1)) if m else None
    rest = location[: m.start()] if m else location
    if _PRIVATE in rest:
        root, token = rest.split(_PRIVATE, 1)
        access = access if access is not None else DataAccess(root)
        rest = _PRIVATE_PATHS.resolve(root, token, access.follow_links)
    path, member = rest, None
    start = 0
    while (at := rest.find(ZIP_SEP, start)) >= 0:  # the first "::" after a container (a folder may hold "::")
        if is_container(rest[:at]):
            path, member = rest[:at], rest[at + len(ZIP_SEP):]
            break
        start = at + len(ZIP_SEP)
    if access is not None:
        access.check(path)
    return path, member, frame


def image_size(location: str, access: DataAccess | None = None) -> int:
    """Byte size of the file or container member; -1 when it does not exist (or cannot be found), or,
    with `access`, when the rule refuses the file or container (its zip index or parquet row groups
    are then never opened)."""
    try:
        path, member, _ = split_location(location, access)
    except OSError:
        return -1
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


def read_image_bytes(location: str, access: DataAccess | None = None) -> bytes | bytearray:
    path, member, _ = split_location(location, access)
    return read_at(path, member)


def read_at(path: str, member: str | None, max_bytes: int = inflate_limit()) -> bytes | bytearray:
    """The bytes of a file, or of a member of the container at `path` (see `split_location`); a
    compressed member is inflated to at most `max_bytes` (DecompressionBomb beyond) into a bytearray
    returned as it is (decoders read it through `limits.BufferStream`, never a copy)."""
    if member is not None:
        return read_member(path, member, max_bytes)
    with open(path, "rb") as f:
        return f.read()
