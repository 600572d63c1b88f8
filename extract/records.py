"""The one record type every dataset layout is read into.

Readers differ in file formats; everything downstream (cache, adapt, evaluate) only ever sees
`Record` and `Dataset`, so a new layout is one new reader and nothing else.

Images may live inside a zip archive (ImageCLEF ships `resized_train.zip`); such a location is written
"ARCHIVE.zip::member/inside.jpg" and read without unpacking. Opening a ZipFile parses the whole central
directory, which for a 100k-member archive costs far more than decoding one image, so open archives are
kept per process (see `_ZipHandles`).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field

from PIL import Image

from medembed.cache.schema import ZIP_SEP as ZIP_SEP  # re-exported: the location form readers write
from medembed.common.errors import MedembedError
from medembed.common.splits import sort_splits


@dataclass(frozen=True)
class Record:
    image_id: str
    image: str  # a file path, or "ARCHIVE.zip::member/inside.jpg" for an image read out of a zip
    captions: tuple[str, ...]
    concepts: tuple[str, ...]
    split: str


@dataclass
class Dataset:
    name: str
    root: str
    layout: str
    records: list[Record]
    concept_names: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)  # data problems that were tolerated (e.g. empty captions dropped)

    @property
    def splits(self) -> list[str]:
        return sort_splits({r.split for r in self.records})

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def split_overlaps(self) -> list[tuple[str, tuple[str, ...]]]:
        """Images found in more than one split, by id or by file: (id or file, the splits). Such an
        image leaks the test split into training and inflates every test number."""
        by_id: dict[str, set[str]] = {}
        by_file: dict[str, tuple[set[str], set[str]]] = {}  # file -> (its splits, its ids)
        for r in self.records:
            by_id.setdefault(r.image_id, set()).add(r.split)
            splits, ids = by_file.setdefault(r.image, (set(), set()))
            splits.add(r.split)
            ids.add(r.image_id)
        out = [(f"id {i}", tuple(sort_splits(s))) for i, s in by_id.items() if len(s) > 1]
        leaked = {i for i, s in by_id.items() if len(s) > 1}
        out += [(f"file {f}", tuple(sort_splits(s))) for f, (s, ids) in by_file.items()
                if len(s) > 1 and not ids <= leaked]  # one file under other ids in other splits
        return out

    def concept_vocab(self) -> list[str]:
        """All concepts of the dataset (every split, plus named ones), so splits share columns."""
        seen = set(self.concept_names)
        for r in self.records:
            seen.update(r.concepts)
        return sorted(seen)

    def fingerprint(self) -> str:
        """sha256 over annotations and image names+sizes: cheap for millions of images, yet any
        edit to a caption, a label, a split assignment or an image file's size changes it."""
        h = hashlib.sha256()
        h.update(self.layout.encode())
        for r in sorted(self.records, key=lambda r: (r.split, r.image_id)):
            h.update(f"{r.split}\x1f{r.image_id}\x1f{os.path.basename(r.image)}\x1f{image_size(r.image)}".encode())
            h.update("\x1e".join(r.captions).encode())
            h.update(";".join(r.concepts).encode())
        for k in sorted(self.concept_names):
            h.update(f"{k}\x1f{self.concept_names[k]}".encode())
        return h.hexdigest()


class _ZipHandles:
    """Open ZipFile objects, one set per process.

    Keyed by (pid, path): a DataLoader worker forked from a parent that already opened the archive
    must not share the parent's file offset, so each process opens its own handle on first use.
    The archive's mtime and size are checked on every lookup so a rewritten archive is reopened
    instead of read through a stale central directory. Few archives are ever in use at once, so a
    small LRU bound keeps file descriptors in check.
    """

    def __init__(self, capacity: int = 8) -> None:
        self._capacity = capacity
        self._open: OrderedDict[tuple[int, str], tuple[tuple[int, int], zipfile.ZipFile]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, archive: str) -> zipfile.ZipFile:
        st = os.stat(archive)
        signature = (st.st_mtime_ns, st.st_size)
        key = (os.getpid(), os.path.abspath(archive))
        with self._lock:
            cached = self._open.get(key)
            if cached is not None and cached[0] == signature:
                self._open.move_to_end(key)
                return cached[1]
            if cached is not None:
                del self._open[key]
                cached[1].close()
            handle = zipfile.ZipFile(archive)
            self._open[key] = (signature, handle)
            while len(self._open) > self._capacity:
                (pid, _), (_, old) = self._open.popitem(last=False)
                if pid == os.getpid():  # a handle inherited from the parent is the parent's to close
                    old.close()
            return handle


_ZIPS = _ZipHandles()


def split_location(location: str) -> tuple[str, str | None]:
    """("archive.zip", "member") for a zip location, (path, None) for a plain file."""
    if ZIP_SEP in location:
        archive, member = location.split(ZIP_SEP, 1)
        return archive, member
    return location, None


def image_size(location: str) -> int:
    """Byte size of an image file or zip member; -1 when it does not exist."""
    archive, member = split_location(location)
    if member is not None:
        try:
            return _ZIPS.get(archive).getinfo(member).file_size
        except (KeyError, OSError, zipfile.BadZipFile):
            return -1
    try:
        return os.path.getsize(location)
    except OSError:
        return -1


def read_image_bytes(location: str) -> bytes:
    archive, member = split_location(location)
    if member is not None:
        try:
            return _ZIPS.get(archive).read(member)
        except KeyError:
            raise FileNotFoundError(f"{archive}: no member {member!r}") from None
    with open(location, "rb") as f:
        return f.read()


MAX_PIXELS = 64_000_000  # ~8000 x 8000; far beyond any radiograph, far below what exhausts memory


class DecompressionBomb(MedembedError, ValueError):
    pass


def open_image(location: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (not lazily) so truncated files fail here, inside the skip-and-report guard.

    The pixel count is checked from the header before decoding: a small file claiming a huge
    canvas is refused without allocating it.
    """
    return decode_image(read_image_bytes(location), max_pixels)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file's bytes as an RGB image, the pixel count checked from the header first."""
    if not data:
        raise ValueError("zero-byte file")
    img = Image.open(io.BytesIO(data))
    if img.width * img.height > max_pixels:
        raise DecompressionBomb(f"{img.width} x {img.height} pixels exceeds the limit of {max_pixels}")
    img.load()
    return img.convert("RGB")
