"""The pool a `Searcher` ranks: one or more cache files, concatenated, read from disk as queries need.

What stays in memory is what every query touches: each file's sizes, its caption -> image rows and
its concept labels (`cache.reader.SplitHeader`), about 8 bytes a caption. Ids, captions and
locations are read a few rows at a time for the hits a query returns, and features a slice at a time
(`chunks`) or a few rows (`image_features`), so a pool of ten million images is opened in seconds and
held in the memory its labels take.

Pool rows number the images of every file one after the other (and the captions the same way):
pool image row r is row r - `image_starts[i]` of file i.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medembed.cache import schema
from medembed.cache.reader import OpenCaches, SplitHeader, location_path, read_header, read_rows
from medembed.extract.access import DataAccess
from medembed.extract.imaging import DecodeOptions, open_image
from medembed.extract.imaging.locations import split_location
from medembed.extract.worker import describe_error, redact


@dataclass
class ImageInfo:
    """What a hit shows of one pool image."""

    split: str
    row: int  # image row in its split's cache
    image_id: str
    caption: str  # its first caption ("" for none)
    location: str


@dataclass
class CaptionInfo:
    split: str
    image_row: int  # the row of the caption's image in its split's cache
    image_id: str
    caption: str
    location: str


class SearchPool:
    """The splits searched, concatenated (see the module's docstring)."""

    def __init__(self, splits: list[SplitHeader]):
        self.splits = splits
        self.files = OpenCaches()  # each file opened once, for every query's reads
        self.image_starts = np.cumsum([0, *(s.n_images for s in splits)])
        self.caption_starts = np.cumsum([0, *(s.n_captions for s in splits)])
        self._access: dict[int, DataAccess] = {}  # each split's rule, made once (it resolves the data folder)

    @classmethod
    def open(cls, paths: list[str | Path]) -> SearchPool:
        return cls([read_header(p) for p in paths])

    @property
    def n_images(self) -> int:
        return int(self.image_starts[-1])

    @property
    def n_captions(self) -> int:
        return int(self.caption_starts[-1])

    @property
    def names(self) -> list[str]:
        return [s.split for s in self.splits]

    @property
    def decode(self) -> DecodeOptions:
        """How the pool's images were rendered at extraction (window), for showing them and for
        decoding query images the same way."""
        return DecodeOptions.from_provenance(self.splits[0].attrs.get(schema.IMAGE_DECODING) if self.splits else None)

    @property
    def metadata_bytes(self) -> int:
        """What the headers hold: caption -> image rows and the sparse labels."""
        out = 0
        for s in self.splits:
            out += s.caption_image.nbytes
            if s.concepts is not None:
                out += s.concepts.data.nbytes + s.concepts.indices.nbytes + s.concepts.indptr.nbytes
        return out

    # -- rows -----------------------------------------------------------------------------------
    def pool_row(self, split: str | int, row: int) -> int:
        """Image `row` of a split (by name or position) as a pool row."""
        i = self.names.index(split) if isinstance(split, str) else split
        return int(self.image_starts[i]) + int(row)

    def locate(self, pool_row: int) -> tuple[int, int]:
        """Pool image row -> (split position, image row in that split)."""
        i = int(np.searchsorted(self.image_starts, pool_row, "right")) - 1
        return i, int(pool_row - self.image_starts[i])

    def locate_caption(self, pool_row: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.caption_starts, pool_row, "right")) - 1
        return i, int(pool_row - self.caption_starts[i])

    def _by_split(self, pool_rows, starts: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(split position, positions in `pool_rows`, rows in that split) for each split they touch."""
        rows = np.asarray(pool_rows, dtype=np.int64).reshape(-1)
        owner = np.searchsorted(starts, rows, "right") - 1
        for i in np.unique(owner):
            at = np.flatnonzero(owner == i)
            yield int(i), at, rows[at] - starts[i]

    def _gather(self, pool_rows, starts: np.ndarray, name: str, width: int) -> torch.Tensor:
        out = torch.zeros(len(pool_rows), width)
        for i, at, rows in self._by_split(pool_rows, starts):
            out[torch.from_numpy(at)] = torch.from_numpy(read_rows(self.splits[i].path, name, rows, self.files)).float()
        return out

    def image_features(self, pool_rows) -> torch.Tensor:
        """Raw cached features [len, Di] float32 of these pool images, read from their files."""
        return self._gather(pool_rows, self.image_starts, schema.IMAGE_FEATURES, self.splits[0].image_dim)

    def caption_features(self, pool_rows) -> torch.Tensor:
        return self._gather(pool_rows, self.caption_starts, schema.CAPTION_FEATURES, self.splits[0].text_dim)

    def chunks(self, side: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first pool row, raw features float32) of every `side` ("images" or "captions") row, `rows`
        at a time: one pass over the pool reading a slice of one file at a time."""
        name, starts = ((schema.IMAGE_FEATURES, self.image_starts) if side == "images"
                        else (schema.CAPTION_FEATURES, self.caption_starts))
        for i, s in enumerate(self.splits):
            n = s.n_images if side == "images" else s.n_captions
            for lo in range(0, n, rows):
                part = read_rows(s.path, name, np.arange(lo, min(n, lo + rows)), self.files)
                yield int(starts[i]) + lo, torch.from_numpy(part).float()

    # -- what hits show -------------------------------------------------------------------------
    def images(self, pool_rows) -> list[ImageInfo]:
        """Id, first caption and location of these pool images (a few reads per split)."""
        out: list[ImageInfo | None] = [None] * len(pool_rows)
        for i, at, rows in self._by_split(pool_rows, self.image_starts):
            s = self.splits[i]
            ids = read_rows(s.path, schema.IMAGE_IDS, rows, self.files)
            locs = read_rows(s.path, schema.IMAGE_LOCATIONS, rows, self.files) if s.has_locations else [""] * len(rows)
            first = s.first_caption_rows(rows)
            texts = read_rows(s.path, schema.CAPTION_TEXT, first[first >= 0], self.files)
            caption = iter(texts)
            for j, r, image_id, loc, c in zip(at, rows, ids, locs, first):
                out[j] = ImageInfo(s.split, int(r), image_id, next(caption) if c >= 0 else "",
                                   location_path(loc, s.data_root))
        return out  # type: ignore[return-value]

    def captions(self, pool_rows) -> list[CaptionInfo]:
        out: list[CaptionInfo | None] = [None] * len(pool_rows)
        for i, at, rows in self._by_split(pool_rows, self.caption_starts):
            s = self.splits[i]
            texts = read_rows(s.path, schema.CAPTION_TEXT, rows, self.files)
            image_rows = s.caption_image[rows]
            ids = read_rows(s.path, schema.IMAGE_IDS, image_rows, self.files)
            locs = read_rows(s.path, schema.IMAGE_LOCATIONS, image_rows, self.files) if s.has_locations else [""] * len(rows)
            for j, text, r, image_id, loc in zip(at, texts, image_rows, ids, locs):
                out[j] = CaptionInfo(s.split, int(r), image_id, text, location_path(loc, s.data_root))
        return out  # type: ignore[return-value]

    def location(self, pool_row: int) -> str:
        return self.images([pool_row])[0].location

    def access(self, split: str | int) -> DataAccess:
        """The rule a split's images are read under: its data folder, links followed out of it only
        when its extraction followed them (see `extract.access`)."""
        i = self.names.index(split) if isinstance(split, str) else int(split)
        if i not in self._access:
            s = self.splits[i]
            self._access[i] = DataAccess.of_cache(s.attrs, s.data_root)
        return self._access[i]

    def open_image(self, pool_row: int) -> Image.Image:
        """A pool image, read under its data folder's rule and rendered as at extraction."""
        return open_image(self.location(pool_row), self.decode, access=self.access(self.locate(pool_row)[0]))

    def unreadable(self, pool_row: int, error: BaseException) -> str:
        """Why `open_image` failed for a pool image, in a few words. Where the pool's locations are
        private (paths that may name patients, see `extract.imaging.locations`), the path an OS or
        archive error quotes is taken out, as the extractor does: the resolved file, its member and
        anything below the data folder."""
        why = describe_error(error)
        i = self.locate(pool_row)[0]
        location = self.location(pool_row)
        if schema.PRIVATE_LOCATION not in location:
            return why  # its path is the record's own id: nothing to hide
        try:
            path, member, _ = split_location(location, self.access(i))
            why = redact(why, path + (f"{schema.ZIP_SEP}{member}" if member else ""))
        except Exception:  # noqa: BLE001 - not found again: that error names only the folder and the id
            pass
        root = self.splits[i].data_root
        for base in {root, os.path.realpath(root)} - {""}:
            why = re.sub(re.escape(base.rstrip(os.sep) + os.sep) + r"[^'\"]*", "<image>", why)
        return why
