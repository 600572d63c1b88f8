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
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from medembed.cache.schema import ZIP_SEP as ZIP_SEP  # re-exported: the location form readers write
from medembed.common.splits import sort_splits
from medembed.extract.access import DataAccess, Refusals
from medembed.extract.imaging.locations import fingerprint_size
from medembed.extract.record_table import BATCH_ROWS, Record, RecordTable


@dataclass
class Dataset:
    """A dataset's records (any iterable of `Record`, kept as a `RecordTable`: Arrow columns, memory-
    mapped from a temporary file once they are many) and what its reader learnt about them."""

    name: str
    root: str
    layout: str
    records: Iterable[Record]
    concept_names: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False
    warnings: list[str] = field(default_factory=list)  # data problems that were tolerated (e.g. empty captions dropped)
    # the image paths themselves may identify patients (MIMIC-CXR's subject and study numbers, folders
    # named by patient in an archive export): records are named by a keyed hash of their path and caches
    # keep only that id as the location, found again by reading the data folder (see imaging.locations)
    private_paths: bool = False
    id_key: str = ""  # the id of the path key (`path_key`) the ids were made with; "" when they are not keyed
    follow_links: bool = False  # links leading out of the folder are read (`--follow-links`; see `access`)
    refused: Refusals = field(default_factory=Refusals)  # what the reader would not read, and why
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.records = RecordTable.of(self.records)

    @property
    def access(self) -> DataAccess:
        """The rule every read of this dataset's images keeps to (see `access`)."""
        return DataAccess(self.root, self.follow_links)

    @property
    def splits(self) -> list[str]:
        return sort_splits(self.records.split_names())

    def split(self, name: str) -> RecordTable:
        """The split's records, in order (a view of the table's rows, not a copy)."""
        return self.records.split(name)

    def split_overlaps(self) -> list[tuple[str, tuple[str, ...]]]:
        """Images found in more than one split, by id or by file: (id or file, the splits). Such an
        image leaks the test split into training and inflates every test number.

        Found without a dictionary of the whole collection: each record's id and file are hashed to 8
        bytes, rows whose hash is shared across splits are candidates, and only the candidates are
        compared by their strings (so a hash collision is never reported)."""
        ids, files, splits = _row_hashes(self.records)
        rows = np.flatnonzero(np.isin(ids, _shared_across_splits(ids, splits))
                              | np.isin(files, _shared_across_splits(files, splits)))
        by_id: dict[str, set[str]] = {}
        by_file: dict[str, tuple[set[str], set[str]]] = {}  # file -> (its splits, its ids)
        for r in self.records.select(rows):
            by_id.setdefault(r.image_id, set()).add(r.split)
            file_splits, file_ids = by_file.setdefault(r.image, (set(), set()))
            file_splits.add(r.split)
            file_ids.add(r.image_id)
        out = [(f"id {i}", tuple(sort_splits(s))) for i, s in by_id.items() if len(s) > 1]
        leaked = {i for i, s in by_id.items() if len(s) > 1}
        out += [(f"file {f}", tuple(sort_splits(s))) for f, (s, ids) in by_file.items()
                if len(s) > 1 and not ids <= leaked]  # one file under other ids in other splits
        return out

    def concept_vocab(self) -> list[str]:
        """All concepts of the dataset (every split, plus named ones), so splits share columns."""
        return sorted(set(self.concept_names) | self.records.concepts())

    def fingerprint(self) -> str:
        """sha256 over annotations and image names+sizes: cheap for millions of images, yet any
        edit to a caption, a label, a split assignment or an image file's size changes it. Computed
        once (every split and part of an extraction records it; at 10M it is a minute of file stats)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.layout.encode())
        for r in self.records.sorted_by_split_and_id():
            h.update(f"{r.split}\x1f{r.image_id}\x1f{os.path.basename(r.image)}\x1f{fingerprint_size(r.image)}".encode())
            h.update("\x1e".join(r.captions).encode())
            h.update(";".join(r.concepts).encode())
        for k in sorted(self.concept_names):
            h.update(f"{k}\x1f{self.concept_names[k]}".encode())
        return h.hexdigest()


def _row_hashes(records: RecordTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id hash, file hash, split number) of every record: 20 bytes a record. Python's string hash is
    enough here: it only has to agree with itself within this process."""
    n = len(records)
    ids, files, splits = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int32)
    numbers: dict[str, int] = {}
    for start in range(0, n, BATCH_ROWS):
        part = records[start:start + BATCH_ROWS]
        stop = start + len(part)
        ids[start:stop] = [hash(x) for x in part.values("image_id")]
        files[start:stop] = [hash(x) for x in part.values("image")]
        splits[start:stop] = [numbers.setdefault(x, len(numbers)) for x in part.values("split")]
    return ids, files, splits


def _shared_across_splits(keys: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """The keys that occur with more than one split."""
    order = np.lexsort((splits, keys))
    k, s = keys[order], splits[order]
    differs = (k[1:] == k[:-1]) & (s[1:] != s[:-1])
    return np.unique(k[1:][differs])
