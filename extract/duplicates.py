"""The same image stored twice under different ids and files, in different splits.

ROCO-style corpora hold duplicated figures: one file copied under a second id into test leaks that
test image into training as surely as a shared id does, yet neither its id nor its path gives it
away (`Dataset.split_overlaps` finds those). Only the bytes do.

Why the bytes are compared here, while planning, and not as the extraction worker reads them: splits
are extracted one after another, resumably, in parts, in `--shard` processes and in Ray tasks that
never see each other, so hashes stored with each split could only be compared once the later split
of a pair has been encoded (an hour into a large extraction, and never for shards running side by
side). Here the check comes before any image is encoded, in every distributor alike, and costs
little because byte-identical images have identical sizes:

1. every record's size is looked up (one stat, or a zip or tar index; the dataset fingerprint pays
   for the same), and only records whose size recurs in another split are candidates (images of a
   fixed layout, such as uncompressed DICOM slices, may all be);
2. a candidate's first 64 KiB are hashed (a DICOM header's UIDs, a JPEG's first rows tell images
   apart there), and only those whose size, frame and first 64 KiB recur in another split are
3. hashed whole (sha256): those equal across splits are the copies.

Measured on roco-rad (4,639 JPEG files, 98 MB, warm page cache, 2 cores): hashing every file whole
would take 0.7 s; this check takes 0.04 s (sizes leave 344 candidates, their first 64 KiB leave 2),
beside the 100 s of the extraction itself. It finds one copy there: ROCO_72309 in test is
ROCO_39421 in train. A parquet row's size is only known by reading its row group's images
(`containers.member_size`), so for parquet the check reads the images once.

The bytes compared are those decoded: a file's, or a container member's (not the container's); a
frame of a multi-frame file is the file's bytes and the frame number, so frame 3 of a copied file
matches frame 3 of the original only. One differing byte is a different image here: near-duplicates
(re-encoded, resized) are not looked for.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from medembed.common.splits import split_key
from medembed.extract.access import DataAccess
from medembed.extract.imaging.locations import image_size, read_at, split_location
from medembed.extract.record_table import BATCH_ROWS, RecordTable

HEAD_BYTES = 1 << 16  # what step 2 hashes of each candidate


@dataclass(frozen=True)
class CrossSplitCopy:
    """`copy` (image id, split) holds the same bytes as `original` (image id, split), an earlier split
    of the dataset, under another id and file; `more`: further copies of the same image."""

    original: tuple[str, str]
    copy: tuple[str, str]
    more: int = 0

    def describe(self) -> str:
        more = f" (and {self.more} more cop{'y' if self.more == 1 else 'ies'})" if self.more else ""
        return (f"{self.copy[0]} in {self.copy[1]} is a byte-identical copy of {self.original[0]} in "
                f"{self.original[1]}{more}")


def cross_split_copies(records: RecordTable, access: DataAccess | None = None) -> list[CrossSplitCopy]:
    """One entry per image whose bytes are in more than one split under different ids and files (an
    image shared by id or by file is `Dataset.split_overlaps`'s), in split order of the copies. Bytes
    are read under `access` (the dataset's rule; a file it refuses is never a copy)."""
    sizes, splits, names = _sizes_and_splits(records, access)
    if len(names) < 2:
        return []
    rows = np.flatnonzero(sizes > 0)  # missing and zero-byte files are skipped at extraction, not compared
    rows = rows[_in_several_splits(sizes[rows], splits[rows])]
    if not len(rows):
        return []
    heads, keys = _Digests(HEAD_BYTES, access), np.empty(len(rows), np.int64)
    for start in range(0, len(rows), BATCH_ROWS):  # a batch of locations at a time: candidates may be many
        chunk = rows[start:start + BATCH_ROWS]
        keys[start:start + len(chunk)] = [hash((int(sizes[r]), *heads.of(loc)))
                                          for r, loc in zip(chunk, records.select(chunk).values("image"))]
    rows = rows[_in_several_splits(keys, splits[rows])]  # few left: the copies, and any 64 KiB look-alikes
    whole = _Digests(None, access)
    groups: dict[tuple[bytes, int], list[int]] = {}
    for r, loc in zip(rows.tolist(), records.select(rows).values("image")):
        groups.setdefault(whole.of(loc), []).append(r)
    out = []
    for members in groups.values():
        if len({int(splits[r]) for r in members}) > 1:
            found = _copies(records.select(np.asarray(members, np.int64)))
            if found:
                out.append(found)
    return sorted(out, key=lambda c: (split_key(c.copy[1]), c.copy[0]))


def _sizes_and_splits(records: RecordTable, access: DataAccess | None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Each record's image size (-1 when it cannot be sized, or may not be read under `access`) and
    split number: 12 bytes a record."""
    n = len(records)
    sizes, splits = np.empty(n, np.int64), np.empty(n, np.int32)
    names: dict[str, int] = {}
    for start in range(0, n, BATCH_ROWS):
        part = records[start:start + BATCH_ROWS]
        stop = start + len(part)
        sizes[start:stop] = [_size(x, access) for x in part.values("image")]
        splits[start:stop] = [names.setdefault(x, len(names)) for x in part.values("split")]
    return sizes, splits, names


def _size(location: str, access: DataAccess | None) -> int:
    """The image's size, -1 for one the rule refuses: sizing a container member opens its zip index
    or reads its parquet row group, which a container linked in from outside the folder must never be."""
    try:
        return image_size(location, access)
    except (OSError, ValueError):  # e.g. a private id no longer in the folder: extraction reports it
        return -1


def _in_several_splits(keys: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Whether each row's key occurs with more than one split (a mask over the rows)."""
    order = np.lexsort((splits, keys))
    k, s = keys[order], splits[order]
    differs = (k[1:] == k[:-1]) & (s[1:] != s[:-1])
    return np.isin(keys, k[1:][differs])


class _Digests:
    """sha256 of the first `limit` bytes (all with None) of what a location decodes, with its frame;
    a file's digest is computed once for its consecutive frames (a reader lists them one after another)."""

    def __init__(self, limit: int | None, access: DataAccess | None) -> None:
        self.limit, self.access = limit, access
        self._last: tuple[tuple[str, str | None], bytes] | None = None

    def of(self, location: str) -> tuple[bytes, int]:
        try:
            path, member, frame = split_location(location, self.access)
        except (OSError, ValueError):  # outside the folder, or a private id no longer in it: never a copy
            return f"unresolvable\x1f{location}".encode(), -1
        if self._last is None or self._last[0] != (path, member):
            self._last = ((path, member), self._digest(path, member))
        return self._last[1], -1 if frame is None else frame

    def _digest(self, path: str, member: str | None) -> bytes:
        h = hashlib.sha256()
        try:
            if member is not None:
                h.update(read_at(path, member)[: self.limit])
            else:
                with open(path, "rb") as f:
                    if self.limit is not None:
                        h.update(f.read(self.limit))
                    else:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
        except Exception:  # noqa: BLE001 - unreadable (extraction reports why): unique, so never a copy
            return f"unreadable\x1f{path}\x1f{member}".encode()
        return h.digest()


def _copies(members: RecordTable) -> CrossSplitCopy | None:
    """Of records holding the same bytes: the first pair, in split order, of two in different splits
    under different ids and files, counting the further members that pair so with an earlier one;
    None when every cross-split pair shares an id or a file (reported as such by the overlap check)."""
    recs = sorted(members, key=lambda r: split_key(r.split))
    pairs = []
    for j, m in enumerate(recs):
        for o in recs[:j]:
            if o.split != m.split and o.image != m.image and o.image_id != m.image_id:
                pairs.append((o, m))
                break
    if not pairs:
        return None
    o, m = pairs[0]
    return CrossSplitCopy((o.image_id, o.split), (m.image_id, m.split), more=len(pairs) - 1)
