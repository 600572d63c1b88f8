"""What an adapter run will hold in memory, decided before a feature is read.

`plan_memory` reads only the shapes in the cache files' headers and decides, within
`--max-memory-gb` (the whole process, imports included): the training split in memory when all of
it fits, else streamed from disk in chunks of captions sized to the budget, else a one-line refusal
that names the budget that would do. So a cache ten times the machine's memory trains in the
memory it was given, and one that cannot is refused before anything runs, never by the OOM killer.

What stays whatever the size of train: the process (torch, h5py and these modules), the heads
with their gradients, optimiser moments, weight average and best copy, the valid split (early
stopping ranks it every epoch), the query bank's sample of train (`adapt.run_querybank.BANK_ROWS`
per side), and, when streaming, 16 bytes per training caption (its image row and caption key) and
the concept labels as a sparse matrix. What a chunk costs: its captions, their images (and views)
as stored, read once per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from medembed.adapt.config import AdaptConfig
from medembed.adapt.heads import build_heads
from medembed.adapt.run_querybank import BANK_ROWS
from medembed.cache import schema
from medembed.cache.reader import open_cache
from medembed.common.memory import GB, format_bytes
from medembed.common.planning import MIN_CHUNK_ROWS, PROCESS_BYTES, SLACK_BYTES, MemoryBudgetError, MemoryPlan, gib_up

__all__ = ["AdaptMemoryPlan", "CacheShape", "cache_shape", "plan_memory"]

STATE_COPIES = 7  # weights, gradients, two AdamW moments, the weight average, the best copy, a checkpoint buffer
CAPTION_INDEX_BYTES = 16  # per streamed caption: its image row and its caption key, int64 each
CAPTION_TEXT_BYTES = 160  # per caption held as a Python string (in-memory train only)


@dataclass(frozen=True)
class CacheShape:
    n_images: int
    image_dim: int
    n_captions: int
    text_dim: int
    views: int
    itemsize: int
    concept_nnz: int = 0
    concept_text_numbers: int = 0
    n_concepts: int = 0


def cache_shape(path: Path, with_views: bool) -> CacheShape:
    """A cache file's sizes and widths from its header (nothing but shapes is read)."""
    with open_cache(path) as f:
        img, cap = f[schema.IMAGE_FEATURES], f[schema.CAPTION_FEATURES]
        views = int(f[schema.VIEW_FEATURES].shape[1]) if with_views and schema.VIEW_FEATURES in f else 0
        nnz = int(f[schema.CONCEPT_INDICES].shape[0]) if schema.CONCEPT_INDICES in f else 0
        ctf = int(math.prod(f[schema.CONCEPT_TEXT_FEATURES].shape)) if schema.CONCEPT_TEXT_FEATURES in f else 0
        concepts = int(f[schema.CONCEPT_IDS].shape[0]) if schema.CONCEPT_IDS in f else 0
        return CacheShape(int(img.shape[0]), int(img.shape[1]), int(cap.shape[0]), int(cap.shape[1]), views,
                      int(img.dtype.itemsize), nnz, ctf, concepts)


def _head_numbers(config: AdaptConfig, image_dim: int, text_dim: int) -> int:
    """Parameters and buffers of both heads, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        heads = build_heads({**config.to_dict(), "image_dim": image_dim, "text_dim": text_dim})
    return sum(t.numel() for h in heads for t in (*h.parameters(), *h.buffers()))


@dataclass(frozen=True)
class AdaptMemoryPlan(MemoryPlan):
    """How an adapter run holds its training split; its phases, one after the other, are training,
    then the query bank's choice (then a refit, when planned)."""

    stream: bool = False
    chunk_rows: int = 0  # captions per streamed block, and rows per pass of the input statistics
    refit: bool = False  # the heads are trained again on train + valid after the choice (its phase planned)

    def describe(self) -> str:
        how = (f"train streamed from disk in chunks of {self.chunk_rows:,} captions" if self.stream
               else "train held in memory")
        how += "; then refit on train + valid" if self.refit else ""
        return f"{how}; {super().describe()}"


def plan_memory(config: AdaptConfig, train_path: str | Path, valid_path: str | Path) -> AdaptMemoryPlan:
    """The plan for training `config` on these cache files within `config.max_memory_gb`; raises
    MemoryBudgetError (one line) when even streaming does not fit."""
    train = cache_shape(Path(train_path), config.use_views)
    valid = cache_shape(Path(valid_path), False)
    budget = int(config.max_memory_gb * GB)
    embed_bytes = 4 * config.dim * config.ensemble
    bank_img, bank_cap = min(train.n_images, BANK_ROWS), min(train.n_captions, BANK_ROWS)
    valid_rows = valid.n_images + valid.n_captions
    held = {
        "process": PROCESS_BYTES,
        "heads": STATE_COPIES * 4 * _head_numbers(config, train.image_dim, train.text_dim),
        # float32 features, their embeddings, and one 4,096-caption block of scores while ranking
        "valid": 4 * (valid.n_images * valid.image_dim + valid.n_captions * valid.text_dim) + valid_rows * embed_bytes
        + 3 * 4 * min(valid.n_captions, 4096) * valid.n_images,
        "concept labels": 16 * train.concept_nnz + 8 * train.n_images + 4 * train.concept_text_numbers,
        "batches": SLACK_BYTES,
    }
    if config.hard_negatives > 0:  # each caption's nearest captions, kept for every block
        held["hard negatives"] = 8 * config.hard_pool * train.n_captions
    # after training: the bank's features and embeddings, and a block of valid x bank scores (hubness takes
    # valid rows in blocks of at most 256 MiB of float64-sized scores)
    bank_rows = max(bank_img, bank_cap, 1)
    block = min(max(valid.n_images, valid.n_captions), 8192, max(1, (256 << 20) // (8 * bank_rows)))
    bank = 4 * (bank_img * train.image_dim + bank_cap * train.text_dim) + (bank_img + bank_cap) * embed_bytes
    bank += 6 * block * bank_rows
    widest = max(train.image_dim, train.text_dim)
    stats_row = (train.itemsize + 16) * widest  # a row of a statistics pass: as stored, float64 and its square
    numbers = train.n_images * train.image_dim * (1 + train.views) + train.n_captions * train.text_dim
    whole = AdaptMemoryPlan(budget, {
        **held,
        # float32 features, plus the stored copy they are widened from while reading
        "train": (4 + train.itemsize) * numbers + CAPTION_TEXT_BYTES * train.n_captions,
    }, {"statistics pass": stats_row * min(config.chunk_rows, max(train.n_images, train.n_captions)),
        "query bank": bank}, chunk_rows=config.chunk_rows)
    if config.head != "cca" and config.refit is not False:
        # train + valid joined as float32 (valid read again with its views), fresh heads and their state
        valid_numbers = valid.n_images * valid.image_dim * (1 + train.views) + valid.n_captions * valid.text_dim
        joined = (4 + train.itemsize) * valid_numbers + 4 * (numbers + valid_numbers)
        refit = AdaptMemoryPlan(budget, whole.held, {
            **whole.phases, "refit on train + valid": joined + CAPTION_TEXT_BYTES * (train.n_captions + valid.n_captions)
            + STATE_COPIES * 4 * _head_numbers(config, train.image_dim, train.text_dim)
            # the input statistics of the fresh heads, a pass over the joined copy
            + stats_row * min(config.chunk_rows, train.n_images + valid.n_images + train.n_captions + valid.n_captions)},
            chunk_rows=config.chunk_rows, refit=True)
        if refit.total <= budget:
            return refit
        if config.refit:
            raise MemoryBudgetError(
                f"{Path(train_path).parent}: --refit holds train + valid in memory: {format_bytes(refit.total)} "
                f"({refit.largest()}), above --max-memory-gb {config.max_memory_gb:g}; raise it to at least "
                f"{gib_up(refit.total)} or pass --no-refit")
    if config.head == "cca" or whole.total <= budget:
        if whole.total > budget:
            raise MemoryBudgetError(
                f"{Path(train_path).parent}: the closed-form head (--head cca) holds the training split in memory: "
                f"{format_bytes(whole.total)} ({whole.largest()}), above --max-memory-gb {config.max_memory_gb:g}; "
                f"raise it to at least {gib_up(whole.total)}")
        return whole
    held["caption index"] = CAPTION_INDEX_BYTES * train.n_captions
    # a block of captions: their features and their images' (one image per caption at most), as stored, and
    # the copy a read makes; a hard-negative search also scores 2,048 captions against the block
    per_row = 2 * train.itemsize * (train.text_dim + train.image_dim * (1 + train.views))
    per_row += 4 * 3 * 2048 if config.hard_negatives > 0 else 0
    per_row = max(per_row, stats_row)
    room = budget - sum(held.values())
    rows = min(config.chunk_rows, room // per_row) if room > 0 else 0
    floor = min(config.chunk_rows, max(MIN_CHUNK_ROWS, 4 * config.batch_size))  # smaller chunks: too many reads
    plan = AdaptMemoryPlan(budget, held, {"chunk": max(rows, floor) * per_row, "query bank": bank}, stream=True,
                           chunk_rows=int(max(rows, floor)))
    if rows < floor or plan.total > budget:
        raise MemoryBudgetError(
            f"{Path(train_path).parent}: training needs at least {format_bytes(plan.total)} even with the training "
            f"split streamed ({plan.largest()}), above --max-memory-gb {config.max_memory_gb:g}; "
            f"raise it to at least {gib_up(plan.total)}")
    return plan
