"""Training pairs from a cached split: shuffled batches of (image, text) features plus the mask of
which texts in a batch describe which images.

Two sources give the same blocks: `MemorySource` holds a loaded split (one block, no copies);
`StreamSource` reads a cache file that exceeds RAM in contiguous row chunks, shuffling chunk order
and rows within a chunk. Features stay in their stored dtype (float16 halves RAM) and are widened
to float32 one batch at a time.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from medembed.cache import schema
from medembed.cache.reader import CachedSplit, feature_chunks, open_cache, read_dataset, strings
from medembed.common.errors import Incompatible
from medembed.common.tensors import unit


@dataclass
class Block:
    """A contiguous slice of a split: captions, the images they point at, and where those images
    sit in the whole split (global rows, for concept labels)."""

    image_features: torch.Tensor  # [n, Di]
    view_features: torch.Tensor | None  # [n, V, Di]
    caption_features: torch.Tensor  # [m, Dt]
    caption_image: torch.Tensor  # [m] local image row
    caption_key: torch.Tensor  # [m] equal for identical caption strings
    image_rows: torch.Tensor  # [n] global image rows


@dataclass
class Batch:
    images: torch.Tensor  # [B, Di] float32
    texts: torch.Tensor  # [B, Dt] float32
    positives: torch.Tensor  # [B, B] bool: text j describes image i
    image_rows: torch.Tensor | None = None  # [B] row of each pair's image in the split (concept supervision)


def caption_keys(captions: list[str]) -> torch.Tensor:
    """Identical captions (after case and whitespace folding) share a key: "Axial CT." written
    under two images is a positive for both, never a negative. The key is a 64-bit hash of the folded
    text, so a split streamed in chunks gets its keys chunk by chunk (8 bytes a caption, no table of
    every caption); two different captions share one with probability about n^2 / 2^64."""
    digests = b"".join(hashlib.blake2b(" ".join(c.lower().split()).encode(), digest_size=8).digest() for c in captions)
    return torch.from_numpy(np.frombuffer(digests, dtype=np.int64).copy())


class ConceptTexts:
    """Named concepts as extra positive texts: (image, concept) pairs whose text feature is one of
    the concept's prompt templates, drawn at random each time. Concepts without a name were encoded
    from their id ("C0040405") and carry no language, so they are left out."""

    def __init__(self, concepts: sp.csr_matrix | None, names: list[str], text_features: torch.Tensor | None):
        if concepts is None or text_features is None or not names:
            raise Incompatible("this cache has no concept text features; extract with concepts to use --augment concepts")
        named = np.array([i for i, n in enumerate(names) if n], dtype=np.int64)
        if named.size == 0:
            raise Incompatible("no concept in this cache has a name; --augment concepts needs named concepts")
        # sparse [N, Cn]: a dense table of every image and concept would take N x Cn bytes (20 GB
        # for 10M images and 2,000 concepts); a batch looks up its own rows
        self.labels = concepts.tocsc()[:, named].tocsr()
        self.labels.sort_indices()
        self.text_features = text_features[torch.from_numpy(named)]  # [Cn, T, Dt]

    @property
    def n_pairs(self) -> int:
        return int(self.labels.nnz)

    def pairs_of(self, image_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in `image_rows`, concept column) of every labelled pair of those images, in
        row-major order."""
        coo = self.labels[image_rows.numpy()].tocoo()
        return torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))

    def has(self, image_rows: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """[len(image_rows), len(concepts)] bool: is each image labelled with each concept."""
        return torch.from_numpy(self.labels[image_rows.numpy()][:, concepts.numpy()].toarray().astype(bool))


class MemorySource:
    def __init__(self, split: CachedSplit):
        self.split = split
        self.block = Block(
            image_features=split.image_features,
            view_features=split.view_features,
            caption_features=split.caption_features,
            caption_image=split.caption_image.long(),
            caption_key=caption_keys(split.captions) if split.captions else torch.arange(split.n_captions),
            image_rows=torch.arange(split.n_images),
        )

    image_dim = property(lambda self: self.split.image_features.shape[1])
    text_dim = property(lambda self: self.split.caption_features.shape[1])
    n_images = property(lambda self: self.split.n_images)
    n_captions = property(lambda self: self.split.n_captions)
    has_views = property(lambda self: self.split.view_features is not None)

    def blocks(self, gen: torch.Generator) -> Iterator[Block]:
        yield self.block

    def image_chunks(self, rows: int = 65536) -> Iterator[torch.Tensor]:
        x = self.split.image_features
        return (x[s : s + rows] for s in range(0, x.shape[0], rows))

    def caption_chunks(self, rows: int = 65536) -> Iterator[torch.Tensor]:
        x = self.split.caption_features
        return (x[s : s + rows] for s in range(0, x.shape[0], rows))


class StreamSource:
    """A cache file read block by block: each block is `chunk_rows` consecutive captions and the
    images they point at (one slice when captions are stored image by image, as the writer does)."""

    def __init__(self, path: str | Path, chunk_rows: int = 65536, with_views: bool = True):
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        with open_cache(self.path) as f:
            self.caption_image = torch.from_numpy(read_dataset(f, schema.CAPTION_IMAGE_ROW).astype(np.int64))
            self.image_dim = int(f[schema.IMAGE_FEATURES].shape[1])
            self.text_dim = int(f[schema.CAPTION_FEATURES].shape[1])
            self.n_images = int(f[schema.IMAGE_FEATURES].shape[0])
            self.has_views = with_views and schema.VIEW_FEATURES in f
            n = f[schema.CAPTION_TEXT].shape[0]
            # one chunk of caption strings at a time: 10M captions as Python strings would take gigabytes
            self.caption_key = torch.cat([caption_keys(strings(f[schema.CAPTION_TEXT], np.s_[s : s + chunk_rows]))
                                          for s in range(0, n, chunk_rows)] or [torch.zeros(0, dtype=torch.long)])
        self.n_captions = int(self.caption_image.numel())

    def _rows(self, f, name: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 2 * rows.size + 1024:  # nearly contiguous: one slice read
            return torch.from_numpy(read_dataset(f, name, np.s_[lo:hi])), torch.arange(lo, hi)
        uniq = np.unique(rows)
        return torch.from_numpy(read_dataset(f, name, uniq)), torch.from_numpy(uniq)

    def blocks(self, gen: torch.Generator) -> Iterator[Block]:
        starts = torch.arange(0, self.n_captions, self.chunk_rows)
        with open_cache(self.path) as f:
            for s in starts[torch.randperm(len(starts), generator=gen)].tolist():
                e = min(s + self.chunk_rows, self.n_captions)
                img_of = self.caption_image[s:e]
                images, rows = self._rows(f, schema.IMAGE_FEATURES, img_of.numpy())
                views = self._rows(f, schema.VIEW_FEATURES, img_of.numpy())[0] if self.has_views else None
                local = torch.searchsorted(rows, img_of)
                yield Block(images, views, torch.from_numpy(read_dataset(f, schema.CAPTION_FEATURES, np.s_[s:e])), local,
                            self.caption_key[s:e], rows)

    def _chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        return (torch.from_numpy(x) for x in feature_chunks(self.path, name, rows))

    def image_chunks(self, rows: int = 65536) -> Iterator[torch.Tensor]:
        return self._chunks(schema.IMAGE_FEATURES, rows)

    def caption_chunks(self, rows: int = 65536) -> Iterator[torch.Tensor]:
        return self._chunks(schema.CAPTION_FEATURES, rows)


def read_concepts(path: str | Path) -> tuple[sp.csr_matrix | None, list[str], torch.Tensor | None]:
    """Concept labels, names and text features of a cache file without touching its image or
    caption features (which, when streaming, do not fit in memory)."""
    with open_cache(path) as f:
        if schema.CONCEPT_IDS not in f or schema.CONCEPT_TEXT_FEATURES not in f:
            return None, [], None
        names = strings(f[schema.CONCEPT_NAMES])
        n = int(f[schema.IMAGE_FEATURES].shape[0])
        indptr = read_dataset(f, schema.CONCEPT_INDPTR).astype(np.int64)
        indices = read_dataset(f, schema.CONCEPT_INDICES).astype(np.int64)
        labels = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n, len(names)))
        return labels, names, torch.from_numpy(read_dataset(f, schema.CONCEPT_TEXT_FEATURES).astype(np.float32))


def _concept_pairs(block: Block, concepts: ConceptTexts | None, ratio: float, m: int, gen: torch.Generator):
    """About ratio x m (image, concept) pairs drawn among the block's images: (local image rows,
    concept columns), or (None, None) without concept texts."""
    if concepts is None or ratio <= 0:
        return None, None
    local, concept = concepts.pairs_of(block.image_rows)
    pick = torch.randperm(local.numel(), generator=gen)[: min(local.numel(), round(ratio * m))]
    return local[pick], concept[pick]


def caption_neighbours(block: Block, m: int = 20, rows: int = 2048) -> torch.Tensor:
    """[n_captions, m]: for each caption of the block, the m captions nearest to it by cosine of the
    cached features, leaving out captions of its own image and identical captions (they are
    positives, not negatives). Their pairs are the hard negatives `iter_batches` puts beside it."""
    x = unit(block.caption_features.float())
    n = x.shape[0]
    m = max(1, min(m, n - 1))
    out = []
    for s in range(0, n, rows):
        sim = x[s : s + rows] @ x.T
        same = block.caption_image[s : s + rows, None] == block.caption_image[None, :]
        same |= block.caption_key[s : s + rows, None] == block.caption_key[None, :]
        out.append(sim.masked_fill_(same, float("-inf")).topk(m, dim=1).indices)
    return torch.cat(out)


def hard_negative_order(neighbours: torch.Tensor, batch_size: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Batches of caption rows made of groups: a random anchor and k captions drawn from its nearest
    neighbours, so every anchor meets its most confusable pairs as in-batch negatives (both ways,
    since each neighbour brings its own image). About as many pairs per epoch as without."""
    n = neighbours.shape[0]
    group = k + 1
    anchors = torch.randperm(n, generator=gen)[: -(-n // group)]
    pick = torch.randint(0, neighbours.shape[1], (anchors.numel(), k), generator=gen)
    rows = torch.cat([anchors[:, None], neighbours[anchors[:, None], pick]], dim=1).reshape(-1)
    return list(rows.split(max(1, batch_size // group) * group))


def iter_batches(
    block: Block,
    batch_size: int,
    gen: torch.Generator,
    *,
    concepts: ConceptTexts | None = None,
    concept_ratio: float = 0.0,
    use_views: bool = True,
    neighbours: torch.Tensor | None = None,
    hard_negatives: int = 0,
) -> Iterator[Batch]:
    """All captions of the block once, plus about concept_ratio x as many (image, concept) pairs,
    shuffled together; with views, each image is seen as a random one of its original + V views.
    With `hard_negatives` k > 0 (and the block's `caption_neighbours`), batches are built from
    anchors and k of their nearest captions instead of a plain shuffle (captions only)."""
    m = block.caption_features.shape[0]
    if hard_negatives > 0:
        if neighbours is None or concepts is not None:
            raise ValueError("hard-negative batches need the caption neighbours and no concept pairs")
        cp_local = cp_concept = None
        n_cp = 0
        batches = hard_negative_order(neighbours, batch_size, hard_negatives, gen)
    else:
        cp_local, cp_concept = _concept_pairs(block, concepts, concept_ratio, m, gen)
        n_cp = 0 if cp_local is None else cp_local.numel()
        batches = torch.randperm(m + n_cp, generator=gen).split(batch_size)
    views = block.view_features if use_views else None
    n_templates = concepts.text_features.shape[1] if n_cp else 1

    for idx in batches:
        if idx.numel() < 2:
            continue
        is_cap = idx < m
        cap, con = idx[is_cap], idx[~is_cap] - m
        img_local = torch.empty(idx.numel(), dtype=torch.long)
        img_local[is_cap] = block.caption_image[cap]
        texts = torch.empty(idx.numel(), block.caption_features.shape[1])
        texts[is_cap] = block.caption_features[cap].float()
        concept_of = torch.full((idx.numel(),), -1, dtype=torch.long)
        if con.numel():
            img_local[~is_cap] = cp_local[con]
            concept_of[~is_cap] = cp_concept[con]
            tpl = torch.randint(0, n_templates, (con.numel(),), generator=gen)
            texts[~is_cap] = concepts.text_features[cp_concept[con], tpl].float()
        if views is not None:
            which = torch.randint(0, views.shape[1] + 1, (idx.numel(),), generator=gen)
            images = torch.where(
                (which == 0)[:, None],
                block.image_features[img_local].float(),
                views[img_local, (which - 1).clamp_min(0)].float(),
            )
        else:
            images = block.image_features[img_local].float()

        glob = block.image_rows[img_local]
        positives = glob[:, None] == glob[None, :]
        key = torch.full((idx.numel(),), -1, dtype=torch.long)
        key[is_cap] = block.caption_key[cap]
        positives |= is_cap[:, None] & is_cap[None, :] & (key[:, None] == key[None, :])
        if con.numel():
            # text j is concept c: every image in the batch labelled with c is its positive
            has = concepts.has(glob, concept_of.clamp_min(0))  # [B, B]
            positives |= has & (~is_cap)[None, :]
        yield Batch(images, texts, positives, glob)
