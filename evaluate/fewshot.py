"""Concept few-shot: how fast does an embedding learn a concept from k labelled train images?

`compute(...) -> dict` and `chance(...) -> dict` of flat named numbers, and `METRIC`, the section
`eval` scores with them (registered in `evaluate.metrics`); `score(...)` keeps the AP of every
(method, k, seed, concept).

For each concept, k positive and k negative train images (a balanced support set, drawn per seed;
the smaller support sets are prefixes of the larger ones, so curves over k are not reshuffled
noise) train a binary scorer, which then ranks every image of the evaluation split; the score is
average precision, averaged over concepts (mAP), then over seeds.

Scorers, from most to least trained:
- `logreg`: L2-regularised logistic regression (a linear probe), scikit-learn's objective (summed
  log-loss + ||w||² / 2C, bias free);
- `lightgbm`: gradient-boosted trees, settings loosened so a handful of rows can still split (one
  model per support set: off the default path, it costs more than all the others together);
- `prototype`: cosine to the positive mean minus cosine to the negative mean (training-free);
- `tip_adapter`: Tip-Adapter's training-free cache, for a binary task: the zero-shot prompt score
  plus alpha x (mean affinity exp(-beta (1 - cos)) to the positive shots minus that to the
  negative shots), each term standardised over the train images first (CLIP's fixed logit scale
  does not carry over to adapted embeddings); unnamed concepts have no prompt and use the cache
  alone.

Every (concept, seed, k) support set of one method is solved at once as batched tensor work: the
logistic regressions as one L-BFGS problem over a [P, D] weight matrix (the objective is a sum of
the independent fits, so its optimum is theirs), the training-free scorers as a few matrix products,
and all APs in one pass (`common.ranking.average_precision`).

Only the `max_concepts` most frequent train concepts with enough train and evaluation positives
are evaluated, which keeps a run to seconds; the count is part of the output.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from medembed.common.errors import BadOption
from medembed.common.ranking import average_precision
from medembed.evaluate.metric import ColumnInputs, Metric, Needs, Scores, SectionView
from medembed.evaluate.tables import format_value, markdown_table
from medembed.evaluate.zeroshot import expected_random_ap

FEWSHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16)
METHODS: tuple[str, ...] = ("logreg", "lightgbm", "prototype", "tip_adapter")
DEFAULT_METHODS: tuple[str, ...] = ("logreg", "prototype", "tip_adapter")
PRIMARY_METHOD = "logreg"


@dataclass
class FewShotConfig:
    ks: tuple[int, ...] = FEWSHOT_KS
    seeds: int = 3
    max_concepts: int = 25
    min_test_positives: int = 5
    methods: tuple[str, ...] = DEFAULT_METHODS
    logreg_c: float = 1.0
    logreg_iter: int = 100
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
        """Spread over seeds of the mAP (in %) for each k."""
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


@dataclass
class Supports:
    """Every support set of one evaluation: rows [P, 2K] (K positives then K negatives), the
    concept of each problem, and where (k, seed, concept) sits among the P problems."""

    rows: torch.Tensor  # [S, C, 2 * max_k]: per seed and concept, positives then negatives, prefixes by k
    concepts: list[int]
    ks: tuple[int, ...]

    def of_k(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train rows [S*C, 2k], labels [2k]) of every seed x concept problem with k shots."""
        kmax = self.rows.shape[2] // 2
        rows = torch.cat([self.rows[:, :, :k], self.rows[:, :, kmax : kmax + k]], dim=2)
        return rows.reshape(-1, 2 * k), torch.arange(2 * k) < k


def draw_supports(train_labels: sp.csc_matrix, cols: list[int], ks: tuple[int, ...], seeds: int) -> Supports:
    """Per (seed, concept) one shuffled order of positives and of negatives; k shots are their first k."""
    n, kmax = train_labels.shape[0], max(ks)
    rows = np.zeros((seeds, len(cols), 2 * kmax), dtype=np.int64)
    for ci, c in enumerate(cols):
        pos_all = np.flatnonzero(train_labels[:, c].toarray().ravel() > 0)
        neg_all = np.setdiff1d(np.arange(n), pos_all)
        for seed in range(seeds):
            rng = np.random.default_rng([seed, c])
            rows[seed, ci, :kmax] = rng.permutation(pos_all)[:kmax]
            rows[seed, ci, kmax:] = rng.permutation(neg_all)[:kmax]
    return Supports(torch.from_numpy(rows), cols, ks)


# ---------------------------------------------------------------------------------------- scorers
def logreg_scores(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, c: float, iters: int) -> torch.Tensor:
    """Batched L2 logistic regression: xs [P, n, D], ys [n] (shared labels), xq [Q, D] -> scores [Q, P]."""
    p, _, d = xs.shape
    xs64, y = xs.double(), ys.double()
    w = torch.zeros(p, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("pnd,pd->pn", xs64, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="sum")
        loss = loss + 0.5 / c * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    # scored a block of queries at a time: a 100k-query split in float64 at once would cost 200 MB
    return torch.cat([(xq[s : s + 8192].double() @ w.T + b).float() for s in range(0, xq.shape[0], 8192)])


def prototype_scores(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    pos = torch.nn.functional.normalize(xs[:, ys].mean(1), dim=-1)
    neg = torch.nn.functional.normalize(xs[:, ~ys].mean(1), dim=-1)
    return xq @ (pos - neg).T


def _standardised(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (scores - reference.mean(0)) / reference.std(0, unbiased=False).clamp_min(1e-12)


def tip_scores(xs, ys, xq, xref, prompts: torch.Tensor | None, alpha: float, beta: float,
               chunk: int = 512) -> torch.Tensor:
    """Zero-shot prompt score + alpha x cache score, each standardised over the train images
    (`xref`, labels unused) so alpha weighs two terms of the same scale whatever the embedding.
    `prompts` [P, D] (zero rows: no prompt for that concept). Queries go `chunk` at a time."""

    def cache(x):  # [Q, P]
        parts = []
        for s in range(0, x.shape[0], chunk):
            affinity = torch.exp(-beta * (1.0 - torch.einsum("qd,pnd->qpn", x[s : s + chunk], xs)))
            parts.append(affinity[..., ys].mean(-1) - affinity[..., ~ys].mean(-1))
        return torch.cat(parts)

    score = alpha * _standardised(cache(xq), cache(xref))
    if prompts is not None:
        has = prompts.norm(dim=1) > 0
        zs = _standardised(xq @ prompts.T, xref @ prompts.T)
        score = score + torch.where(has[None], zs, torch.zeros_like(zs))
    return score


def lgbm_scores(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, trees: int, seeds: torch.Tensor) -> torch.Tensor:
    try:
        import lightgbm as lgb
    except ImportError:
        raise BadOption("the few-shot method lightgbm needs LightGBM: pip install 'medembed[lightgbm]' (or leave "
                        "lightgbm out of the methods)") from None

    out = []
    for i in range(xs.shape[0]):
        clf = lgb.LGBMClassifier(n_estimators=trees, learning_rate=0.1, num_leaves=4, min_child_samples=1,
                                 min_child_weight=1e-3, min_data_in_bin=1, random_state=int(seeds[i]), n_jobs=1,
                                 verbose=-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no further splits" on 2-row supports is expected
            clf.fit(xs[i].numpy(), ys.numpy())
            out.append(torch.from_numpy(clf.predict_proba(xq.numpy())[:, 1]).float())
    return torch.stack(out, dim=1)


def _method_scores(method: str, xs, ys, xq, xtr, prompts, seed_of, cfg: FewShotConfig) -> torch.Tensor:
    if method == "logreg":
        return logreg_scores(xs, ys, xq, cfg.logreg_c, cfg.logreg_iter)
    if method == "prototype":
        return prototype_scores(xs, ys, xq)
    if method == "tip_adapter":
        return tip_scores(xs, ys, xq, xtr, prompts, cfg.tip_alpha, cfg.tip_beta)
    return lgbm_scores(xs, ys, xq, cfg.lgbm_trees, seed_of)


def score(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    concept_emb: torch.Tensor | None = None,
    concept_names: list[str] | None = None,
    config: FewShotConfig | None = None,
    progress: bool = False,
) -> FewShotResult:
    """train_emb [Ntr, D], test_emb [Nte, D] unit vectors; labels multi-hot over the same columns.
    concept_emb [C, D] prompt embeddings feed `tip_adapter`'s zero-shot term (None: cache only).
    `progress`: a bar on stderr over the (k, method) steps, each fitting every concept and seed at once
    (seconds each on a large vocabulary; a bar update costs microseconds)."""
    cfg = config or FewShotConfig()
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise BadOption(f"unknown few-shot methods {sorted(unknown)}; choose from {METHODS}")
    train_labels, test_labels = sp.csc_matrix(train_labels), sp.csc_matrix(test_labels)
    if train_labels.shape[1] != test_labels.shape[1]:
        raise ValueError(f"train has {train_labels.shape[1]} concept columns, evaluation split {test_labels.shape[1]}")
    ks = tuple(sorted(set(cfg.ks)))
    cols = choose_concepts(train_labels, test_labels, max(ks), cfg.max_concepts, cfg.min_test_positives)
    ap = np.zeros((len(cfg.methods), len(ks), cfg.seeds, len(cols)))
    if cols:
        supports = draw_supports(train_labels, cols, ks, cfg.seeds)
        xtr, xte = train_emb.float(), test_emb.float()
        truth = torch.from_numpy(test_labels[:, cols].toarray() > 0).repeat(1, cfg.seeds)  # [Nte, S*C]
        prompts = _prompts(concept_emb, concept_names, cols, cfg.seeds)
        seed_of = torch.arange(cfg.seeds).repeat_interleave(len(cols))
        with tqdm(total=len(ks) * len(cfg.methods), desc="few-shot", unit="step", disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            for ki, k in enumerate(ks):
                rows, ys = supports.of_k(k)
                xs = xtr[rows]  # [S*C, 2k, D]
                for mi, method in enumerate(cfg.methods):
                    bar.set_postfix_str(f"{k}-shot {method}: {len(cols)} concepts x {cfg.seeds} seed(s)")
                    scores = _method_scores(method, xs, ys, xte, xtr, prompts, seed_of, cfg)
                    ap[mi, ki] = average_precision(scores, truth).reshape(cfg.seeds, len(cols)).numpy()
                    bar.update()
    tr_counts = np.asarray(train_labels.sum(0)).ravel()
    te_counts = np.asarray(test_labels.sum(0)).ravel()
    return FewShotResult(ks=ks, methods=tuple(cfg.methods), concept_rows=cols,
                         train_positives=[int(tr_counts[c]) for c in cols],
                         test_positives=[int(te_counts[c]) for c in cols], ap=ap)


def _prompts(concept_emb, concept_names, cols: list[int], seeds: int) -> torch.Tensor | None:
    """The prompt embedding of each problem's concept (zero for unnamed concepts)."""
    if concept_emb is None:
        return None
    named = torch.tensor([concept_names is None or bool(concept_names[c]) for c in cols])
    per_concept = concept_emb[cols].float() * named[:, None]
    return per_concept.repeat(seeds, 1)


def compute(
    train_emb: torch.Tensor,
    train_labels: sp.csr_matrix,
    test_emb: torch.Tensor,
    test_labels: sp.csr_matrix,
    concept_emb: torch.Tensor | None = None,
    concept_names: list[str] | None = None,
    config: FewShotConfig | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Flat numbers: mAP (%) per method and k (mean over concepts, then seeds), its spread over
    seeds, and how many concepts and seeds were used (see `score`)."""
    return score(train_emb, train_labels, test_emb, test_labels, concept_emb, concept_names, config,
                 progress).metrics()


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


# --- the eval section ---------------------------------------------------------------------------
_METHOD_KEY = re.compile(r"^fewshot_(?P<method>.+)_map@(?P<k>\d+)$")


def curves(metrics: dict[str, float], cfg: FewShotConfig) -> dict[str, list[float]]:
    """method -> mAP per k, for the few-shot figure (empty without concepts)."""
    if not metrics.get("fewshot_concepts"):
        return {}
    ks = sorted(set(cfg.ks))
    return {m: [metrics[f"fewshot_{m}_map@{k}"] for k in ks] for m in cfg.methods}


def _score(inputs: ColumnInputs, cfg: FewShotConfig) -> Scores:
    test, train = inputs.test, inputs.train
    metrics = compute(inputs.train_images(), train.concepts, inputs.images(), test.concepts, inputs.concept_prompts(),
                      test.concept_names, cfg, inputs.progress)
    return Scores(metrics, curves=curves(metrics, cfg))


def _chance(inputs: ColumnInputs, cfg: FewShotConfig) -> Scores:
    metrics = chance(inputs.train.concepts, inputs.test.concepts, cfg)
    return Scores(metrics, curves=curves(metrics, cfg))


def method_table(metrics: dict[str, float]) -> str:
    """One column's few-shot mAP as methods x k (the long flat keys, made readable)."""
    grid: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        m = _METHOD_KEY.match(key)
        if m:
            grid.setdefault(m["method"], {})[int(m["k"])] = value
    if not grid:
        return ""
    ks = sorted({k for row in grid.values() for k in row})
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method, row in grid.items():
        lines.append(f"| {method} | " + " | ".join(format_value("", row.get(k)) for k in ks) + " |")
    return "\n".join(lines)


def _report(view: SectionView[FewShotConfig]) -> list[str]:
    out = ["", f"## {view.title}", ""]
    keys = [k for k in view.keys if not _METHOD_KEY.match(k) and not k.endswith("_seed_std")]
    if not keys:
        return out + view.notes
    cfg = view.settings
    n = int(view.columns[view.first].get("fewshot_concepts", 0))
    out += [f"k positive and k negative train images per concept, {cfg.seeds} seed(s); the {n} most frequent "
            f"train concepts with at least {max(cfg.ks)} train and {cfg.min_test_positives} evaluation positives "
            f"(capped at {cfg.max_concepts} to keep evaluation fast). mAP in % over the evaluation split; "
            "`fewshot_map@k` is the logistic-regression probe.", "", markdown_table(view.columns, keys), ""]
    for name, metrics in view.columns.items():
        if not name.startswith("chance") and method_table(metrics):
            out += [f"All scorers, `{name}`:", "", method_table(metrics), ""]
    if "figure" in view.files:
        out += [f"![few-shot]({view.files['figure']})", ""]
    return out


METRIC = Metric(
    section="fewshot", title="Concept few-shot", name="few-shot", keys=r"fewshot_[\w@]+", headline=r"fewshot_map@\d+",
    score=_score, chance=_chance, needs=Needs(train=True, concepts=True), report=_report,
)
