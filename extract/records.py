"""The one record type every dataset layout is read into.

Readers differ in file formats; everything downstream (cache, adapt, evaluate) only ever sees
`Record` and `Dataset`, so a new layout is one new reader and nothing else.

An image's location is a file path, or a container member ("ARCHIVE.zip::member/inside.jpg", a tar
shard's or a parquet row's), optionally one frame of a multi-frame file ("scan.dcm::frame=3"): see
`medembed.extract.imaging.locations`, where they are read without unpacking.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from medembed.cache.schema import ZIP_SEP as ZIP_SEP  # re-exported: the location form readers write
from medembed.common.splits import sort_splits
from medembed.extract.imaging.locations import fingerprint_size


@dataclass(frozen=True)
class Record:
    image_id: str
    image: str  # a file path, or "CONTAINER::member" / "FILE::frame=N" (see imaging.locations)
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
    # the image paths themselves identify patients (MIMIC-CXR's subject and study numbers, DICOM UIDs as
    # file names): caches keep only the (hashed) image id as the location, found again by reading the
    # data folder (see imaging.locations)
    private_paths: bool = False

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
            h.update(f"{r.split}\x1f{r.image_id}\x1f{os.path.basename(r.image)}\x1f{fingerprint_size(r.image)}".encode())
            h.update("\x1e".join(r.captions).encode())
            h.update(";".join(r.concepts).encode())
        for k in sorted(self.concept_names):
            h.update(f"{k}\x1f{self.concept_names[k]}".encode())
        return h.hexdigest()
