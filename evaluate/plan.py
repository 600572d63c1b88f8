"""Planning an evaluation: the runs, the pools they are scored on, and every check that can be made
before a number is computed (comparable runs, a new output folder, K within the pool)."""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import torch

from medembed.adapt.run import AdaptedRun
from medembed.adapt.run_files import SELECTION
from medembed.cache import schema
from medembed.cache.provenance import ProvenanceMismatch, backbone_differences
from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.common.errors import AlreadyExists, BadOption, Incompatible, NotFound
from medembed.common.files import slug
from medembed.common.planning import DEFAULT_MAX_MEMORY_GB
from medembed.common.ranking import DEFAULT_MEMORY_MB
from medembed.common.stats import PairedDifference
from medembed.evaluate import detection, fewshot, zeroshot
from medembed.evaluate import metrics as registry
from medembed.evaluate.memory import EvalMemoryPlan, PoolFiles, plan_eval_memory
from medembed.evaluate.metric import Metric, Scores
from medembed.evaluate.new_data import eval_splits
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT
from medembed.model.embedding import EmbeddingModel, model_from_run
from medembed.model.runs import open_run, open_runs

COMPARISON = "comparison.json"  # the file that marks a folder as an evaluation (written last)
EVAL_SPLIT = "test"  # what eval scores unless told: the split no run trained or chose its epoch on


def logger(options: EvalOptions) -> Callable[[str], None]:
    """One progress line per step on stderr, or nothing when `options.progress` is off."""
    if not options.progress:
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


@dataclass
class EvalOptions:
    zeroshot: zeroshot.ZeroShotConfig = field(default_factory=zeroshot.ZeroShotConfig)
    fewshot: fewshot.FewShotConfig = field(default_factory=fewshot.FewShotConfig)
    detection: detection.DetectionConfig = field(default_factory=detection.DetectionConfig)
    closed_form: bool = True  # fit the closed-form baseline on train (ridge and weighting chosen on valid)
    sections: tuple[str, ...] = field(default_factory=registry.sections)  # default: every registered metric
    examples: int = 1  # text->image and image->text example grids of the first run
    memory_mb: float = DEFAULT_MEMORY_MB
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB  # the whole process; planned before a feature is read
    data: str | None = None  # score this dataset's raw images and captions, encoded by each run's own backbone
    features_root: str = DEFAULT_FEATURES_ROOT  # where that encoding is cached
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
        return f"{self.test.attrs.get(schema.DATASET, self.features_dir.parent.name)}/{self.test.attrs.get(schema.BACKBONE, '')}"


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
    memory: EvalMemoryPlan | None = None


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


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not (out_dir / COMPARISON).exists():
        raise AlreadyExists(f"{out_dir}: exists and is not an evaluation folder; choose another --out")
    if not overwrite:
        raise AlreadyExists(f"{out_dir}: already holds an evaluation; pass --overwrite to replace it "
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
        raise NotFound(f"{features_dir}: no {schema.split_file(split)} (found: {', '.join(files)})")
    test = load_split(files[split], with_views=False, dtype=None)
    notes: dict[str, list[str]] = {}
    train = valid = None
    learners = [m for m in registry.METRICS if m.needs.train]
    names = [m.name for m in learners]
    if need_train and split == "train":
        notes = {m.section: [f"evaluating on train: {_listed(names)} need a separate train split; skipped"]
                 for m in learners}
    elif need_train and "train" not in files:
        notes = {m.section: [f"{features_dir} has no {schema.split_file('train')}: {_listed([*names, 'the closed form'])} skipped"]
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
    for key in (schema.DATASET, schema.DATASET_FINGERPRINT, schema.SPLIT, schema.BACKBONE):
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
            raise Incompatible(f"{names[0]} and {name} are scored on different pools ({'; '.join(diffs)}): their "
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
        raise BadOption("eval needs at least one --run")
    if not ks or ks[0] < 1:
        raise BadOption(f"--k values must be positive integers, got {ks}")
    known = registry.sections()
    unknown = set(options.sections) - set(known)
    if unknown:
        raise BadOption(f"unknown sections {', '.join(sorted(unknown))} (choose from {', '.join(known)})")
    asked = registry.asked(options.sections)
    need_train = options.closed_form or any(m.needs.train for m in asked)
    need_valid = options.closed_form or any(m.needs.valid for m in asked)
    runs = [open_run(r) for r in run_refs]
    names = _unique_names([r.checkpoint or r.run_dir for r in runs])
    out_dir = Path(out_dir) if out_dir else default_out_dir(runs, names, split, options.data)
    check_out_dir(out_dir, options.overwrite)
    if options.data is not None:
        banked = any(getattr(r, "querybank", None) is not None and r.querybank.active for r in runs)
        dataset, wanted = eval_splits(options.data, split, need_train, need_valid, logger(options), for_bank=banked)
        runs = open_runs(runs, dataset, wanted, options.features_root, progress=options.progress)
    memory = _plan_memory(runs, split, need_train, need_valid, options)
    pools: dict[Path, EvalPool] = {}
    for run in runs:
        fd = Path(run.features_dir)
        if fd not in pools:
            pools[fd] = load_pool(fd, split, need_train, need_valid, captions=options.closed_form)
            if pools[fd].test.n_captions == 0:
                raise Incompatible(f"{fd / schema.split_file(split)}: no captions (an image-only collection): evaluation needs "
                                   "captions; search it by text or image with `cli.py search` or `cli.py serve` instead")
        _check_trained_on(run, pools[fd])
    _check_comparable(runs, names, pools, options.cross)
    ks, notes = _cap_ks(ks, pools)
    columns = _columns(runs, names, pools, options)
    return EvalPlan(split, ks, out_dir, runs, names, pools, columns, notes, memory)


def _plan_memory(runs: list[AdaptedRun], split: str, need_train: bool, need_valid: bool,
                 options: EvalOptions) -> EvalMemoryPlan:
    """The evaluation's memory, from the cache headers of every pool it loads (see `evaluate.memory`)."""
    by_dir: dict[Path, list[AdaptedRun]] = {}
    for run in runs:
        by_dir.setdefault(Path(run.features_dir), []).append(run)
    pools = []
    for fd, on in by_dir.items():
        files = on[0].split_files()  # a features folder that moved is named with how to re-point the run
        if split not in files:
            raise NotFound(f"{fd}: no {schema.split_file(split)} (found: {', '.join(files)})")
        train = files.get("train") if need_train and split != "train" else None
        valid = files.get("valid") if need_valid and split != "valid" else None
        refit = any(run_dir is not None and (Path(run_dir) / SELECTION).exists()
                    for run_dir in (getattr(r, "run_dir", None) for r in on))
        pools.append(PoolFiles(files[split], train, valid, [int(getattr(r, "dim", 0) or 0) for r in on], refit))
    concepts = any(m.section != "retrieval" for m in registry.asked(options.sections))
    return plan_eval_memory(options.max_memory_gb, pools, options.closed_form, options.examples > 0, options.memory_mb,
                            concepts)


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
