"""Retrieval ranks over a whole pool, computed in chunks.

Lives in the adapt phase because early stopping needs the same numbers that evaluation reports;
`evaluate/` imports it from here (data flows adapt -> evaluate, never back).

Ties are counted against the query: a positive shares its rank with every negative scoring the
same, so a collapsed embedding (all scores equal) ranks last instead of first.
"""
from __future__ import annotations

import torch


def _as_unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the correct item for every text query (t2i) and every image query (i2t).

    image_emb [N, D], text_emb [M, D], caption_image [M] (row of each caption's image).
    An image query is a hit at the best-ranked of its captions. Memory stays at one reused
    chunk x pool score buffer.

    One GEMM and one counting pass per chunk: the positives' scores are gathered from the chunk's
    own score matrix (bit-identical to what they are compared with), and an image's rank is
    (captions scoring >= its best caption) - (its own captions doing so) + 1.
    """
    if normalize:
        image_emb, text_emb = _as_unit(image_emb), _as_unit(text_emb)
    caption_image = caption_image.long().to(text_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = text_emb.device

    t2i = torch.empty(n_txt, dtype=torch.long)
    buf = torch.empty(min(chunk, n_txt), n_img, device=device)
    for s in range(0, n_txt, chunk):
        sims = torch.matmul(text_emb[s : s + chunk], image_emb.T, out=buf[: min(chunk, n_txt - s)])
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


def recall_summary(image_emb, text_emb, caption_image, ks=(1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Flat numbers: t2i_R@k, i2t_R@k (in %), medians, and `mean_recall` (mean of all R@k)."""
    t2i, i2t = retrieval_ranks(image_emb, text_emb, caption_image, chunk=chunk)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100 * recall_at(t2i, k)
        out[f"i2t_R@{k}"] = 100 * recall_at(i2t, k)
    out["t2i_medr"] = float(t2i.float().median())
    out["i2t_medr"] = float(i2t.float().median())
    out["t2i_meanr"] = float(t2i.float().mean())
    out["i2t_meanr"] = float(i2t.float().mean())
    out["mean_recall"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks) / (2 * len(ks))
    return out
