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
    1/0.07 and clamped at 100 so the logits cannot blow up on small, separable batches.

    `soft` [B, B] (rows summing to 1, optional) replaces the one-hot target: graded targets that give
    a pair whose images share concepts part of the target mass instead of treating it as a plain
    negative (`graded_targets`)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learn_temperature: bool = True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.max_log_scale).exp())

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None = None,
                soft: torch.Tensor | None = None) -> torch.Tensor:
        pos = _check(img, txt, positives)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * unit(img) @ unit(txt).T
        eye = torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
        # sibling positives leave the softmax entirely: neither target nor negative
        logits = logits.masked_fill(pos & ~eye, float("-inf"))
        if soft is None:
            target = torch.arange(pos.shape[0], device=logits.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        soft = soft.masked_fill(pos & ~eye, 0.0)
        return 0.5 * (_soft_ce(logits, soft / soft.sum(1, keepdim=True)) +
                      _soft_ce(logits.T, soft.T / soft.T.sum(1, keepdim=True)))


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution; cells at -inf (left out) carry no target mass."""
    logp = torch.log_softmax(logits, dim=1)
    return -(target * logp.masked_fill(torch.isinf(logits), 0.0)).sum(1).mean()


def graded_targets(labels: torch.Tensor, strength: float) -> torch.Tensor:
    """[B, B] target rows: (1 - strength) on the pair itself, `strength` shared among the batch's
    other pairs in proportion to how many concepts their image shares with this one (Jaccard of
    the multi-hot `labels` [B, C]); a row with no overlap keeps its whole mass on the pair."""
    lab = labels.float()
    inter = lab @ lab.T
    union = lab.sum(1, keepdim=True) + lab.sum(1)[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    jac.fill_diagonal_(0)
    eye = torch.eye(lab.shape[0], device=lab.device)
    share = jac.sum(1, keepdim=True)
    spread = torch.where(share > 0, strength * jac / share.clamp_min(1e-12), torch.zeros_like(jac))
    return eye * torch.where(share > 0, 1 - strength, torch.ones_like(share)) + spread


class ConceptLoss(nn.Module):
    """Concept supervision: every embedding should predict its image's named concepts.

    A concept's logit is s x cos(embedding, the concept's prompt-ensemble embedding) + b_c, with the
    prompts run through the same text head, so the head learns to put images (and captions) near the
    words of the concepts they carry: what concept zero-shot reads. Multi-label binary cross-entropy,
    on the image embeddings and on the caption embeddings alike. s starts at 10 and is learned, b_c
    starts at each concept's log prior odds."""

    def __init__(self, prompt_features: torch.Tensor, prior: torch.Tensor, init_scale: float = 10.0):
        super().__init__()
        self.register_buffer("prompt_features", prompt_features.float())  # [C, T, Dt] raw prompt features
        p = prior.float().clamp(1e-4, 1 - 1e-4)
        self.bias = nn.Parameter(torch.log(p / (1 - p)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, embeddings: list[torch.Tensor], targets: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        losses = [F.binary_cross_entropy_with_logits(scale * unit(e) @ prompts.T + self.bias, targets.float())
                  for e in embeddings]
        return sum(losses) / len(losses)


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


class SimilarityDistillation(nn.Module):
    """A student taught a teacher's similarities: for every caption of the batch, the KL divergence
    from the teacher's softmax over the batch's images to the student's, and the same from every
    image over the captions, both at `temperature`. The teacher's whole ranking is the target, not
    only its top answer, so the student learns which wrong images the teacher finds nearly right."""

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, img: torch.Tensor, txt: torch.Tensor, teacher_img: torch.Tensor,
                teacher_txt: torch.Tensor) -> torch.Tensor:
        student = unit(txt) @ unit(img).T / self.temperature
        teacher = unit(teacher_txt) @ unit(teacher_img).T / self.temperature

        def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")

        return (kl(teacher, student) + kl(teacher.T, student.T)) / 2


def build_loss(kind: str, *, temperature: float = 0.07, margin: float = 0.2, learn_temperature: bool = True) -> nn.Module:
    if kind == "infonce":
        return InfoNCELoss(init_temperature=temperature, learn_temperature=learn_temperature)
    if kind == "margin":
        return MarginLoss(margin=margin)
    if kind == "siglip":
        return SigLIPLoss()
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
