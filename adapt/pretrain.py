"""Concept pre-training of the image head: before contrastive training, the image head learns to
classify each training image's concepts (multi-label, from the cache's concept labels), so the space
the contrastive loss starts from already separates modalities and anatomy.

Why: a caption names a handful of things an image shows, and with 3.7k pairs the contrastive loss
sees each concept a few dozen times at most; the concept labels (ImageCLEFmedical's UMLS CUIs) are
a denser, cleaner signal about the same images. Each ensemble member gets its own linear classifier
on its (unnormalised) output, trained with the head by binary cross-entropy for `epochs` passes
over train; the classifiers are then dropped and contrastive training continues from the heads.
Only concepts with at least `min_positives` training images are classified.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from medembed.adapt.heads import EnsembleHead
from medembed.cache.reader import CachedSplit
from medembed.common.errors import Incompatible

__all__ = ["ConceptPretraining", "pretrain_image_head"]


@dataclass
class ConceptPretraining:
    """What the pre-training did, for summary.json."""

    epochs: int
    concepts: int
    images: int
    first_loss: float
    last_loss: float
    seconds: float

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "concepts": self.concepts, "images": self.images,
                "first_loss": round(self.first_loss, 5), "last_loss": round(self.last_loss, 5),
                "seconds": round(self.seconds, 1)}


def _members(head: nn.Module) -> list[nn.Module]:
    return list(head.members) if isinstance(head, EnsembleHead) else [head]


def pretrain_image_head(image_head: nn.Module, train: CachedSplit, epochs: int, *, lr: float, weight_decay: float,
                        batch_size: int, min_positives: int, seed: int, device: torch.device,
                        use_views: bool = True) -> ConceptPretraining:
    """Train `image_head` (in place) as a multi-label concept classifier over `train`'s images.

    One AdamW over the head and a linear classifier per member, a cosine-decayed `lr`, `epochs`
    shuffled passes; with views in the cache each step takes one random view of each image (as the
    contrastive epochs do). The random stream is forked: the caller's draws are unchanged."""
    if train.concepts is None or train.concepts.shape[1] == 0:
        raise Incompatible(f"{train.path}: --concept-pretrain needs concept labels in the training split")
    labels = sp.csr_matrix(train.concepts)
    counts = np.asarray((labels > 0).sum(0)).ravel()
    cols = np.flatnonzero(counts >= min_positives)
    if len(cols) == 0:
        raise Incompatible(f"{train.path}: --concept-pretrain needs concepts with at least {min_positives} training images")
    targets = torch.from_numpy(labels[:, cols].toarray() > 0).float()
    members = _members(image_head)
    prior = (targets.mean(0).clamp(1e-4, 1 - 1e-4)).to(device)
    views = train.view_features if use_views and train.view_features is not None else None
    n = train.n_images
    steps = max(1, epochs * -(-n // batch_size))
    t0 = time.perf_counter()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 7919 + 17)
        with torch.no_grad():
            out_dim = members[0](train.image_features[:2].float().to(device)).shape[-1]
        classifiers = nn.ModuleList(nn.Linear(out_dim, len(cols)) for _ in members).to(device)
        with torch.no_grad():
            for c in classifiers:
                nn.init.zeros_(c.weight)
                c.bias.copy_(torch.log(prior / (1 - prior)))  # start at each concept's base rate
        params = [p for p in image_head.parameters() if p.requires_grad] + list(classifiers.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        was_training = image_head.training
        image_head.train()
        for _ in range(epochs):
            total, seen = 0.0, 0
            for rows in torch.randperm(n).split(batch_size):
                if views is not None:
                    pick = torch.randint(0, views.shape[1] + 1, (len(rows),))
                    x = train.image_features[rows].float()
                    use = pick > 0
                    if use.any():
                        x[use] = views[rows[use], pick[use] - 1].float()
                else:
                    x = train.image_features[rows].float()
                x, y = x.to(device), targets[rows].to(device)
                loss = sum(nn.functional.binary_cross_entropy_with_logits(c(m(x)), y)
                           for m, c in zip(members, classifiers)) / len(members)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(rows)
                seen += len(rows)
            losses.append(total / max(seen, 1))
        image_head.train(was_training)
    return ConceptPretraining(epochs, int(len(cols)), int(n), losses[0] if losses else float("nan"),
                              losses[-1] if losses else float("nan"), time.perf_counter() - t0)
