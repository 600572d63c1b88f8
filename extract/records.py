"""The one record type every dataset layout is read into.

Readers differ in file formats; everything downstream (cache, adapt, evaluate) only ever sees
`Record` and `Dataset`, so a new layout is one new reader and nothing else.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass, field

from PIL import Image

ZIP_SEP = "::"


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

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "valid": 1, "val": 1, "dev": 1, "test": 2}
        names = {r.split for r in self.records}
        return sorted(names, key=lambda s: (order.get(s, 9), s))

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

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


def image_size(location: str) -> int:
    """Byte size of an image file or zip member; -1 when it does not exist."""
    if ZIP_SEP in location:
        archive, member = location.split(ZIP_SEP, 1)
        try:
            with zipfile.ZipFile(archive) as z:
                return z.getinfo(member).file_size
        except (KeyError, OSError, zipfile.BadZipFile):
            return -1
    try:
        return os.path.getsize(location)
    except OSError:
        return -1


def read_image_bytes(location: str) -> bytes:
    if ZIP_SEP in location:
        archive, member = location.split(ZIP_SEP, 1)
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with open(location, "rb") as f:
        return f.read()


def open_image(location: str) -> Image.Image:
    """Decode fully (not lazily) so truncated files fail here, inside the skip-and-report guard."""
    data = read_image_bytes(location)
    if not data:
        raise ValueError("zero-byte file")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")
