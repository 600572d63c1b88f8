"""Rankings and the numbers read off them: retrieval ranks over a whole pool (computed in chunks),
Recall@K with its bootstrap interval, the best k of a pool for each query, and per-column average
precision and ROC AUC.

The one home of these computations: early stopping (adapt), the report (evaluate) and search and
export (serve) all import them, so the recall a run was selected on is computed exactly as the
recall it is reported and exported with, and a search ranks as its evaluation did.

Ties are counted against the query: a positive shares its rank with every negative scoring the
same, so a collapsed embedding (all scores equal) ranks last instead of first.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, MEAN_RECALL, recall_key
from medembed.common.tensors import unit

DEFAULT_MEMORY_MB = 256  # score matrices held at once while ranking a split or a pool
# bytes per score held at once while ranking one chunk: `retrieval_ranks` keeps one reused float32
# score buffer and counts in place, plus the float sum's temporaries
_BYTES_PER_SCORE = 8


def _count_at_least_(sims: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries are >= that row's threshold; overwrites `sims`.

    In-place float passes (x - t -> sign -> +1 -> min 1 gives 1 exactly where x >= t) then a float
    sum: vectorised end to end, several times faster than summing a bool mask, and no mask memory.
    Float32 sums of 0/1 are exact below 2**24 entries per row; longer rows sum in float64.
    """
    ones = sims.sub_(threshold).sign_().add_(1).clamp_(max=1)
    dtype = torch.float32 if sims.shape[1] < 2**24 else torch.float64
    return ones.sum(1, dtype=dtype).long()


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_image: torch.Tensor,
    chunk: int = 4096,
    normalize: bool = True,
    image_offset: torch.Tensor | None = None,
    caption_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the correct item for every text query (t2i) and every image query (i2t).

    image_emb [N, D], text_emb [M, D], caption_image [M] (row of each caption's image).
    `image_offset` [N] / `caption_offset` [M], when given, are added to every score of that gallery
    item (a query-bank correction, `common.querybank`): t2i ranks images by cos + image_offset,
    i2t ranks captions by cos + caption_offset.
    An image query is a hit at the best-ranked of its captions. Memory stays at one reused
    chunk x pool score buffer.

    One GEMM and one counting pass per chunk: the positives' scores are gathered from the chunk's
    own score matrix (bit-identical to what they are compared with), and an image's rank is
    (captions scoring >= its best caption) - (its own captions doing so) + 1.
    """
    if normalize:
        image_emb, text_emb = unit(image_emb), unit(text_emb)
    caption_image = caption_image.long().to(text_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = text_emb.device

    t2i = torch.empty(n_txt, dtype=torch.long)
    buf = torch.empty(min(chunk, n_txt), n_img, device=device)
    for s in range(0, n_txt, chunk):
        sims = torch.matmul(text_emb[s : s + chunk], image_emb.T, out=buf[: min(chunk, n_txt - s)])
        if image_offset is not None:
            sims += image_offset.to(device=device, dtype=sims.dtype)
        pos = sims.gather(1, caption_image[s : s + chunk, None])
        t2i[s : s + chunk] = _count_at_least_(sims, pos).cpu()  # counts itself: rank >= 1

    # captions grouped by image: the positives of an image chunk are one contiguous slice
    order = torch.argsort(caption_image, stable=True)
    bounds = torch.searchsorted(caption_image[order], torch.arange(n_img + 1, device=device))
    i2t = torch.empty(n_img, dtype=torch.long)
    buf = torch.empty(min(chunk, n_img), n_txt, device=device)
    for s in range(0, n_img, chunk):
        e = min(s + chunk, n_img)
        sims = torch.matmul(image_emb[s:e], text_emb.T, out=buf[: e - s])
        if caption_offset is not None:
            sims += caption_offset.to(device=device, dtype=sims.dtype)
        cols = order[bounds[s] : bounds[e]]
        rows = caption_image[cols] - s
        pos = sims[rows, cols]
        best = torch.full((e - s,), float("-inf"), device=device).scatter_reduce(0, rows, pos, "amax")
        own_at_best = torch.zeros(e - s, dtype=torch.long, device=device).index_add_(0, rows, (pos >= best[rows]).long())
        at_least = _count_at_least_(sims, best[:, None])
        # an image without captions can never be retrieved: rank past the pool
        i2t[s:e] = torch.where(own_at_best > 0, at_least - own_at_best + 1, torch.full_like(at_least, n_txt + 1)).cpu()
    return t2i, i2t


def recall_at(ranks: torch.Tensor, k: int) -> float:
    return float((ranks <= k).float().mean()) if ranks.numel() else float("nan")


def summarize_ranks(t2i: torch.Tensor, i2t: torch.Tensor, n_images: int, n_captions: int,
                    ks=DEFAULT_KS) -> dict[str, float]:
    """Flat numbers of a ranking: t2i_R@k and i2t_R@k in %, median and mean ranks, and
    `mean_recall` (the mean of all R@k, what early stopping maximises).

    K above the pool is capped at it (every retrievable item is then found; an image without
    captions ranks past the pool and stays a miss at any K)."""
    out: dict[str, float] = {}
    for k in ks:
        out[recall_key("t2i", k)] = 100 * recall_at(t2i, min(k, n_images))
    for k in ks:
        out[recall_key("i2t", k)] = 100 * recall_at(i2t, min(k, n_captions))
    for name, rk in (("t2i", t2i), ("i2t", i2t)):
        out[f"{name}_medr"] = float(rk.float().median()) if rk.numel() else float("nan")
        out[f"{name}_meanr"] = float(rk.float().mean()) if rk.numel() else float("nan")
    out[MEAN_RECALL] = sum(out[recall_key(d, k)] for d in DIRECTIONS for k in ks) / (2 * len(ks))
    return out


def recall_summary(image_emb, text_emb, caption_image, ks=DEFAULT_KS, chunk: int = 4096) -> dict[str, float]:
    """`summarize_ranks` of the ranking of these embeddings (normalised here)."""
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, chunk=chunk)
    return summarize_ranks(t2i, i2t, image_emb.shape[0], text_emb.shape[0], ks)


# --- a whole split, chunked to a memory budget (eval, sweeps, export) -----------------------------


def chunk_rows(pool: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Query rows per chunk so one chunk's score matrices fit in `memory_mb`."""
    rows = int(memory_mb * 2**20 // (max(pool, 1) * _BYTES_PER_SCORE))
    return max(16, min(rows, 8192))


@dataclass
class RetrievalRanks:
    t2i: torch.Tensor  # [M] 1-based rank of each caption's own image among all images
    i2t: torch.Tensor  # [N] 1-based rank of each image's best caption among all captions
    pool_images: int
    pool_captions: int


def ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_image: torch.Tensor,
    memory_mb: float = DEFAULT_MEMORY_MB,
    image_offset: torch.Tensor | None = None,
    caption_offset: torch.Tensor | None = None,
) -> RetrievalRanks:
    """Ranks of every query of both directions; the offsets (a run's query bank) are added to each
    gallery image's / caption's cosines."""
    caption_image = torch.as_tensor(caption_image).long()
    n, m = image_emb.shape[0], text_emb.shape[0]
    if caption_image.shape[0] != m:
        raise ValueError(f"caption_image has {caption_image.shape[0]} rows but there are {m} caption embeddings")
    if m and (caption_image.min() < 0 or caption_image.max() >= n):
        raise ValueError(f"caption_image points outside the {n} images (range {caption_image.min()}..{caption_image.max()})")
    chunk = chunk_rows(max(n, m), memory_mb)
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, chunk=chunk, image_offset=image_offset,
                               caption_offset=caption_offset)
    return RetrievalRanks(t2i, i2t, n, m)


def summarize(r: RetrievalRanks, ks: list[int] | tuple[int, ...] = DEFAULT_KS,
              intervals: Mapping[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Flat numbers of given ranks: R@K in percent for each direction (K capped at the pool) with
    its bootstrap 95% interval over queries (`_ci_low`, `_ci_high`), median/mean rank, pool sizes.
    `intervals` ("t2i_R@K" -> (low, high)) are ones already computed; the others are computed here."""
    # scipy.stats costs half a second to import; early stopping, which imports this module, needs no interval
    from medembed.common.stats import rate_interval

    out = summarize_ranks(r.t2i, r.i2t, r.pool_images, r.pool_captions, ks)
    del out[MEAN_RECALL]
    for name in DIRECTIONS:
        for k in ks:
            key = recall_key(name, k)
            known = (intervals or {}).get(key)
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = known if known is not None else rate_interval(hits(r, name, k))
    out["pool_images"] = r.pool_images
    out["pool_captions"] = r.pool_captions
    return out


def hits(r: RetrievalRanks, direction: str, k: int) -> np.ndarray:
    """Per query of a direction ("t2i" or "i2t"): was it a hit at K (K capped at the pool)."""
    rk, pool = (r.t2i, r.pool_images) if direction == "t2i" else (r.i2t, r.pool_captions)
    return (rk <= min(k, pool)).numpy()


# --- top-k over a pool (examples, search) ---------------------------------------------------------


@torch.no_grad()
def top_k(
    queries: torch.Tensor, pool: torch.Tensor, k: int, memory_mb: float = DEFAULT_MEMORY_MB,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k pool rows for each query by dot product (+ `offset` [P] per pool row, a run's query
    bank): (scores [Q, k], rows [Q, k]).

    Streams over the pool in blocks and merges running top-k lists, so memory stays at
    Q x block whatever the pool size.
    """
    q = queries.shape[0]
    k = min(k, pool.shape[0])
    block = max(1024, int(memory_mb * 2**20 // (max(q, 1) * 8)))
    best_s = torch.full((q, 0), float("-inf"))
    best_i = torch.zeros((q, 0), dtype=torch.long)
    for s in range(0, pool.shape[0], block):
        sims = queries.float() @ pool[s : s + block].float().T
        if offset is not None:
            sims += offset[s : s + block].float()
        bs, bi = sims.topk(min(k, sims.shape[1]), dim=1)
        cat_s = torch.cat([best_s, bs], 1)
        cat_i = torch.cat([best_i, bi + s], 1)
        keep = cat_s.topk(min(k, cat_s.shape[1]), dim=1).indices
        best_s, best_i = cat_s.gather(1, keep), cat_i.gather(1, keep)
    return best_s, best_i


# --- per-column ranking scores --------------------------------------------------------------------


def _sorted_groups(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, scores sorted descending: (positives in each run of tied scores, that run's end
    rank), both [N, C]; a run's count sits at its last row, other rows of the run hold 0."""
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    s = scores.gather(0, order)
    y = labels.gather(0, order).double()
    tp = y.cumsum(0)
    ends = torch.ones_like(s, dtype=torch.bool)
    ends[:-1] = s[:-1] != s[1:]  # the last row of every run of equal scores
    at_end = torch.where(ends, tp, torch.zeros_like(tp))
    # positives per run = cumulative count at its end minus the cumulative count at the previous end
    prev = torch.cummax(torch.cat([torch.zeros_like(at_end[:1]), at_end[:-1]]), dim=0).values
    return torch.where(ends, tp - prev, torch.zeros_like(tp)), ends


# Why not scikit-learn's average_precision_score / roc_auc_score: they score one column at a time in
# numpy; evaluation scores thousands of concept columns over up to 100k images, so these take a block
# of columns per sorting pass in torch with bounded memory. The tests check them against scikit-learn.
def average_precision(scores: torch.Tensor, labels: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Average precision of every column of `scores` [N, C] against 0/1 `labels` [N, C], with
    tied scores treated as one threshold (as scikit-learn's average_precision_score does):
    AP = sum over thresholds of (recall gained) x (precision there). NaN for a column without
    positives. Columns go `block` at a time: the sorting passes hold about a dozen N x block float64
    arrays (300 MB at 100k rows and 32 columns, hence 8)."""
    if scores.shape[1] > block:
        return torch.cat([average_precision(scores[:, s : s + block], labels[:, s : s + block], block)
                          for s in range(0, scores.shape[1], block)])
    labels = labels.to(scores.device)
    gained, ends = _sorted_groups(scores.double(), labels)
    rank = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device)[:, None]
    precision = gained.cumsum(0) / rank
    positives = labels.double().sum(0)
    ap = (gained * precision * ends).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def roc_auc(scores: torch.Tensor, labels: torch.Tensor, block: int = 8) -> torch.Tensor:
    """ROC AUC of every column (the Mann-Whitney statistic, ties counting one half, as
    scikit-learn's roc_auc_score); NaN for a column with no positive or no negative. Columns go
    `block` at a time."""
    if scores.shape[1] > block:
        return torch.cat([roc_auc(scores[:, s : s + block], labels[:, s : s + block], block)
                          for s in range(0, scores.shape[1], block)])
    labels = labels.to(scores.device).double()
    n = scores.shape[0]
    order = torch.argsort(scores.double(), dim=0, stable=True)
    s = scores.double().gather(0, order)
    ranks = torch.empty_like(s)
    ranks.scatter_(0, order, torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)[:, None].expand_as(s))
    # average the ranks of tied scores: mean of first and last rank of each run of equal values
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    run = new.long().cumsum(0) - 1
    cols = torch.arange(s.shape[1], device=scores.device)[None, :].expand_as(run)
    key = run * s.shape[1] + cols
    first = torch.full((n * s.shape[1],), float(n + 1), dtype=torch.float64, device=scores.device)
    last = torch.zeros(n * s.shape[1], dtype=torch.float64, device=scores.device)
    pos_sorted = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)[:, None].expand_as(s)
    first.scatter_reduce_(0, key.reshape(-1), pos_sorted.reshape(-1), "amin")
    last.scatter_reduce_(0, key.reshape(-1), pos_sorted.reshape(-1), "amax")
    avg_sorted = ((first + last) / 2)[key]
    ranks.scatter_(0, order, avg_sorted)
    p = labels.sum(0)
    q = n - p
    auc = ((ranks * labels).sum(0) - p * (p + 1) / 2) / (p * q)
    return torch.where((p > 0) & (q > 0), auc, torch.full_like(auc, float("nan")))
