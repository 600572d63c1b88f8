"""Concept detection as ImageCLEFmedical scores it: predict each image's concept set, F1 per image.

The ImageCLEFmedical caption task's scorer computes, for each image, the F1 between its gold and
predicted concept sets (sklearn's binary F1 over the union of both sets), scores an image with
empty gold and empty prediction as 1, and averages over images. For sets that is
2|G∩P| / (|G| + |P|), which is what `f1_per_image` computes on sparse rows.

The predictor is one-vs-rest logistic regression on the image embedding, fitted jointly (one
weight column per concept, independent sigmoid losses, so each column is exactly its own binary
problem) with mini-batches so 100k-image train splits stay bounded. One probability threshold
shared by all concepts, and whether to fall back to the single most likely concept when none
passes it, are chosen on a held-out part of train (the model fitted on the rest is the one
scored: refitting on all of train doubles the cost for a fraction of a point).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))


@dataclass
class DetectionConfig:
    min_train_positives: int = 3  # concepts rarer than this in train are never predicted
    holdout: float = 0.2  # share of train used to choose the threshold
    steps: int = 100  # Adam steps of `batch_size` rows
    batch_size: int = 4096
    lr: float = 0.02
    weight_decay: float = 1e-4
    seed: int = 0
    predict_chunk: int = 8192


def f1_per_image(gold: sp.csr_matrix, pred: sp.csr_matrix) -> np.ndarray:
    """ImageCLEF per-image F1 between multi-hot rows (same columns); empty vs empty scores 1."""
    gold = (sp.csr_matrix(gold) > 0).astype(np.float32)
    pred = (sp.csr_matrix(pred) > 0).astype(np.float32)
    if gold.shape != pred.shape:
        raise ValueError(f"gold is {gold.shape}, prediction {pred.shape}")
    tp = np.asarray(gold.multiply(pred).sum(1)).ravel()
    size = np.asarray(gold.sum(1)).ravel() + np.asarray(pred.sum(1)).ravel()
    return np.where(size == 0, 1.0, 2 * tp / np.maximum(size, 1))


def imageclef_f1(gold: list[set[str]], pred: list[set[str]]) -> float:
    """The same score on concept-id sets (as read from ImageCLEF run files), averaged over images."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold rows but {len(pred)} predicted rows")
    if not gold:
        return float("nan")
    scores = [1.0 if not g and not p else 2 * len(g & p) / (len(g) + len(p)) for g, p in zip(gold, pred)]
    return float(np.mean(scores))


class _Adam:
    """Plain Adam on a list of tensors. torch.optim would do, but constructing one imports
    torch._dynamo, seconds of start-up for a fit that itself takes well under a second."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))


class _OneVsRest:
    """Independent logistic regressions for C concepts, fitted as one [D, C] weight matrix."""

    def __init__(self, cfg: DetectionConfig):
        self.cfg = cfg
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, y: sp.csr_matrix) -> _OneVsRest:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        n, d = x.shape
        c = y.shape[1]
        # standardised inputs make one learning rate fit every embedding's scale
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6) if n > 1 else torch.ones(d)
        prior = np.asarray(y.sum(0)).ravel().clip(0.5, n - 0.5) / n
        weight = torch.zeros(d, c, requires_grad=True)
        # start at each concept's log prior odds: rare concepts need no steps to learn "mostly no"
        bias = torch.tensor(np.log(prior / (1 - prior)), dtype=torch.float32, requires_grad=True)
        params = [weight, bias]
        adam = _Adam(params, cfg.lr)
        y = sp.csr_matrix(y)
        dense = torch.from_numpy(y.toarray() > 0) if n * c <= 50_000_000 else None  # else sliced per step
        xs = self._standard(x)
        order = torch.randperm(n, generator=gen)
        at = 0
        for _ in range(cfg.steps):
            if at >= n:
                order, at = torch.randperm(n, generator=gen), 0
            idx = order[at : at + cfg.batch_size]
            at += len(idx)
            target = (dense[idx] if dense is not None else torch.from_numpy(y[idx.numpy()].toarray() > 0)).float()
            logits = xs[idx] @ weight + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(idx)
            loss = loss + cfg.weight_decay * weight.pow(2).sum()
            grads = torch.autograd.grad(loss, params)
            adam.step(params, grads)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def _standard(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._standard(x) @ self.weight + self.bias)


def _predict(model: _OneVsRest, x: torch.Tensor, threshold: float, fallback: bool, chunk: int) -> sp.csr_matrix:
    """Thresholded predictions as a sparse [N, C'] matrix, built chunk by chunk."""
    parts = []
    for s in range(0, x.shape[0], chunk):
        p = model.proba(x[s : s + chunk])
        keep = p >= threshold
        if fallback:
            none = ~keep.any(1)
            keep[none, p[none].argmax(1)] = True
        parts.append(sp.csr_matrix(keep.numpy()))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, model.weight.shape[1]))


def _expand(pred: sp.csr_matrix, cols: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Predictions over the modelled columns back into the full concept vocabulary."""
    pred = pred.tocoo()
    return sp.csr_matrix((pred.data, (pred.row, cols[pred.col])), shape=(pred.shape[0], n_cols))


@dataclass
class DetectionResult:
    f1: float
    threshold: float
    fallback: bool
    concepts_modelled: int
    mean_predicted: float

    def metrics(self) -> dict[str, float]:
        return {
            "concept_f1": 100 * self.f1,
            "concept_f1_threshold": self.threshold,
            "concept_f1_fallback": float(self.fallback),
            "concept_f1_concepts": self.concepts_modelled,
            "concept_f1_mean_predicted": self.mean_predicted,
        }


def score(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    config: DetectionConfig | None = None,
) -> DetectionResult:
    """Embeddings [N, D]; labels [N, C] multi-hot over the same concept columns in both splits."""
    cfg = config or DetectionConfig()
    train_labels, test_labels = sp.csr_matrix(train_labels), sp.csr_matrix(test_labels)
    if train_labels.shape[1] != test_labels.shape[1]:
        raise ValueError(f"train has {train_labels.shape[1]} concept columns, evaluation split {test_labels.shape[1]}")
    n_cols = test_labels.shape[1]
    cols = np.flatnonzero(np.asarray(train_labels.sum(0)).ravel() >= cfg.min_train_positives)
    xtr, xte = train_emb.float(), test_emb.float()
    if len(cols) == 0:  # nothing learnable: predict empty sets
        empty = sp.csr_matrix(test_labels.shape)
        return DetectionResult(float(f1_per_image(test_labels, empty).mean()), 1.0, False, 0, 0.0)
    ytr = train_labels[:, cols]

    perm = np.random.default_rng(cfg.seed).permutation(xtr.shape[0])
    n_hold = int(round(cfg.holdout * xtr.shape[0]))
    if not 0 < n_hold < xtr.shape[0]:
        raise ValueError(f"holdout {cfg.holdout} of {xtr.shape[0]} train images leaves nothing to fit or to tune on")
    hold, fit = perm[:n_hold], perm[n_hold:]
    model = _OneVsRest(cfg).fit(xtr[torch.as_tensor(fit)], ytr[fit])
    gold = train_labels[hold]
    best = (0.5, False, -1.0)
    for fallback in (False, True):
        for t in THRESHOLDS:
            pred = _expand(_predict(model, xtr[torch.as_tensor(hold)], t, fallback, cfg.predict_chunk), cols, n_cols)
            score = float(f1_per_image(gold, pred).mean())
            if score > best[2] + 1e-12:
                best = (t, fallback, score)
    threshold, fallback, _ = best
    pred = _expand(_predict(model, xte, threshold, fallback, cfg.predict_chunk), cols, n_cols)
    f1 = f1_per_image(test_labels, pred)
    return DetectionResult(float(f1.mean()), threshold, fallback, int(len(cols)), float(pred.sum(1).mean()))



def compute(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    config: DetectionConfig | None = None,
) -> dict[str, float]:
    """Flat numbers: ImageCLEF F1 (%) of the predicted concept sets and how they were chosen."""
    return score(train_emb, train_labels, test_emb, test_labels, config).metrics()


def chance(train_labels: sp.csr_matrix, test_labels: sp.csr_matrix, draws: int = 5, seed: int = 0) -> dict[str, float]:
    """F1 of guessing each concept independently at its train frequency (mean of `draws` draws)."""
    train_labels, test_labels = sp.csr_matrix(train_labels), sp.csr_matrix(test_labels)
    prior = np.asarray(train_labels.sum(0)).ravel() / max(train_labels.shape[0], 1)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(draws):
        rows = []
        for s in range(0, test_labels.shape[0], 4096):
            n = min(4096, test_labels.shape[0] - s)
            rows.append(sp.csr_matrix(rng.random((n, len(prior))) < prior))
        pred = sp.vstack(rows, format="csr") if rows else sp.csr_matrix(test_labels.shape)
        scores.append(float(f1_per_image(test_labels, pred).mean()))
    return {"concept_f1": 100 * float(np.mean(scores))}
