"""`cli.py eval`: every metric for each run and its baselines on one split, then files to read.

Three steps, so that nothing is lost or contradicted:
1. `plan_eval` loads the runs and the pools they are scored on and checks everything that can be
   checked before a number is computed: the runs are comparable (same dataset, pool and backbone,
   unless a cross table is asked for), the output folder is new (or replacing it was asked for),
   K fits the pool.
2. `score_columns` computes each column (chance, the closed-form baseline, each run), one section
   of the metric registry (`evaluate.metrics.METRICS`) at a time, printing one progress line per
   section; then each run's paired differences with the first. Every statistic is computed there
   once and kept in the column's result, which the files only read.
3. `write_outputs` builds the whole evaluation folder beside its final place and swaps it in with
   one rename: a reader sees the previous evaluation or the new one, never a mix.

Columns are computed the same way for everything: a model is two raw-feature -> embedding maps
(`evaluate.models`), so chance, the closed-form head and each trained run are directly comparable.
Chance columns come from closed forms (expected values of a random ranking), not from sampling.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from medembed.adapt import run_files
from medembed.adapt.closed_form_store import closed_form
from medembed.adapt.run import AdaptedRun, describe_run
from medembed.adapt.tuning.runs import open_run
from medembed.cache.provenance import ProvenanceMismatch, backbone_differences
from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.common.files import folder_state, replace_folder, slug, staging_folder, write_json
from medembed.common.locks import exclusive
from medembed.common.version import __version__
from medembed.evaluate import detection, fewshot, retrieval, zeroshot
from medembed.evaluate import metrics as registry
from medembed.evaluate.examples import write_examples
from medembed.evaluate.metric import ColumnInputs, Metric, Scores
from medembed.evaluate.models import EmbeddingModel, model_from_heads, model_from_run
from medembed.evaluate.new_data import eval_splits, open_runs
from medembed.evaluate.plots import fewshot_curves, recall_curves, training_curve
from medembed.evaluate.report import markdown_report
from medembed.evaluate.stats import PairedDifference, paired_difference

SCHEMA_VERSION = 2
COMPARISON = "comparison.json"


@dataclass
class EvalOptions:
    zeroshot: zeroshot.ZeroShotConfig = field(default_factory=zeroshot.ZeroShotConfig)
    fewshot: fewshot.FewShotConfig = field(default_factory=fewshot.FewShotConfig)
    detection: detection.DetectionConfig = field(default_factory=detection.DetectionConfig)
    closed_form: bool = True  # fit the closed-form baseline on train (ridge and weighting chosen on valid)
    sections: tuple[str, ...] = field(default_factory=registry.sections)  # default: every registered metric
    examples: int = 1  # text->image and image->text example grids of the first run
    memory_mb: float = retrieval.DEFAULT_MEMORY_MB
    data: str | None = None  # score this dataset's raw images and captions, encoded by each run's own backbone
    features_root: str = "features"  # where that encoding is cached
    progress: bool = True
    cross: bool = False  # allow runs scored on different pools (datasets, splits or backbones)
    overwrite: bool = False  # replace an earlier evaluation in the output folder

    def settings(self, section: str) -> object:
        """A metric's settings: the field named after its section (`zeroshot`, `fewshot`,
        `detection`); None for a metric without one."""
        value = getattr(self, section, None)
        return value if is_dataclass(value) else None


@dataclass
class EvalPool:
    """One evaluated split and the splits its baselines and concept sections learn from."""

    features_dir: Path
    test: CachedSplit
    train: CachedSplit | None
    valid: CachedSplit | None
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.test.attrs.get('dataset', self.features_dir.parent.name)}/{self.test.attrs.get('backbone', '')}"


@dataclass
class Column:
    name: str
    kind: str  # "chance" | "baseline" | "run"
    pool: EvalPool
    model: EmbeddingModel | None = None
    run: AdaptedRun | None = None
    note: str = ""  # how a baseline was fitted


@dataclass
class ColumnResult:
    """Everything scored for one column; the files written afterwards only read it."""

    metrics: dict[str, float] = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)  # section -> the metric keys it produced, in order
    curves: dict[str, dict[str, list]] = field(default_factory=dict)  # section -> what its figure draws
    details: dict[str, object] = field(default_factory=dict)  # section -> the module's full result
    hits: dict[str, np.ndarray] = field(default_factory=dict)  # rate metric -> per-query 0/1 outcomes
    # metric -> difference with the first run on the same queries; None: not paired (the first run,
    # a baseline, or a run scored on another pool)
    paired: dict[str, PairedDifference] | None = None
    embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # the evaluated split's (images, texts)
    offsets: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # the run's query bank, per image / caption
    seconds: float = 0.0

    def add(self, metric: Metric, scores: Scores) -> None:
        """One section's scores; a key outside the metric's declared `keys`, or one another section
        already produced, is refused rather than silently overwriting a number."""
        stray = [k for k in scores.metrics if not metric.owns(k) or k in self.metrics]
        if stray:
            raise ValueError(f"metric {metric.section!r} produced {', '.join(stray)}: keys outside its declared "
                             f"`keys` ({metric.keys}) or already produced by another section")
        self.metrics.update(scores.metrics)
        self.sections[metric.section] = list(scores.metrics)
        self.hits.update(scores.hits)
        if scores.curves:
            self.curves[metric.section] = scores.curves
        if scores.detail is not None:
            self.details[metric.section] = scores.detail


@dataclass
class EvalPlan:
    split: str
    ks: list[int]
    out_dir: Path
    runs: list[AdaptedRun]
    names: list[str]
    pools: dict[Path, EvalPool]
    columns: list[Column]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ planning
def _unique_names(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def default_out_dir(runs: list[AdaptedRun], names: list[str], split: str, data: str | None) -> Path:
    """`FIRST_RUN/eval-SPLIT`, plus `-on-DATASET` for new raw data and `-vs-OTHER-...` for a
    comparison: a folder named after what was evaluated, so two evaluations never share one."""
    parts = [f"eval-{split}"]
    if data is not None:
        parts.append(f"on-{slug(Path(data).name)}")
    if len(names) > 1:
        parts.append("vs-" + "-".join(slug(n.replace("/", "_")) for n in names[1:]))
    name = "-".join(parts)
    if len(name) > 120:  # many runs: keep the name short and unique
        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return runs[0].run_dir / name


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not (out_dir / COMPARISON).exists():
        raise FileExistsError(f"{out_dir}: exists and is not an evaluation folder; choose another --out")
    if not overwrite:
        raise FileExistsError(f"{out_dir}: already holds an evaluation; pass --overwrite to replace it "
                              "or --out to write elsewhere")


def _listed(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def load_pool(features_dir: Path, split: str, need_train: bool, need_valid: bool, captions: bool = True) -> EvalPool:
    """The evaluated split, and train / valid when asked for (their captions only with `captions`:
    the closed form learns from pairs, few-shot and detection from images and labels alone).
    Features stay in their stored dtype (float16 halves the pool's memory); every model widens
    them a chunk at a time. Without a usable train split, the sections that learn from train
    carry a note saying why they are empty."""
    files = find_splits(features_dir)
    if split not in files:
        raise FileNotFoundError(f"{features_dir}: no {split}.h5 (found: {', '.join(files)})")
    test = load_split(files[split], with_views=False, dtype=None)
    notes: dict[str, list[str]] = {}
    train = valid = None
    learners = [m for m in registry.METRICS if m.needs.train]
    names = [m.name for m in learners]
    if need_train and split == "train":
        notes = {m.section: [f"evaluating on train: {_listed(names)} need a separate train split; skipped"]
                 for m in learners}
    elif need_train and "train" not in files:
        notes = {m.section: [f"{features_dir} has no train.h5: {_listed([*names, 'the closed form'])} skipped"]
                 for m in learners}
    elif need_train:
        train = load_split(files["train"], with_views=False, with_captions=captions, dtype=None)
    if need_valid and "valid" in files and split != "valid":
        valid = load_split(files["valid"], with_views=False, with_captions=captions, dtype=None)
    return EvalPool(Path(features_dir), test, train, valid, notes)


def _pool_differences(a: EvalPool, b: EvalPool) -> list[str]:
    """What makes scores on pool b incomparable with scores on pool a."""
    ta, tb = a.test, b.test
    out = []
    for key in ("dataset", "dataset_fingerprint", "split", "backbone"):
        va, vb = str(ta.attrs.get(key, "")), str(tb.attrs.get(key, ""))
        if va != vb:
            out.append(f"{key} {va[:40]} vs {vb[:40]}")
    if ta.image_ids != tb.image_ids or ta.captions != tb.captions:
        out.append(f"pool {ta.n_images} images / {ta.n_captions} captions vs {tb.n_images} / {tb.n_captions}")
    return out


def _check_comparable(runs: list[AdaptedRun], names: list[str], pools: dict[Path, EvalPool], cross: bool) -> None:
    first = pools[Path(runs[0].features_dir)]
    for name, run in zip(names[1:], runs[1:]):
        diffs = _pool_differences(first, pools[Path(run.features_dir)])
        if diffs and not cross:
            raise ValueError(f"{names[0]} and {name} are scored on different pools ({'; '.join(diffs)}): their "
                             "numbers are not comparable. Evaluate them separately, or pass --cross for a table "
                             "that scores each run on its own pool beside that pool's own baselines")


def _check_trained_on(run: AdaptedRun, pool: EvalPool) -> None:
    """A run's heads only read the features of the backbone they were trained on."""
    trained = run.config.get("cache", {})
    diffs = backbone_differences(pool.test.attrs, trained)
    if trained and diffs:
        raise ProvenanceMismatch(pool.test.path, diffs)


def _cap_ks(ks: list[int], pools: dict[Path, EvalPool]) -> tuple[list[int], list[str]]:
    smallest = min(p.test.n_images for p in pools.values())
    capped = sorted({min(k, smallest) for k in ks})
    over = [k for k in ks if k > smallest]
    note = [f"--k {', '.join(map(str, over))} is more than the {smallest} images of the pool: capped at "
            f"R@{smallest}"] if over else []
    return capped, note


def plan_eval(run_refs: list, split: str, ks, out_dir: Path | None, options: EvalOptions) -> EvalPlan:
    """Everything that can be checked before a number is computed; raises with a one-line reason."""
    ks = sorted({int(k) for k in ks})
    if not run_refs:
        raise ValueError("eval needs at least one --run")
    if not ks or ks[0] < 1:
        raise ValueError(f"--k values must be positive integers, got {ks}")
    known = registry.sections()
    unknown = set(options.sections) - set(known)
    if unknown:
        raise ValueError(f"unknown sections {', '.join(sorted(unknown))} (choose from {', '.join(known)})")
    asked = registry.asked(options.sections)
    need_train = options.closed_form or any(m.needs.train for m in asked)
    need_valid = options.closed_form or any(m.needs.valid for m in asked)
    runs = [open_run(r) for r in run_refs]
    names = _unique_names([r.checkpoint or r.run_dir for r in runs])
    out_dir = Path(out_dir) if out_dir else default_out_dir(runs, names, split, options.data)
    _check_out_dir(out_dir, options.overwrite)
    if options.data is not None:
        dataset, wanted = eval_splits(options.data, split, need_train, need_valid, _logger(options))
        runs = open_runs(runs, dataset, wanted, options.features_root, progress=options.progress)
    pools: dict[Path, EvalPool] = {}
    for run in runs:
        fd = Path(run.features_dir)
        run.split_files()  # a features folder that moved is named with how to re-point the run
        if fd not in pools:
            pools[fd] = load_pool(fd, split, need_train, need_valid, captions=options.closed_form)
        _check_trained_on(run, pools[fd])
    _check_comparable(runs, names, pools, options.cross)
    ks, notes = _cap_ks(ks, pools)
    columns = _columns(runs, names, pools, options)
    return EvalPlan(split, ks, out_dir, runs, names, pools, columns, notes)


def _columns(runs: list[AdaptedRun], names: list[str], pools: dict[Path, EvalPool], options: EvalOptions) -> list[Column]:
    """chance (and the closed form) of every pool, then each run; a pool's baselines carry its label
    when there are several pools."""
    several = len(pools) > 1
    cols = []
    for fd, pool in pools.items():
        tag = f" [{pool.label}]" if several else ""
        cols.append(Column(f"chance{tag}", "chance", pool))
        if options.closed_form and pool.train is not None:
            owner = next(r for r in runs if Path(r.features_dir) == fd)
            cols.append(Column(f"closed-form{tag}", "baseline", pool, run=owner))
    for name, run in zip(names, runs):
        cols.append(Column(name, "run", pools[Path(run.features_dir)], model_from_run(run, name), run))
    return cols


# ------------------------------------------------------------------------------------------- scoring
def _logger(options: EvalOptions) -> Callable[[str], None]:
    if not options.progress:
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _fit_closed_form(col: Column, options: EvalOptions) -> EmbeddingModel:
    """The same closed form as `adapt --head cca`: ridge and weighting chosen on valid."""
    fit = closed_form(col.pool.train, col.pool.valid, col.run.dim)
    chosen = "chosen on valid" if fit.chosen_on_valid else "(no valid split to choose them on)"
    kept = (f"; reused from {fit.stored}" if fit.reused else f"; stored in {fit.stored}" if fit.stored else "")
    col.note = f"regularised CCA fitted on train, ridge {fit.reg:g} and weighting {fit.power:g} {chosen}{kept}"
    return model_from_heads(col.name, fit.image_head, fit.text_head)


def score_column(col: Column, plan: EvalPlan, options: EvalOptions, log: Callable[[str], None]) -> ColumnResult:
    """Every asked-for section that the column's pool has the data for, in registry order: chance
    from each metric's closed form, the baseline and runs from their embeddings."""
    start = time.perf_counter()
    if col.kind == "baseline":
        t0 = time.perf_counter()
        col.model = _fit_closed_form(col, options)
        log(f"eval {col.name}: fitted ({col.note}) {time.perf_counter() - t0:.2f} s")
    pool = col.pool
    inputs = ColumnInputs(pool.test, pool.train, pool.valid, plan.ks, options.memory_mb,
                          None if col.kind == "chance" else col.model)
    # only the first run's embeddings outlive its scoring (its example grids); on a 100k pool each
    # kept pair is 200 MB
    keep = col.kind != "chance" and options.examples > 0 and col.name == plan.names[0]
    res = ColumnResult()
    asked = registry.asked(options.sections)
    last_text_reader = max((i for i, m in enumerate(asked) if m.needs.texts), default=-1)
    for i, metric in enumerate(asked):
        if metric.needs.met_by(pool.test, pool.train):
            t0 = time.perf_counter()
            scorer = metric.chance if col.kind == "chance" else metric.score
            res.add(metric, scorer(inputs, options.settings(metric.section)))
            log(f"eval {col.name}: {metric.section} {time.perf_counter() - t0:.2f} s")
        if i == last_text_reader and not keep:
            inputs.release_texts()  # the later sections score images only
    if keep:
        res.embeddings = (inputs.images(), inputs.texts())
        res.offsets = inputs.ranked_offsets()
    res.seconds = time.perf_counter() - start
    return res


def pair_with_first(plan: EvalPlan, results: dict[str, ColumnResult]) -> None:
    """Each run after the first against the first, on the queries both were scored on: the paired
    bootstrap interval of the difference of every rate metric both kept per-query hits for
    (Recall@K, the modality accuracy), stored in the run's result."""
    runs = [c for c in plan.columns if c.kind == "run"]
    first = results[runs[0].name]
    for other in runs[1:]:
        if other.pool is not runs[0].pool:
            continue  # a cross table: different queries, no pairing
        res = results[other.name]
        res.paired = {key: paired_difference(hits, res.hits[key]) for key, hits in first.hits.items()
                      if key in res.hits}


def score_columns(plan: EvalPlan, options: EvalOptions, log: Callable[[str], None]) -> dict[str, ColumnResult]:
    """Every column, then the runs' paired differences: each statistic once, for every file to read."""
    results = {col.name: score_column(col, plan, options, log) for col in plan.columns}
    pair_with_first(plan, results)
    return results


# ----------------------------------------------------------------------------------- comparisons
def paired(plan: EvalPlan, results: dict[str, ColumnResult]) -> dict[str, dict[str, dict[str, float]]]:
    """The paired differences scoring stored ({run: {metric: {"diff", "ci_low", "ci_high"}}}), as
    comparison.json, the report and the console show them."""
    stored = {c.name: results[c.name].paired for c in plan.columns if c.kind == "run"}
    return {name: {m: {"diff": p.diff, "ci_low": p.low, "ci_high": p.high} for m, p in rows.items()}
            for name, rows in stored.items() if rows is not None}


# ------------------------------------------------------------------------------------------- writing
def _scored(pool: EvalPool) -> dict:
    """The provenance of what a column was scored on."""
    attrs = pool.test.attrs
    keys = ("dataset", "dataset_fingerprint", "split", "backbone", "weights_sha256", "data_root", "created")
    return {"features": pool.test.path, "pool_images": pool.test.n_images, "pool_captions": pool.test.n_captions,
            **{k: attrs.get(k, "") for k in keys}}


def _run_record(plan: EvalPlan, col: Column, res: ColumnResult, created: str) -> dict:
    run = col.run
    return {
        "schema_version": SCHEMA_VERSION, "toolkit_version": __version__, "created": created,
        "run": col.name, "run_ref": str(run.checkpoint or run.run_dir), "describe": describe_run(run),
        "split": plan.split, "ks": plan.ks, "scored": _scored(col.pool),
        "metrics": res.metrics, "sections": res.sections, "seconds": round(res.seconds, 2),
    }


def _comparison(plan: EvalPlan, results: dict[str, ColumnResult], created: str, pairs: dict) -> dict:
    return {
        "paired_vs": plan.names[0], "paired": pairs,
        "schema_version": SCHEMA_VERSION, "toolkit_version": __version__, "created": created,
        "split": plan.split, "ks": plan.ks,
        "runs": {n: str(r.checkpoint or r.run_dir) for n, r in zip(plan.names, plan.runs)},
        "columns": {c.name: results[c.name].metrics for c in plan.columns},
        "sections": {c.name: results[c.name].sections for c in plan.columns},
        "pools": {c.name: _scored(c.pool) for c in plan.columns},
        "seconds": {c.name: round(results[c.name].seconds, 2) for c in plan.columns},
        "notes": plan.notes,
    }


def metrics_file(name: str) -> str:
    return f"metrics-{slug(name.replace('/', '_'))}.json"


def _write_concepts_csv(path: Path, columns: dict[str, ColumnResult]) -> Path | None:
    """Zero-shot AUROC and AP of every concept, one column pair per scored column."""
    zs = {n: c.details.get("zeroshot") for n, c in columns.items()}
    with_concepts = {n: z for n, z in zs.items() if isinstance(z, zeroshot.ZeroShotResult) and z.concept_rows}
    if not with_concepts:
        return None
    first = next(iter(with_concepts.values()))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept_id", "name", "positives", *(f"{n}_{m}" for n in with_concepts for m in ("auroc", "ap"))])
        for i, cid in enumerate(first.concept_ids):
            row = [cid, first.concept_names[i], first.positives[i]]
            for z in with_concepts.values():
                row += [f"{100 * z.auroc[i]:.2f}", f"{100 * z.ap[i]:.2f}"] if i < len(z.auroc) else ["", ""]
            w.writerow(row)
    return path


def write_outputs(plan: EvalPlan, results: dict[str, ColumnResult], options: EvalOptions,
                  expected: tuple[int, int] | None) -> dict:
    """Build the evaluation folder beside its final place, then swap it in (all or nothing), only if
    the folder is still in the `expected` state (`common.files.folder_state`) it was checked in."""
    work = staging_folder(plan.out_dir)
    try:
        files = _write_files(work, plan, results, options)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_folder(work, plan.out_dir, expected)
    return {k: (plan.out_dir / Path(v).relative_to(work) if isinstance(v, Path) else
                [plan.out_dir / Path(x).relative_to(work) for x in v]) for k, v in files.items()}


def _training_curve(col: Column, work: Path, title: str) -> Path | None:
    """The run's own metrics.jsonl as a figure (none for the closed form, which has no epochs)."""
    rows = [r for r in _metrics_rows(col.run) if "train_loss" in r]
    if not rows:
        return None
    summary = col.run.run_dir / run_files.SUMMARY
    best = json.loads(summary.read_text()).get("best_epoch", 0) if summary.exists() else 0
    return training_curve(rows, best, work / f"training-{slug(col.name.replace('/', '_'))}.png",
                          title=f"Training of {col.name} (valid split of its cache); evaluated on {title}")


def _metrics_rows(run: AdaptedRun) -> list[dict]:
    path = run.run_dir / run_files.METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_files(work: Path, plan: EvalPlan, results: dict[str, ColumnResult], options: EvalOptions) -> dict:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    runs = [c for c in plan.columns if c.kind == "run"]
    metrics_paths = [write_json(work / metrics_file(c.name), _run_record(plan, c, results[c.name], created))
                     for c in runs]
    pairs = paired(plan, results)
    write_json(work / COMPARISON, _comparison(plan, results, created, pairs))
    first = plan.pools[Path(plan.runs[0].features_dir)]
    title = f"{first.test.attrs.get('dataset', '')} {plan.split}, {first.test.n_images} images"
    figures: dict[str, Path] = {}  # section -> its figure, drawn from the curves scoring kept
    curves = {n: r.curves["retrieval"] for n, r in results.items() if r.curves.get("retrieval")}
    if curves:
        figures["retrieval"] = recall_curves(curves, work / "recall_at_k.png",
                                             title=f"Recall@K of {', '.join(plan.names)} on {title} (bands: 95% intervals)")
    fs = {n: r.curves["fewshot"] for n, r in results.items() if r.curves.get("fewshot")}
    if any(c.kind != "chance" and c.name in fs for c in plan.columns):
        ks = sorted(set(options.fewshot.ks))
        spread = {n: {m: [results[n].metrics.get(f"fewshot_{m}_map@{k}_seed_std", 0.0) for k in ks] for m in c}
                  for n, c in fs.items()}
        figures["fewshot"] = fewshot_curves(fs, ks, work / "fewshot.png", spread=spread,
                                            title=f"Concept few-shot, {title} (mean over {options.fewshot.seeds} "
                                                  "seeds, bars: their spread)")
    training: dict[str, Path] = {}
    for c in runs:
        curve = _training_curve(c, work, title)
        if curve is not None:
            training[f"training {c.name}"] = curve
    examples = []
    primary = results[runs[0].name]
    if options.examples and primary.embeddings is not None:
        examples = write_examples(first.test, *primary.embeddings, work, options.examples, run_name=runs[0].name,
                                  offsets=primary.offsets)
    section_files = {section: {"figure": path} for section, path in figures.items()}
    concepts_csv = _write_concepts_csv(work / "zeroshot_concepts.csv", results)
    if concepts_csv is not None:
        section_files.setdefault("zeroshot", {})["table"] = concepts_csv
    report = work / "report.md"
    report.write_text(markdown_report(plan, results, options, section_files, training, examples, work, pairs))
    return {"metrics": metrics_paths, "report": report, "comparison": work / COMPARISON,
            "plots": [*figures.values(), *training.values()], "examples": examples}


# -------------------------------------------------------------------------------------------- entry
def run_eval(
    run_dirs: list,
    split: str = "test",
    ks: list[int] | tuple[int, ...] = (1, 5, 10),
    out_dir: Path | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Evaluate runs (and their baselines) on one split; write the evaluation folder.

    `run_dirs`: run folders, unfreezing run folders, fine-tuned checkpoints or loaded runs. With
    `options.data` each run is scored on that dataset's raw images and captions, encoded by the
    run's own backbone (the fine-tuned one for a checkpoint) instead of on the run's cache.
    Writes `metrics-RUN.json` for every run, `comparison.json` (every column), `report.md`, plots
    and examples into a new folder (default `FIRST_RUN/eval-SPLIT[-vs-...]`).
    Returns {"columns", "metrics" (the first run's), "out_dir", "files", "notes", "split",
    "pool_images", "pool_captions"}.
    """
    options = options or EvalOptions()
    plan = plan_eval(list(run_dirs), split, ks, out_dir, options)
    log = _logger(options)
    for note in plan.notes:
        log(f"note: {note}")
    # one eval writes a folder at a time; checked again under the lock, since another may have
    # finished between the plan's check and now, and once more right before the swap
    with exclusive(plan.out_dir, "eval", "wait for it to finish or choose another --out"):
        _check_out_dir(plan.out_dir, options.overwrite)
        state = folder_state(plan.out_dir)
        results = score_columns(plan, options, log)
        files = write_outputs(plan, results, options, state)
    first = plan.pools[Path(plan.runs[0].features_dir)].test
    return {
        "paired": paired(plan, results),
        "paired_vs": plan.names[0],
        "columns": {n: r.metrics for n, r in results.items()},
        "metrics": results[plan.names[0]].metrics,
        "out_dir": plan.out_dir,
        "files": files,
        "notes": plan.notes,
        "split": split,
        "pool_images": first.n_images,
        "pool_captions": first.n_captions,
    }
