"""Concept supervision while training the heads: what the cache knows beyond (image, caption) pairs.

Two levers, both reading the training split's concept labels:
- an auxiliary multi-label loss (`ConceptLoss`): every image embedding and every caption embedding
  predicts its image's named concepts through the concept prompts' embeddings, so the joint space
  puts an image near the words of what it shows (`concept_loss` weights it against the contrastive loss);
- graded contrastive targets (`graded_targets`): two images that share concepts are not pushed apart
  as hard negatives; part of the target goes to them by concept overlap (`graded` is that share).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from medembed.adapt.heads import EnsembleHead
from medembed.adapt.losses import ConceptLoss, graded_targets
from medembed.common.errors import Incompatible


def _members(head: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return head.member_outputs(x) if isinstance(head, EnsembleHead) else [head(x)]


class ConceptSupervision(nn.Module):
    """The concept levers of one run: the auxiliary loss (learned scale and per-concept biases) and
    the label lookups they need; the labels are data, not weights, and are not saved."""

    def __init__(self, labels: sp.csr_matrix, names: list[str], prompt_features: torch.Tensor | None,
                 weight: float, graded: float, min_positives: int = 5):
        super().__init__()
        self.weight, self.graded = weight, graded
        labels = sp.csr_matrix(labels)
        counts = np.asarray(labels.sum(0)).ravel()
        cols = [c for c, n in enumerate(names) if n and counts[c] >= min_positives]
        self.concepts = len(cols)
        self.loss = None
        if weight > 0:
            if prompt_features is None or not cols:
                raise Incompatible(f"--concept-loss needs named concepts with at least {min_positives} training images "
                                   "and their prompt features in the cache; this cache has none")
            prior = torch.from_numpy(counts[cols] / labels.shape[0])
            self.loss = ConceptLoss(prompt_features[cols], prior)
            self.register_buffer("targets", torch.from_numpy(labels[:, cols].toarray() > 0), persistent=False)
        if graded > 0:
            self.register_buffer("all_labels", torch.from_numpy(labels.toarray() > 0), persistent=False)

    def soft_targets(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        if self.graded <= 0 or rows is None:
            return None
        return graded_targets(self.all_labels[rows.to(self.all_labels.device)], self.graded)

    def aux_loss(self, imgs: list[torch.Tensor], txts: list[torch.Tensor], rows: torch.Tensor | None,
                 text_head: nn.Module) -> torch.Tensor | float:
        if self.loss is None or rows is None:
            return 0.0
        c, t, d = self.loss.prompt_features.shape
        prompts = [emb.reshape(c, t, -1) for emb in _members(text_head, self.loss.prompt_features.reshape(c * t, d))]
        prompts = [torch.nn.functional.normalize(torch.nn.functional.normalize(p, dim=-1).mean(1), dim=-1)
                   for p in prompts]
        targets = self.targets[rows.to(self.targets.device)]
        per_member = [self.loss([i, x], targets, p) for i, x, p in zip(imgs, txts, prompts)]
        return self.weight * sum(per_member) / len(per_member)
