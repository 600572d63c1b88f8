"""Contrastive losses over a batch of (image, text) pairs.

Every loss takes image embeddings [B, D], text embeddings [B, D] (pair i = row i of both) and a
`positives` mask [B, B]: positives[i, j] is True when text j describes image i. The diagonal is
always True; off-diagonal Trues come from two captions of one image (or a concept shared by two
images) landing in one batch. Those pairs are never used as negatives: a caption is not a wrong
answer for its own image just because a sibling caption was drawn with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medembed.adapt.config import LOSS_KINDS
from medembed.common.tensors import unit


def _check(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    if img.shape != txt.shape:
        raise ValueError(f"image batch {tuple(img.shape)} and text batch {tuple(txt.shape)} must match pair for pair")
    b = img.shape[0]
    if positives is None:
        return torch.eye(b, dtype=torch.bool, device=img.device)
    if positives.shape != (b, b):
        raise ValueError(f"positives mask must be [{b}, {b}], got {tuple(positives.shape)}")
    return positives.to(img.device).bool() | torch.eye(b, dtype=torch.bool, device=img.device)


class InfoNCELoss(nn.Module):
    """Symmetric cross-entropy over the scaled cosine matrix (CLIP). The log scale is learned from
    1/0.07 and clamped at 100 so the logits cannot blow up on small, separable batches."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learn_temperature: bool = True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.max_log_scale).exp())

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(img, txt, positives)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * unit(img) @ unit(txt).T
        eye = torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
        # sibling positives leave the softmax entirely: neither target nor negative
        logits = logits.masked_fill(pos & ~eye, float("-inf"))
        target = torch.arange(pos.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class MarginLoss(nn.Module):
    """Pairwise cosine loss: mean(1 - cos) over positives + mean(relu(cos - margin)) over negatives.

    Each pair contributes on its own, with no softmax over the batch, so the gradient does not
    depend on how many negatives a batch holds: the loss meant for batches of 8-32.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(img, txt, positives)
        cos = unit(img) @ unit(txt).T
        pull = (1 - cos)[pos].mean()
        neg = ~pos
        if not neg.any():
            return pull
        push = (cos - self.margin).clamp_min(0)[neg].mean()
        return pull + push


class SigLIPLoss(nn.Module):
    """Sigmoid loss: every (image, text) cell is a binary decision with logit t * cos + b, label +1
    for positives (siblings included), -1 otherwise; summed over cells, averaged over images.
    t starts at 10 and b at -10 (the SigLIP initialisation) so the many negatives start near zero loss."""

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(img, txt, positives)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * unit(img) @ unit(txt).T + self.bias
        labels = pos.float() * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / pos.shape[0]


def build_loss(kind: str, *, temperature: float = 0.07, margin: float = 0.2, learn_temperature: bool = True) -> nn.Module:
    if kind == "infonce":
        return InfoNCELoss(init_temperature=temperature, learn_temperature=learn_temperature)
    if kind == "margin":
        return MarginLoss(margin=margin)
    if kind == "siglip":
        return SigLIPLoss()
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
