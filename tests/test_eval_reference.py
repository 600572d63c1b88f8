"""The batched few-shot and detection give the numbers a straightforward, one-problem-at-a-time
implementation gives (scikit-learn and plain loops) on a small deterministic case."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from medembed.evaluate import detection, fewshot


def _case(seed: int = 0, n_train: int = 160, n_test: int = 60, d: int = 6, c: int = 4):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d))
    def split(n):
        y = rng.random((n, c)) < 0.35
        x = y.astype(float) @ centres + 0.8 * rng.standard_normal((n, d))
        x = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
        return x, sp.csr_matrix(y.astype(np.float32))
    return split(n_train), split(n_test), torch.nn.functional.normalize(torch.from_numpy(centres).float(), dim=1)


def test_fewshot_matches_one_problem_at_a_time():
    (xtr, ytr), (xte, yte), prompts = _case()
    cfg = fewshot.FewShotConfig(ks=(2, 8), seeds=2, max_concepts=4, min_test_positives=3,
                                methods=("logreg", "prototype", "tip_adapter"), logreg_iter=200)
    res = fewshot.score(xtr, ytr, xte, yte, prompts, ["a", "b", "c", "d"], cfg)
    ytr_d, yte_d = ytr.toarray() > 0, yte.toarray() > 0
    xs_all, xq = xtr.numpy().astype(np.float64), xte.numpy().astype(np.float64)
    for ci, c in enumerate(res.concept_rows):
        pos_all, neg_all = np.flatnonzero(ytr_d[:, c]), np.flatnonzero(~ytr_d[:, c])
        for seed in range(2):
            rng = np.random.default_rng([seed, c])
            pos, neg = rng.permutation(pos_all), rng.permutation(neg_all)
            for ki, k in enumerate((2, 8)):
                rows = np.concatenate([pos[:k], neg[:k]])
                xs, ys = xs_all[rows], np.arange(2 * k) < k
                ref = {}
                clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(xs, ys)
                ref["logreg"] = clf.decision_function(xq)
                unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
                ref["prototype"] = xq @ unit(xs[ys].mean(0)) - xq @ unit(xs[~ys].mean(0))
                def cache(x, xs=xs, ys=ys):
                    aff = np.exp(-5.5 * (1 - x @ xs.T))
                    return aff[:, ys].mean(1) - aff[:, ~ys].mean(1)
                std = lambda v, r: (v - r.mean()) / r.std()  # noqa: E731
                p = prompts[c].numpy().astype(np.float64)
                ref["tip_adapter"] = std(cache(xq), cache(xs_all)) + std(xq @ p, xs_all @ p)
                for mi, method in enumerate(("logreg", "prototype", "tip_adapter")):
                    want = average_precision_score(yte_d[:, c], ref[method])
                    assert res.ap[mi, ki, seed, ci] == pytest.approx(want, abs=1e-4), (method, c, seed, k)


def test_detection_matches_brute_force_thresholds_and_neighbours():
    (xtr, ytr), (xte, yte), _ = _case(seed=1)
    (xva, yva), _, _ = _case(seed=2)
    cfg = detection.DetectionConfig(min_train_positives=1, predictors=("knn",), knn_grid=((5, 10.0),))
    res = detection.score(xtr, ytr, xte, yte, cfg, valid=(xva, yva))
    # the same predictor by hand: neighbours, softmax-weighted votes, every threshold tried on valid
    def votes(q):
        sims = q.numpy() @ xtr.numpy().T
        out = np.zeros((len(q), ytr.shape[1]))
        for i, row in enumerate(sims):
            top = np.argsort(-row, kind="stable")[:5]
            w = np.exp(10 * row[top]) / np.exp(10 * row[top]).sum()
            out[i] = w @ ytr.toarray()[top]
        return out
    def f1(scores, gold, t, fallback):
        pred = scores >= t
        if fallback:
            for i in np.flatnonzero(~pred.any(1)):
                pred[i, scores[i].argmax()] = True
        return detection.f1_per_image(sp.csr_matrix(gold), sp.csr_matrix(pred)).mean()
    sv, st = votes(xva), votes(xte)
    best = max(((f1(sv, yva.toarray() > 0, float(t), fb), float(t), fb) for fb in (False, True)
                for t in detection.THRESHOLDS), key=lambda x: x[0])
    assert res.threshold == pytest.approx(best[1]) and res.fallback == best[2]
    assert res.f1 == pytest.approx(f1(st, yte.toarray() > 0, best[1], best[2]), abs=1e-6)


def test_batched_ap_and_auroc_equal_scikit_learn_column_by_column():
    """The torch AP / ROC AUC (blocks of columns, ties as one threshold) against scikit-learn's own."""
    from sklearn.metrics import roc_auc_score

    from medembed.common.ranking import average_precision, roc_auc

    rng = np.random.default_rng(3)
    labels = rng.random((300, 21)) < 0.15
    scores = np.round(rng.normal(size=(300, 21)) + labels * 0.8, 1)  # rounding makes ties
    labels[:, 5] = False  # a column without positives is NaN in both
    ap = average_precision(torch.from_numpy(scores), torch.from_numpy(labels), block=4).numpy()
    auc = roc_auc(torch.from_numpy(scores), torch.from_numpy(labels), block=4).numpy()
    for c in range(21):
        if c == 5:
            assert np.isnan(ap[c]) and np.isnan(auc[c])
            continue
        assert ap[c] == pytest.approx(average_precision_score(labels[:, c], scores[:, c]), abs=1e-9)
        assert auc[c] == pytest.approx(roc_auc_score(labels[:, c], scores[:, c]), abs=1e-9)


def test_the_lightgbm_method_without_lightgbm_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(ValueError, match=r"pip install 'medembed\[lightgbm\]'"):
        fewshot.lgbm_scores(torch.zeros(1, 4, 3), torch.zeros(1, 4), torch.zeros(2, 3), trees=2, seeds=torch.zeros(1))
