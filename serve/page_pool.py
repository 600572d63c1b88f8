"""The searcher's pool as the page addresses it: images by request key (`split:row`), their filters
and the concept names the page offers.

A key is the only way a request names an image, and it is parsed into a pool row, never a path: the
image's bytes are read from the location the cache recorded for that row, under the data folder's
rule (`extract.access`), so nothing a request sends reaches the file system.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
from fastapi import HTTPException
from PIL import Image

from medembed.common.modalities import ModalityClass
from medembed.serve.search import Searcher


class PagePool:
    """The searcher's pool images as request keys (`split:row`), their filters and concept names.
    Keys are parsed, never listed: a pool of ten million images costs its labels, not ten million
    strings. `modalities` are the classes offered as modality filters, those with images here."""

    def __init__(self, searcher: Searcher, modalities: Iterable[ModalityClass]):
        self.searcher = searcher
        pool = searcher.pool
        self.n_images = pool.n_images
        self.split_names = pool.names
        first = pool.splits[0]
        self.concept_ids = list(first.concept_ids)
        named = [i for i, n in enumerate(first.concept_names) if n]
        self.labels = None
        if first.concepts is not None and first.concepts.shape[1]:
            import scipy.sparse as sp

            self.labels = sp.vstack([s.concepts for s in pool.splits], format="csc")
        counts = np.asarray(self.labels.sum(0)).ravel() if self.labels is not None else np.zeros(len(self.concept_ids))
        self.concepts = [{"id": first.concept_ids[i], "name": first.concept_names[i], "images": int(counts[i])}
                         for i in sorted(named, key=lambda i: -counts[i]) if counts[i] > 0]
        col = {c: i for i, c in enumerate(self.concept_ids)}
        self.modalities = [{"label": m.label, "id": m.concept_id, "images": int(counts[col[m.concept_id]])}
                           for m in modalities if m.concept_id in col and counts[col[m.concept_id]] > 0]

    def row(self, key: str) -> int:
        """The pool row of `split:row`; 404 for anything else."""
        split, _, row = key.rpartition(":")
        pool = self.searcher.pool
        if split not in self.split_names or not re.fullmatch(r"0|[1-9][0-9]*", row) or \
                int(row) >= pool.splits[self.split_names.index(split)].n_images:
            raise HTTPException(404, f"no image {key!r} in this run's pool")
        return pool.pool_row(split, int(row))

    def image(self, key: str) -> Image.Image:
        """Pool image `key`, read under its data folder's rule (never a file outside it); 404 for a key
        that is no pool row, or an image that cannot be read (saying why, naming no path that may
        identify a patient)."""
        row = self.row(key)  # only pool rows map to a location; the request names none
        pool = self.searcher.pool
        try:
            return pool.open_image(row)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(404, f"{key}: image not readable ({pool.unreadable(row, e)})") from None

    def allowed(self, split: str | None, modality: str | None, concept: str | None) -> np.ndarray | None:
        """Which pool images pass the filters (None: all)."""
        mask = np.ones(self.n_images, dtype=bool)
        if split:
            if split not in self.split_names:
                raise HTTPException(400, f"split {split!r} is not in the pool (splits: {', '.join(sorted(self.split_names))})")
            i = self.split_names.index(split)
            starts = self.searcher.pool.image_starts
            mask[:] = False
            mask[starts[i] : starts[i + 1]] = True
        for cid, what in ((modality, "modality"), (concept, "concept")):
            if cid:
                if self.labels is None or cid not in self.concept_ids:
                    raise HTTPException(400, f"{what} {cid!r} is not a concept of this pool")
                mask &= self.labels[:, self.concept_ids.index(cid)].toarray().ravel() > 0
        if not (split or modality or concept):
            return None
        if not mask.any():
            raise HTTPException(404, "no image of the pool passes these filters")
        return mask
