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
    An image query is a hit at the best-ranked of its captions. Memory stays at chunk x pool.
    """
    if normalize:
        image_emb, text_emb = _as_unit(image_emb), _as_unit(text_emb)
    caption_image = caption_image.long().to(text_emb.device)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]

    t2i = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk):
        sims = text_emb[s : s + chunk] @ image_emb.T  # [c, N]
        own = caption_image[s : s + chunk]
        pos = sims.gather(1, own[:, None])
        t2i[s : s + chunk] = (sims >= pos).sum(1).cpu()  # counts itself: rank >= 1

    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sims = image_emb[s : s + chunk] @ text_emb.T  # [c, M]
        rows = torch.arange(s, min(s + chunk, n_img), device=sims.device)
        is_pos = caption_image[None, :] == rows[:, None]
        best_pos = sims.masked_fill(~is_pos, float("-inf")).max(1).values
        better_neg = ((sims >= best_pos[:, None]) & ~is_pos).sum(1)
        has_pos = is_pos.any(1)
        # an image without captions can never be retrieved: rank past the pool
        i2t[s : s + chunk] = torch.where(has_pos, better_neg + 1, torch.full_like(better_neg, n_txt + 1)).cpu()
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
