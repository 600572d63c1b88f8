"""Concept detection as ImageCLEFmedical scores it: predict each image's concept set, F1 per image.

`compute(...) -> dict` and `chance(...) -> dict`, like every metric module.

The ImageCLEFmedical caption task's scorer computes, for each image, the F1 between its gold and
predicted concept sets (sklearn's binary F1 over the union of both sets), scores an image with
empty gold and empty prediction as 1, and averages over images. For sets that is
2|G∩P| / (|G| + |P|), which is what `f1_per_image` computes.

Two predictors, as the task's winning teams combine them, each giving a score per (image, concept):
- `logreg`: one-vs-rest logistic regression on the image embedding. The objective is a sum of
  independent per-concept losses, so all concepts are fitted at once as one [D, C] weight matrix by
  torch's L-BFGS, exactly as many separate fits would be;
- `knn`: concept propagation from the most similar training images: a concept's score is the
  similarity-weighted share of the k nearest training images that carry it.
For each, one score threshold shared by all concepts, whether to fall back to the single best
concept when none passes it, and (knn) the neighbourhood size and vote sharpness are chosen on the
valid split, which the embedding was not trained on; without one, on a held-out part of train (the
model fitted on the rest is the one scored). The search over thresholds is one batched computation.
`concept_f1` is the predictor that scored best there; both are reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

THRESHOLDS = torch.linspace(0.05, 0.95, 19)
PREDICTORS = ("logreg", "knn")


@dataclass
class DetectionConfig:
    min_train_positives: int = 3  # concepts rarer than this in train are never predicted
    holdout: float = 0.2  # share of train used to choose the threshold (and the predictor)
    l2: float = 0.1  # logreg: L2 penalty per weight, relative to the mean loss
    max_iter: int = 20  # logreg: L-BFGS iterations
    knn_grid: tuple[tuple[int, float], ...] = ((20, 5.0), (40, 5.0), (80, 5.0), (40, 10.0))  # (k, sharpness) tried
    predictors: tuple[str, ...] = PREDICTORS
    seed: int = 0


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


# ------------------------------------------------------------------------------------- predictors
@dataclass
class Logistic:
    """Independent logistic regressions for C concepts, as one [D, C] weight matrix."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, cfg: DetectionConfig) -> Logistic:
        x = x.float()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1])
        xs, y = (x - mean) / std, y.float()
        prior = y.mean(0).clamp(0.5 / len(y), 1 - 0.5 / len(y))
        weight = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
        bias = torch.log(prior / (1 - prior)).clone().requires_grad_(True)  # rare concepts start at "mostly no"
        opt = torch.optim.LBFGS([weight, bias], max_iter=cfg.max_iter, history_size=10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ weight + bias, y, reduction="sum") / len(y)
            loss = loss + cfg.l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(mean, std, weight.detach(), bias.detach())

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((x.float() - self.mean) / self.std) @ self.weight + self.bias)


@torch.no_grad()
def knn_scores(train_emb: torch.Tensor, train_y: torch.Tensor, query: torch.Tensor, k: int, sharpness: float,
               chunk: int = 1024) -> torch.Tensor:
    """Per query, the similarity-weighted share of its k nearest training images carrying each concept:
    softmax(sharpness x cosine) over the k neighbours, times their labels. Queries go `chunk` at a
    time, the vote as one sparse-weights x labels product, so memory stays at chunk x train."""
    y = train_y.float()
    k = min(k, train_emb.shape[0])
    out = []
    for s in range(0, query.shape[0], chunk):
        sims = query[s : s + chunk].float() @ train_emb.float().T
        top, rows = sims.topk(k, dim=1)
        weights = torch.zeros_like(sims).scatter_(1, rows, torch.softmax(sharpness * top, dim=1))
        out.append(weights @ y)
    return torch.cat(out) if out else torch.zeros(0, y.shape[1])


# --------------------------------------------------------------------------------------- decisions
def _f1_batched(scores: torch.Tensor, gold: torch.Tensor, thresholds: torch.Tensor, fallback: bool,
                chunk: int = 512) -> torch.Tensor:
    """Mean per-image F1 for every threshold at once, [T], over row chunks (memory T x chunk x C)."""
    total = torch.zeros(len(thresholds), dtype=torch.float64)
    for s in range(0, scores.shape[0], chunk):
        sc, g = scores[s : s + chunk], gold[s : s + chunk]
        pred = sc[None] >= thresholds[:, None, None]  # [T, n, C]
        if fallback:
            none = ~pred.any(2)
            top = torch.nn.functional.one_hot(sc.argmax(1), sc.shape[1]).bool()
            pred = pred | (none[..., None] & top[None])
        tp = (pred & g[None]).sum(2).double()
        size = pred.sum(2).double() + g.sum(1).double()[None]
        total += torch.where(size == 0, torch.ones_like(tp), 2 * tp / size.clamp_min(1)).sum(1)
    return total / max(scores.shape[0], 1)


def choose_threshold(scores: torch.Tensor, gold: torch.Tensor) -> tuple[float, bool, float]:
    """(threshold, fallback, mean F1) best on the held-out images."""
    best = (0.5, False, -1.0)
    for fallback in (False, True):
        f1 = _f1_batched(scores, gold, THRESHOLDS, fallback)
        i = int(f1.argmax())
        if float(f1[i]) > best[2] + 1e-12:
            best = (float(THRESHOLDS[i]), fallback, float(f1[i]))
    return best


def decide(scores: torch.Tensor, threshold: float, fallback: bool) -> torch.Tensor:
    pred = scores >= threshold
    if fallback:
        none = ~pred.any(1)
        pred[none, scores[none].argmax(1)] = True
    return pred


def _dense(labels: sp.csr_matrix, cols: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels[:, cols].toarray() > 0)


@dataclass
class DetectionResult:
    f1: float
    predictor: str
    threshold: float
    fallback: bool
    concepts_modelled: int
    mean_predicted: float
    by_predictor: dict[str, float]

    def metrics(self) -> dict[str, float]:
        return {
            "concept_f1": 100 * self.f1,
            "concept_f1_knn_chosen": float(self.predictor == "knn"),
            **{f"concept_f1_{p}": 100 * v for p, v in self.by_predictor.items()},
            "concept_f1_threshold": self.threshold,
            "concept_f1_fallback": float(self.fallback),
            "concept_f1_concepts": self.concepts_modelled,
            "concept_f1_mean_predicted": self.mean_predicted,
        }


@dataclass
class _Tuned:
    threshold: float
    fallback: bool
    f1: float  # on the images it was tuned on
    scorer: object  # query embeddings -> scores [Q, C]


def _tune(name: str, xfit, yfit, xtune, ytune, cfg: DetectionConfig) -> _Tuned:
    """Fit a predictor on (xfit, yfit) and choose its settings on (xtune, ytune)."""
    if name == "logreg":
        model = Logistic.fit(xfit, yfit, cfg)
        return _Tuned(*choose_threshold(model.scores(xtune), ytune), model.scores)
    best = None
    for k, sharpness in cfg.knn_grid:
        tuned = _Tuned(*choose_threshold(knn_scores(xfit, yfit, xtune, k, sharpness), ytune),
                       lambda q, k=k, sh=sharpness: knn_scores(xfit, yfit, q, k, sh))
        if best is None or tuned.f1 > best.f1 + 1e-12:
            best = tuned
    return best


def score(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    config: DetectionConfig | None = None,
    valid: tuple[torch.Tensor, sp.csr_matrix] | None = None,
) -> DetectionResult:
    """Embeddings [N, D] (unit rows); labels [N, C] multi-hot over the same concept columns in every
    split. `valid` (embeddings, labels) is where settings are chosen; without it, 20% of train."""
    cfg = config or DetectionConfig()
    unknown = set(cfg.predictors) - set(PREDICTORS)
    if unknown or not cfg.predictors:
        raise ValueError(f"detection predictors must be among {PREDICTORS}, got {cfg.predictors}")
    train_labels, test_labels = sp.csr_matrix(train_labels), sp.csr_matrix(test_labels)
    if train_labels.shape[1] != test_labels.shape[1]:
        raise ValueError(f"train has {train_labels.shape[1]} concept columns, evaluation split {test_labels.shape[1]}")
    cols = np.flatnonzero(np.asarray(train_labels.sum(0)).ravel() >= cfg.min_train_positives)
    if len(cols) == 0:  # nothing learnable: predict empty sets
        f1 = float(f1_per_image(test_labels, sp.csr_matrix(test_labels.shape)).mean())
        return DetectionResult(f1, "none", 1.0, False, 0, 0.0, {})
    xfit, yfit, xtune, ytune = _fit_and_tune_rows(train_emb.float(), _dense(train_labels, cols), valid, cols, cfg)
    tuned = {name: _tune(name, xfit, yfit, xtune, ytune, cfg) for name in cfg.predictors}
    results = {name: _test_f1(t, test_emb.float(), test_labels, cols) for name, t in tuned.items()}
    chosen = max(tuned, key=lambda p: tuned[p].f1)
    f1, mean_pred = results[chosen]
    return DetectionResult(f1, chosen, tuned[chosen].threshold, tuned[chosen].fallback, int(len(cols)), mean_pred,
                           {p: v[0] for p, v in results.items()})


def _fit_and_tune_rows(x: torch.Tensor, y: torch.Tensor, valid, cols: np.ndarray, cfg: DetectionConfig):
    if valid is not None:
        return x, y, valid[0].float(), _dense(sp.csr_matrix(valid[1]), cols)
    perm = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(x.shape[0]))
    n_hold = int(round(cfg.holdout * x.shape[0]))
    if not 0 < n_hold < x.shape[0]:
        raise ValueError(f"holdout {cfg.holdout} of {x.shape[0]} train images leaves nothing to fit or to tune on")
    hold, fit_rows = perm[:n_hold], perm[n_hold:]
    return x[fit_rows], y[fit_rows], x[hold], y[hold]


def _test_f1(tuned: _Tuned, test_emb: torch.Tensor, test_labels: sp.csr_matrix, cols: np.ndarray,
             chunk: int = 4096) -> tuple[float, float]:
    """(mean ImageCLEF F1, mean predicted set size) on the evaluation split, `chunk` images at a time;
    predictions over the modelled columns are scored against gold over all columns."""
    f1, sizes = [], []
    for s in range(0, test_emb.shape[0], chunk):
        pred = decide(tuned.scorer(test_emb[s : s + chunk]), tuned.threshold, tuned.fallback)
        coo = sp.coo_matrix(pred.numpy())
        gold = test_labels[s : s + chunk]
        full = sp.csr_matrix((coo.data.astype(np.float32), (coo.row, cols[coo.col])), shape=gold.shape)
        f1.append(f1_per_image(gold, full))
        sizes.append(pred.sum(1).numpy())
    if not f1:
        return float("nan"), 0.0
    return float(np.concatenate(f1).mean()), float(np.concatenate(sizes).mean())


def compute(*args, **kwargs) -> dict[str, float]:
    """Flat numbers: ImageCLEF F1 (%) of the chosen predictor, of each predictor, and how the sets were chosen. Takes `score`'s arguments."""
    return score(*args, **kwargs).metrics()


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
