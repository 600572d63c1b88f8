"""Query-bank normalisation: a cross-modal score corrected for hubness.

In a shared embedding space a few gallery items ("hubs") sit close to very many queries and crowd
the top of every ranking. A bank of queries the model has seen (the train split's captions for an
image gallery, its images for a caption gallery) measures this: an item's hubness is the mean cosine
to its k nearest bank entries, and the corrected score is

    score(q, g) = cos(q, g) - beta * hubness(g)

(the cross-domain similarity local scaling of Conneau et al. 2018, with the query term dropped as it
does not change a query's ranking; Bogolin et al. 2022 call this family query-bank normalisation).
The bank is train data, never the queries being ranked, so each query is ranked on its own, as a
search page does. k and beta are chosen per direction on the valid split; beta = 0 is in the grid,
so the choice never lowers valid recall.

Because the correction is a per-gallery-item offset, it ranks with the same exact code as plain
cosine (`ranking.retrieval_ranks(..., image_offset=, caption_offset=)`), and an inner-product index
holds it as one more coordinate: [g, -beta * hubness(g)] against [q, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medembed.common.ranking import retrieval_ranks, summarize_ranks
from medembed.common.recall_keys import DEFAULT_KS, recall_key
from medembed.common.tensors import unit

KS = (10, 30, 100)
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# what a ranked score is called in run listings, sweep boards and search results
BANK_SCORE = "cos − β·hub"  # a run ranking with its query bank: cosine − beta * hubness
COSINE = "cosine"  # plain cosine


@dataclass(frozen=True)
class BankSide:
    """The correction of one gallery: its k nearest bank entries, weighted by beta (0: off)."""

    k: int = 0
    beta: float = 0.0

    @property
    def active(self) -> bool:
        return self.beta > 0 and self.k > 0


@dataclass(frozen=True)
class QueryBank:
    """Corrections of both galleries and where their banks come from.

    images: offsets of gallery images (text->image search), bank = the `bank_split`'s captions;
    captions: offsets of gallery captions (image->text search), bank = its images."""

    images: BankSide = BankSide()
    captions: BankSide = BankSide()
    bank_split: str = "train"
    bank_features: str = ""  # the features folder whose bank_split is the bank (the run's training cache)
    # at most this many rows of each side of the bank split, evenly spaced (`bank_sample`); 0: every row
    bank_rows: int = 0

    @property
    def active(self) -> bool:
        return self.images.active or self.captions.active

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QueryBank:
        return cls(BankSide(**d.get("images", {})), BankSide(**d.get("captions", {})), d.get("bank_split", "train"),
                   d.get("bank_features", ""), int(d.get("bank_rows", 0)))

    def describe(self) -> str:
        parts = [f"{name} k={s.k} beta={s.beta:g}" for name, s in (("images", self.images), ("captions", self.captions))
                 if s.active]
        return f"query-bank normalisation ({self.bank_split} bank): " + ", ".join(parts) if parts else "plain cosine"


def bank_sample(n: int, max_rows: int) -> np.ndarray | None:
    """The rows of an n-row bank side that form the bank: every row (None) up to `max_rows`, else
    `max_rows` rows evenly spaced over the split, the same on every machine and numpy version, so
    the run, its search page and its index all read the same rows. Hubness is a mean over the k nearest
    bank rows; 16k rows spread over the split estimate it for a gallery of any size, where a 10M-row
    bank would take 160 GB of embeddings."""
    if max_rows <= 0 or n <= max_rows:
        return None
    return (np.arange(max_rows, dtype=np.int64) * n) // max_rows


@torch.no_grad()
def hubness(gallery: torch.Tensor, bank: torch.Tensor, ks: tuple[int, ...] | int,
            memory_mb: float = 256) -> dict[int, torch.Tensor]:
    """Per gallery row, the mean cosine to its k nearest bank rows, for every k in `ks` (one pass).

    gallery [N, D], bank [B, D]; normalised here. k above the bank size is capped at it. Gallery rows
    go in chunks whose gallery x bank score block (and its top-k) stays within `memory_mb`."""
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    gallery, bank = unit(gallery.float()), unit(bank.float())
    chunk = max(1, min(8192, int(memory_mb * 2**20 // (8 * max(bank.shape[0], 1)))))
    top = min(max(ks), bank.shape[0])
    out = {k: torch.empty(gallery.shape[0]) for k in ks}
    for s in range(0, gallery.shape[0], chunk):
        best = (gallery[s : s + chunk] @ bank.T).topk(top, dim=1).values.cumsum(1)
        for k in ks:
            kk = min(k, top)
            out[k][s : s + chunk] = (best[:, kk - 1] / kk).cpu()
    return out


def side_offset(side: BankSide, gallery: torch.Tensor, bank: torch.Tensor) -> torch.Tensor | None:
    """What one side adds to each gallery row's cosines, -beta * hubness; None where the side is off."""
    return -side.beta * hubness(gallery, bank, side.k)[side.k] if side.active else None


def offsets(setting: QueryBank, images: torch.Tensor, captions: torch.Tensor, bank_images: torch.Tensor,
            bank_captions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(offset per gallery image, offset per gallery caption), each None where its side is off."""
    return side_offset(setting.images, images, bank_captions), side_offset(setting.captions, captions, bank_images)


def choose(images: torch.Tensor, captions: torch.Tensor, caption_image: torch.Tensor, bank_images: torch.Tensor,
           bank_captions: torch.Tensor, ks: tuple[int, ...] = KS, betas: tuple[float, ...] = BETAS,
           bank_split: str = "train", bank_features: str = "",
           bank_rows: int = 0) -> tuple[QueryBank, dict[str, float], dict[str, float]]:
    """The setting with the best mean R@1/5/10 of each direction on this (valid) split.

    Returns (setting, the split's recall summary with plain cosine, the same with the setting)."""
    img_h = hubness(images, bank_captions, ks)
    cap_h = hubness(captions, bank_images, ks)
    n, m = images.shape[0], captions.shape[0]

    def direction_score(summary: dict, d: str) -> float:
        return sum(summary[recall_key(d, k)] for k in DEFAULT_KS)

    plain = summarize_ranks(*retrieval_ranks(images, captions, caption_image), n, m)
    best_img, best_cap = (BankSide(), direction_score(plain, "t2i")), (BankSide(), direction_score(plain, "i2t"))
    for k in ks:
        for beta in (b for b in betas if b > 0):
            t2i, i2t = retrieval_ranks(images, captions, caption_image, image_offset=-beta * img_h[k],
                                       caption_offset=-beta * cap_h[k])
            s = summarize_ranks(t2i, i2t, n, m)
            if direction_score(s, "t2i") > best_img[1]:
                best_img = (BankSide(k, beta), direction_score(s, "t2i"))
            if direction_score(s, "i2t") > best_cap[1]:
                best_cap = (BankSide(k, beta), direction_score(s, "i2t"))
    setting = QueryBank(best_img[0], best_cap[0], bank_split, bank_features, bank_rows)
    img_off, cap_off = offsets(setting, images, captions, bank_images, bank_captions)
    after = summarize_ranks(*retrieval_ranks(images, captions, caption_image, image_offset=img_off,
                                             caption_offset=cap_off), n, m)
    return setting, plain, after
