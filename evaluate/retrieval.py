"""Text->image and image->text retrieval over a whole split, as CLIP-style papers report it.

R@K depends on the pool: R@10 is the top 2.2% of roco-rad's 454 test images but the top 0.5% of the
2,000-pair pool published ROCO numbers use. So besides R@K the section reports recall at fixed shares
of the pool (`t2i_R@0.5%`, ...) and, for a pool above 2,000 items, the mean and spread of R@K over
random 2,000-item subsets (`t2i_R@10_of2000`, `..._std`): numbers that sit beside published ones.

`compute(...) -> dict` and `chance(...) -> dict` of flat named numbers, and `METRIC`, the section
`eval` scores with them (registered in `evaluate.metrics`). The ranking and its
summary are `common.ranking`'s (ties count against the query; an image query is a hit at the
best-ranked of its captions; K above the pool is capped; the per-query ranks, `ranks`, chunked to a
memory budget, and R@K with its bootstrap interval, `summarize`), so early stopping, the report and
a model's export can never disagree. This module adds what a report needs on top: recall at shares
of the pool and on subsets, the recall@K curve, and the exact chance levels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import gammaln

from medembed.common.ranking import (
    DEFAULT_MEMORY_MB,
    RetrievalRanks,
    hits,
    ranks,
    recall_at,
    summarize,
    summarize_ranks,
)
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, fraction_key, recall_key
from medembed.common.stats import rate_interval
from medembed.evaluate.metric import ColumnInputs, Metric, Needs, Scores, SectionView
from medembed.evaluate.tables import markdown_table

CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # the recall@K figure's Ks (with the asked-for ones)
# Recall at a fixed share of the pool, comparable across pool sizes: on the 2,000-pair ROCO test pool
# that published work samples, R@0.5% is R@10 and R@1% is R@20
FRACTIONS = (0.5, 1.0)
SUBSET, SUBSET_DRAWS = 2000, 20  # a pool above 2,000 items is also scored on random 2,000-item subsets
def compute(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_image: torch.Tensor,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> dict[str, float]:
    """Recall@K both ways, ranks and pool sizes of unit embeddings over their whole pool."""
    return summarize(ranks(image_emb, text_emb, caption_image, memory_mb), ks)


def recall_curve(rank: torch.Tensor, ks: list[int], pool: int) -> list[float]:
    """R@K in percent for each K (for the recall@K plot); K is capped at the pool as in `summarize`."""
    return [100 * recall_at(rank, min(k, pool)) for k in ks]


def curve_ks(ks: list[int], pool: int) -> list[int]:
    """The recall@K figure's Ks: the usual ones up to the pool, the asked-for ones, and 1."""
    return sorted({k for k in (*CURVE_KS, *ks) if k <= max(pool, 1)} | {1})


# --- chance -------------------------------------------------------------------------------------


def _p_first_positive_within(pool: int, positives: np.ndarray, k: int) -> np.ndarray:
    """P(at least one of c positives lands in the top k of a random order of `pool` items)."""
    c = positives.astype(np.float64)
    out = np.zeros_like(c)
    has = c > 0
    sure = has & (k > pool - c)  # fewer negatives than k: a positive must be in the top k
    out[sure] = 1.0
    rest = has & ~sure
    if rest.any() and k > 0:
        cr = c[rest]
        # C(pool-c, k) / C(pool, k) via log-gamma, exact up to float rounding
        log_miss = gammaln(pool - cr + 1) - gammaln(pool - cr - k + 1) - gammaln(pool + 1) + gammaln(pool - k + 1)
        out[rest] = 1.0 - np.exp(log_miss)
    return out


def chance(caption_image: torch.Tensor, n_images: int, ks: list[int] | tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Expected numbers for a scorer that orders the pool at random (no ties).

    t2i: the own image is uniform over the N images. i2t: an image with c captions is found at the
    first of c positions drawn without replacement from M, so P(hit@K) = 1 - C(M-c,K)/C(M,K),
    E[rank] = (M+1)/(c+1); an image without captions ranks M+1 as in `retrieval_ranks`.
    The median is the smallest r with P(rank <= r) >= 1/2 over all queries of a direction.
    """
    caption_image = torch.as_tensor(caption_image).long()
    m = int(caption_image.shape[0])
    n = int(n_images)
    counts = np.bincount(caption_image.numpy(), minlength=n)[:n] if n else np.zeros(0, int)
    out: dict[str, float] = {}
    for k in ks:
        out[recall_key("t2i", k)] = 100.0 * min(k, n) / n if n else float("nan")
    for k in ks:
        out[recall_key("i2t", k)] = 100.0 * float(_p_first_positive_within(m, counts, k).mean()) if n else float("nan")
    out["t2i_medr"] = float(math.ceil(n / 2)) if n else float("nan")
    out["t2i_meanr"] = (n + 1) / 2 if n else float("nan")
    if n:
        lo, hi = 1, m + 1  # smallest r with P(rank <= r) >= 1/2 over all image queries
        while lo < hi:
            mid = (lo + hi) // 2
            if _p_first_positive_within(m, counts, mid).mean() >= 0.5:
                hi = mid
            else:
                lo = mid + 1
        out["i2t_medr"] = float(lo)
        expected = np.where(counts > 0, (m + 1) / (counts + 1.0), m + 1.0)
        out["i2t_meanr"] = float(expected.mean())
    else:
        out["i2t_medr"] = out["i2t_meanr"] = float("nan")
    out["pool_images"] = n
    out["pool_captions"] = m
    return out


def recall_at_fraction(rank: torch.Tensor, pool: int, percent: float) -> float:
    """R@K in % at K = `percent`% of the pool; where that K is not whole, linear between the whole
    Ks around it (R@0 = 0), so on a 2,000-item pool R@0.5% is exactly R@10."""
    if pool == 0 or rank.numel() == 0:
        return float("nan")
    k = percent / 100 * pool
    lo, hi = math.floor(k), min(math.ceil(k), pool)
    at = {kk: (100 * recall_at(rank, kk) if kk >= 1 else 0.0) for kk in {lo, hi}}
    return at[hi] if hi == lo else at[lo] + (k - lo) * (at[hi] - at[lo])


def fraction_recalls(r: RetrievalRanks, percents: tuple[float, ...] = FRACTIONS) -> dict[str, float]:
    """`recall_at_fraction` of both directions (t2i over the images, i2t over the captions)."""
    return {fraction_key(d, p): recall_at_fraction(rk, pool, p) for d, rk, pool in
            (("t2i", r.t2i, r.pool_images), ("i2t", r.i2t, r.pool_captions)) for p in percents}


def subset_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                   ks: list[int] | tuple[int, ...], image_offset: torch.Tensor | None = None,
                   caption_offset: torch.Tensor | None = None, size: int = SUBSET, draws: int = SUBSET_DRAWS,
                   seed: int = 0, memory_mb: float = DEFAULT_MEMORY_MB) -> dict[str, float]:
    """Mean and standard deviation of R@K (and R@p%) over `draws` random subsets of `size` images with
    their captions, each ranked on its own: a large pool's numbers on the footing of a `size`-item
    pool. Empty when the pool has no more than `size` images. The query bank's offsets are per
    gallery item, so each subset keeps its items' offsets."""
    caption_image = torch.as_tensor(caption_image).long()
    n = image_emb.shape[0]
    if n <= size:
        return {}
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    for _ in range(draws):
        keep = torch.randperm(n, generator=gen)[:size].sort().values
        new_row = torch.full((n,), -1, dtype=torch.long)
        new_row[keep] = torch.arange(size)
        rows = (new_row[caption_image] >= 0).nonzero().squeeze(1)
        r = ranks(image_emb[keep], text_emb[rows], new_row[caption_image[rows]], memory_mb,
                  None if image_offset is None else image_offset[keep],
                  None if caption_offset is None else caption_offset[rows])
        scored = {**summarize_ranks(r.t2i, r.i2t, r.pool_images, r.pool_captions, ks), **fraction_recalls(r)}
        for key, value in scored.items():
            if "R@" in key:
                values.setdefault(key, []).append(value)
    out = {}
    for key, vs in values.items():
        out[f"{key}_of{size}"] = float(np.mean(vs))
        out[f"{key}_of{size}_std"] = float(np.std(vs, ddof=1)) if len(vs) > 1 else 0.0
    return out


# --- the eval section ---------------------------------------------------------------------------


def _score(inputs: ColumnInputs, _settings: None) -> Scores:
    """R@K by the column's own ranking (a run's query bank; plain-cosine R@K kept beside it as
    `cosine_*`), each R@K's bootstrap interval computed once for the figure's bands and the tables,
    and every query's hit at each asked-for K (paired differences between runs)."""
    img, txt, test, ks = inputs.images(), inputs.texts(), inputs.test, inputs.ks
    plain = {}
    if inputs.model.gallery_offsets is not None:
        p = ranks(img, txt, test.caption_image, inputs.memory_mb)
        cosine = summarize_ranks(p.t2i, p.i2t, p.pool_images, p.pool_captions, ks)
        plain = {f"cosine_{recall_key(d, k)}": cosine[recall_key(d, k)] for d in DIRECTIONS for k in ks}
    image_offset, caption_offset = inputs.offsets()
    r = ranks(img, txt, test.caption_image, inputs.memory_mb, image_offset, caption_offset)
    cks = curve_ks(ks, r.pool_images)
    curves: dict[str, list] = {"ks": cks}
    intervals = {}
    for d in DIRECTIONS:
        curves[d] = [100 * float(hits(r, d, k).mean()) for k in cks]
        curves[f"{d}_band"] = [rate_interval(hits(r, d, k)) for k in cks]
        intervals.update({recall_key(d, k): band for k, band in zip(cks, curves[f"{d}_band"])})
    per_query = {recall_key(d, k): hits(r, d, k) for d in DIRECTIONS for k in ks}
    comparable = {**fraction_recalls(r), **subset_recalls(img, txt, test.caption_image, ks, image_offset,
                                                          caption_offset, memory_mb=inputs.memory_mb)}
    return Scores({**summarize(r, ks, intervals), **comparable, **plain}, hits=per_query, curves=curves, detail=r)


def _chance(inputs: ColumnInputs, _settings: None) -> Scores:
    test = inputs.test
    cks = curve_ks(inputs.ks, max(test.n_images, 1))
    full = chance(test.caption_image, test.n_images, cks)
    curves = {"ks": cks, **{d: [full[recall_key(d, k)] for k in cks] for d in DIRECTIONS}}
    return Scores({**chance(test.caption_image, test.n_images, inputs.ks),
                   **chance_at_fractions(test.caption_image, test.n_images)}, curves=curves)


def chance_at_fractions(caption_image: torch.Tensor, n_images: int,
                        percents: tuple[float, ...] = FRACTIONS) -> dict[str, float]:
    """Chance R@p%, interpolated between whole Ks as `recall_at_fraction` is."""
    m = int(torch.as_tensor(caption_image).shape[0])
    out = {}
    for d, pool in (("t2i", int(n_images)), ("i2t", m)):
        for p in percents:
            k = p / 100 * pool
            lo, hi = math.floor(k), min(math.ceil(k), pool)
            at = {kk: (chance(caption_image, n_images, [kk])[recall_key(d, kk)] if kk >= 1 else 0.0) for kk in {lo, hi}}
            out[fraction_key(d, p)] = at[hi] if hi == lo or pool == 0 else at[lo] + (k - lo) * (at[hi] - at[lo])
    return out


def _report(view: SectionView[None]) -> list[str]:
    out = [f"## {view.title}", "", "Recall@K in %, with its 95% bootstrap interval over queries in brackets. "
           "Image->text is a hit when any of the image's captions is in the top K; text->image uses each "
           "caption's own image. Ties count against the query. R@p% is recall at p% of the pool (K = p% of the "
           "images, or of the captions for image->text; linear between whole Ks): on the 2,000-pair ROCO test "
           "pool of published results, R@0.5% is R@10 and R@1% is R@20. A pool above 2,000 images is also scored "
           "on 20 random 2,000-image subsets (`_of2000`: mean, `_std`: spread).", ""]
    out += [markdown_table(view.columns, view.keys), ""]
    if view.paired:
        out += [f"Paired comparison with `{view.first}` on the same queries (bootstrap over queries):", "",
                *view.paired, ""]
    if "figure" in view.files:
        out += [f"![recall@K]({view.files['figure']})", ""]
    return out


METRIC = Metric(
    section="retrieval", title="Retrieval",
    keys=r"(cosine_)?(t2i|i2t)_(R@\d+(_ci_low|_ci_high)?|medr|meanr)|(t2i|i2t)_R@[\d.]+%|"
         r"(t2i|i2t)_R@[\d.]+%?_of\d+(_std)?|pool_images|pool_captions",
    headline=r"(t2i|i2t)_(R@\d+|R@[\d.]+%|medr)", score=_score, chance=_chance, needs=Needs(texts=True), report=_report,
    optional=False,  # every evaluation reports retrieval
)
