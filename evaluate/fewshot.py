"""Concept few-shot: how fast does an embedding learn a concept from k labelled train images?

For each concept, k positive and k negative train images (a balanced support set, drawn per seed;
the smaller support sets are prefixes of the larger ones, so curves over k are not reshuffled
noise) train a binary scorer, which then ranks every image of the evaluation split; the score is
average precision, averaged over concepts (mAP), then over seeds.

Scorers, from most to least trained:
- `logreg`: L2-regularised logistic regression (a linear probe);
- `lightgbm`: gradient-boosted trees, settings loosened so a handful of rows can still split;
- `prototype`: cosine to the positive mean minus cosine to the negative mean (training-free);
- `tip_adapter`: Tip-Adapter's training-free cache, for a binary task: the zero-shot prompt score
  plus alpha x (mean affinity exp(-beta (1 - cos)) to the positive shots minus that to the
  negative shots), each term standardised over the train images first (CLIP's fixed logit scale
  does not carry over to adapted embeddings); unnamed concepts have no prompt and use the cache
  alone.

Only the `max_concepts` most frequent train concepts with enough train and evaluation positives
are evaluated, which keeps a run to seconds; the count is part of the output.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import average_precision_score

from medembed.evaluate.zeroshot import expected_random_ap

FEWSHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16)
METHODS: tuple[str, ...] = ("logreg", "lightgbm", "prototype", "tip_adapter")
PRIMARY_METHOD = "logreg"


@dataclass
class FewShotConfig:
    ks: tuple[int, ...] = FEWSHOT_KS
    seeds: int = 3
    max_concepts: int = 25
    min_test_positives: int = 5
    methods: tuple[str, ...] = METHODS
    logreg_c: float = 1.0
    lgbm_trees: int = 50
    tip_alpha: float = 1.0
    tip_beta: float = 5.5


@dataclass
class FewShotResult:
    ks: tuple[int, ...]
    methods: tuple[str, ...]
    concept_rows: list[int]
    train_positives: list[int]
    test_positives: list[int]
    ap: np.ndarray  # [method, k, seed, concept]

    def curve(self, method: str) -> list[float]:
        """mAP (in %) for each k: mean over concepts, then over seeds."""
        m = self.methods.index(method)
        return [100 * float(self.ap[m, i].mean(-1).mean()) for i in range(len(self.ks))]

    def seed_std(self, method: str) -> list[float]:
        m = self.methods.index(method)
        return [100 * float(self.ap[m, i].mean(-1).std()) for i in range(len(self.ks))]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"fewshot_concepts": len(self.concept_rows), "fewshot_seeds": int(self.ap.shape[2])}
        if not self.concept_rows:
            return out
        if PRIMARY_METHOD in self.methods:
            for k, v in zip(self.ks, self.curve(PRIMARY_METHOD)):
                out[f"fewshot_map@{k}"] = v
        for method in self.methods:
            for k, v, sd in zip(self.ks, self.curve(method), self.seed_std(method)):
                out[f"fewshot_{method}_map@{k}"] = v
                out[f"fewshot_{method}_map@{k}_seed_std"] = sd
        return out


def choose_concepts(
    train_labels: sp.csr_matrix, test_labels: sp.csr_matrix, max_k: int, max_concepts: int, min_test_positives: int
) -> list[int]:
    """Most frequent train concepts with >= max_k train positives and negatives and enough test positives."""
    n_train, n_test = train_labels.shape[0], test_labels.shape[0]
    tr = np.asarray(train_labels.sum(0)).ravel()
    te = np.asarray(test_labels.sum(0)).ravel()
    ok = (tr >= max_k) & (n_train - tr >= max_k) & (te >= min_test_positives) & (te < n_test)
    cols = np.flatnonzero(ok)
    order = np.lexsort((cols, -tr[cols]))  # by train count, descending; ties by column
    return [int(c) for c in cols[order][:max_concepts]]


def _prototype_scores(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray) -> np.ndarray:
    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    return xq @ unit(xs[ys].mean(0)) - xq @ unit(xs[~ys].mean(0))


def _standardised(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (scores - reference.mean()) / max(float(reference.std()), 1e-12)


def _tip_scores(xs, ys, xq, xref, prompt: np.ndarray | None, alpha: float, beta: float) -> np.ndarray:
    """Zero-shot prompt score + alpha x cache score, each standardised over the train images
    (`xref`, labels unused) so alpha weighs two terms of the same scale whatever the embedding."""

    def cache(x):
        affinity = np.exp(-beta * (1.0 - x @ xs.T))  # [n, 2k]
        return affinity[:, ys].mean(1) - affinity[:, ~ys].mean(1)

    score = alpha * _standardised(cache(xq), cache(xref))
    if prompt is not None:
        score = score + _standardised(xq @ prompt, xref @ prompt)
    return score


def _logreg_scores(xs, ys, xq, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=1000)
    clf.fit(xs, ys)
    return clf.decision_function(xq)


def _lgbm_scores(xs, ys, xq, trees: int, seed: int) -> np.ndarray:
    import lightgbm as lgb

    clf = lgb.LGBMClassifier(
        n_estimators=trees,
        learning_rate=0.1,
        num_leaves=4,
        min_child_samples=1,
        min_child_weight=1e-3,
        min_data_in_bin=1,
        random_state=seed,
        n_jobs=1,
        verbose=-1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no further splits" on 2-row supports is expected
        clf.fit(xs, ys)
        return clf.predict_proba(xq)[:, 1]


def score(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    concept_emb: torch.Tensor | None = None,
    concept_names: list[str] | None = None,
    config: FewShotConfig | None = None,
) -> FewShotResult:
    """train_emb [Ntr, D], test_emb [Nte, D] unit vectors; labels multi-hot over the same columns.

    concept_emb [C, D] prompt embeddings feed `tip_adapter`'s zero-shot term (None: cache only).
    """
    cfg = config or FewShotConfig()
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown few-shot methods {sorted(unknown)}; choose from {METHODS}")
    train_labels, test_labels = sp.csc_matrix(train_labels), sp.csc_matrix(test_labels)
    if train_labels.shape[1] != test_labels.shape[1]:
        raise ValueError(f"train has {train_labels.shape[1]} concept columns, evaluation split {test_labels.shape[1]}")
    ks = tuple(sorted(set(cfg.ks)))
    cols = choose_concepts(train_labels, test_labels, max(ks), cfg.max_concepts, cfg.min_test_positives)
    xtr = train_emb.float().numpy()
    xte = test_emb.float().numpy()
    ap = np.zeros((len(cfg.methods), len(ks), cfg.seeds, len(cols)))
    for ci, c in enumerate(cols):
        truth = test_labels[:, c].toarray().ravel() > 0
        pos_all = np.flatnonzero(train_labels[:, c].toarray().ravel() > 0)
        neg_all = np.setdiff1d(np.arange(xtr.shape[0]), pos_all)
        named = concept_emb is not None and (concept_names is None or bool(concept_names[c]))
        prompt = concept_emb[c].float().numpy() if named else None
        for seed in range(cfg.seeds):
            rng = np.random.default_rng([seed, c])
            pos_order, neg_order = rng.permutation(pos_all), rng.permutation(neg_all)
            for ki, k in enumerate(ks):
                rows = np.concatenate([pos_order[:k], neg_order[:k]])
                xs, ys = xtr[rows], np.arange(2 * k) < k
                for mi, method in enumerate(cfg.methods):
                    if method == "logreg":
                        scores = _logreg_scores(xs, ys, xte, cfg.logreg_c)
                    elif method == "lightgbm":
                        scores = _lgbm_scores(xs, ys, xte, cfg.lgbm_trees, seed)
                    elif method == "prototype":
                        scores = _prototype_scores(xs, ys, xte)
                    else:
                        scores = _tip_scores(xs, ys, xte, xtr, prompt, cfg.tip_alpha, cfg.tip_beta)
                    ap[mi, ki, seed, ci] = average_precision_score(truth, scores)
    tr_counts = np.asarray(train_labels.sum(0)).ravel()
    te_counts = np.asarray(test_labels.sum(0)).ravel()
    return FewShotResult(
        ks=ks,
        methods=tuple(cfg.methods),
        concept_rows=cols,
        train_positives=[int(tr_counts[c]) for c in cols],
        test_positives=[int(te_counts[c]) for c in cols],
        ap=ap,
    )



def compute(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    concept_emb: torch.Tensor | None = None,
    concept_names: list[str] | None = None,
    config: FewShotConfig | None = None,
) -> dict[str, float]:
    """Flat numbers: mAP (%) per method and k (mean over concepts, then seeds), its spread over
    seeds, and how many concepts and seeds were used."""
    return score(train_emb, train_labels, test_emb, test_labels, concept_emb, concept_names, config).metrics()


def chance(train_labels: sp.csr_matrix, test_labels: sp.csr_matrix, config: FewShotConfig | None = None) -> dict[str, float]:
    """A random scorer's expected mAP on the same concepts: the same at every k and for every method."""
    cfg = config or FewShotConfig()
    test_labels = sp.csc_matrix(test_labels)
    cols = choose_concepts(sp.csc_matrix(train_labels), test_labels, max(cfg.ks), cfg.max_concepts, cfg.min_test_positives)
    out: dict[str, float] = {"fewshot_concepts": len(cols), "fewshot_seeds": cfg.seeds}
    if not cols:
        return out
    counts = np.asarray(test_labels.sum(0)).ravel()
    value = 100 * float(np.mean([expected_random_ap(int(counts[c]), test_labels.shape[0]) for c in cols]))
    ks = sorted(set(cfg.ks))
    if PRIMARY_METHOD in cfg.methods:
        out.update({f"fewshot_map@{k}": value for k in ks})
    for method in cfg.methods:
        out.update({f"fewshot_{method}_map@{k}": value for k in ks})
    return out
