"""The adapter run: cached features in, a run folder out.

`train(config)` loads the cached train and valid splits, builds a `TrainState` (`new_state`) and
advances it with `adapt.state.fit` over batches of cached features; the `on_epoch` hook writes
metrics.jsonl, best.safetensors and last.safetensors as it goes. `--resume` restores the state from
last.safetensors and reproduces an uninterrupted run bit for bit (every epoch reseeds from
(seed, epoch); the learning rate is a pure function of the step). The closed-form cca head is
fitted instead of trained (`adapt.closed_form`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.closed_form import fit_cca_on_valid
from medembed.adapt.config import AdaptConfig
from medembed.adapt.data import (
    ConceptTexts,
    MemorySource,
    StreamSource,
    caption_neighbours,
    iter_batches,
    read_concepts,
)
from medembed.adapt.heads import build_heads, fit_input_stats
from medembed.adapt.losses import build_loss
from medembed.adapt.memory import AdaptMemoryPlan, plan_memory
from medembed.adapt.pretrain import pretrain_image_head
from medembed.adapt.run import QUERYBANK, portable_features
from medembed.adapt.run_files import SELECTION
from medembed.adapt.run_querybank import calibrate
from medembed.adapt.state import FitOptions, Schedule, TrainState, fit, weight_averages
from medembed.adapt.supervision import ConceptSupervision
from medembed.adapt.valid_heads import BEST_HEADS, SELECTION_HEADS, valid_fields
from medembed.cache import schema
from medembed.cache.faults import reached
from medembed.cache.provenance import RUN_RECORD_KEYS
from medembed.cache.reader import CachedSplit, find_splits, load_split, read_attrs
from medembed.cache.shards import concat_splits
from medembed.common.device import resolve_device
from medembed.common.errors import AlreadyExists, BadOption, BadRun, Incompatible, NotFound
from medembed.common.files import read_json, read_jsonl
from medembed.common.memory import format_bytes, peak_rss_bytes
from medembed.common.ranking import recall_summary
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, MEAN_RECALL, recall_key
from medembed.common.tensors import embed_in_chunks

# options that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"epochs", "patience", "device", "threads", "eval_every", "max_memory_gb", "chunk_rows", "querybank",
                     "keep_last"}


def training_threads(config: AdaptConfig, image_dim: int, text_dim: int, device: torch.device) -> int:
    """CPU threads for the loop: torch's default (every core) unless a step is tiny. On 2 cores,
    roco-rad's cached features (2,176 wide) train 1.7x faster on both threads with the default heads
    and still 1.1x faster at 9M multiply-adds a step, the smallest measured (`benchmarks/adapt_threads.py`,
    BENCHMARKS.md); below 1M (test-sized synthetic caches) one thread is kept."""
    if config.threads:
        return config.threads
    step_macs = config.batch_size * (image_dim + text_dim) * config.dim * config.ensemble
    return 1 if device.type != "cpu" or step_macs < 1e6 else torch.get_num_threads()


def evaluate_split(image_head: nn.Module, text_head: nn.Module, split: CachedSplit, device: torch.device) -> dict:
    """Valid recall of two heads (in eval mode for the call) on a cached split."""
    modes = image_head.training, text_head.training
    image_head.eval(), text_head.eval()
    try:
        img = embed_in_chunks(image_head, split.image_features, device=device)
        txt = embed_in_chunks(text_head, split.caption_features, device=device)
    finally:
        image_head.train(modes[0]), text_head.train(modes[1])
    return recall_summary(img, txt, split.caption_image)


def param_groups(heads: list[nn.Module], losses: nn.Module, weight_decay: float, lr: float,
                 free_modules: tuple[nn.Module, ...] = ()) -> list[dict]:
    """Weight matrices decay; biases, LayerNorm gains, the learned temperature and the concept
    supervision's scale and biases (`free_modules`) stay free."""
    decay, free = [], []
    for h in heads:
        for p in h.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else free).append(p)
    free += [p for m in (losses, *free_modules) for p in m.parameters() if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": free, "weight_decay": 0.0, "lr": lr}]


@dataclass
class TrainingData:
    """What an adapter run reads: a batch source over train, the valid split, concept texts, provenance."""

    source: MemorySource | StreamSource
    train: CachedSplit | None  # None when the train split is streamed from disk
    valid: CachedSplit
    concepts: ConceptTexts | None
    attrs: dict
    plan: AdaptMemoryPlan | None = None  # None for splits handed in already in memory

    @property
    def chunk_rows(self) -> int:
        """Rows per pass over train (statistics, streamed blocks): what the memory plan allows."""
        return self.plan.chunk_rows if self.plan is not None else 65536


def load_training_data(config: AdaptConfig) -> TrainingData:
    files = find_splits(config.features_dir)
    if files and all(int(read_attrs(p).get(schema.N_CAPTIONS, 1)) == 0 for p in files.values()):
        raise Incompatible(f"{config.features_dir}: no captions (an image-only collection): training needs images "
                           "paired with captions; search this collection with a run trained elsewhere instead")
    for need in ("train", "valid"):
        if need not in files:
            raise NotFound(f"{config.features_dir}: no {schema.split_file(need)} (training needs train and a valid split "
                           f"for early stopping; found {', '.join(files)})")
    train_path = files["train"]
    plan = plan_memory(config, train_path, files["valid"])  # refuses, in one line, a budget nothing fits
    valid = load_split(files["valid"], with_views=False)
    if plan.stream:
        source = StreamSource(train_path, chunk_rows=plan.chunk_rows, with_views=config.use_views)
        concepts = concept_texts(config, *read_concepts(train_path))
        return TrainingData(source, None, valid, concepts, read_attrs(train_path), plan)
    return data_in_memory(config, load_split(train_path, with_views=config.use_views), valid, plan)


def data_in_memory(config: AdaptConfig, train: CachedSplit, valid: CachedSplit,
                   plan: AdaptMemoryPlan | None = None) -> TrainingData:
    concepts = concept_texts(config, train.concepts, train.concept_names, train.concept_text_features)
    return TrainingData(MemorySource(train), train, valid, concepts, dict(train.attrs), plan)


def concept_texts(config: AdaptConfig, concepts, names: list[str], text_features) -> ConceptTexts | None:
    """The (image, concept) pairs to train on: always with augment "concepts" (a cache without named
    concepts is refused), with "auto" when the cache has them and batches are not hard-negative ones."""
    if config.augment == "none" or config.head == "cca" or (config.augment == "auto" and config.hard_negatives):
        return None
    try:
        return ConceptTexts(concepts, names, text_features)
    except ValueError:
        if config.augment == "concepts":
            raise
        return None


def run_config_for(config: AdaptConfig, data: TrainingData) -> dict:
    """config.json: the settings, the feature widths and the provenance of the cache trained on."""
    return portable_features({
        **config.to_dict(), "image_dim": data.source.image_dim, "text_dim": data.source.text_dim,
        "concept_text_pairs": data.concepts.n_pairs if data.concepts is not None else 0,
        "backbone": data.attrs.get(schema.BACKBONE, ""),
        "cache": {k: data.attrs[k] for k in RUN_RECORD_KEYS if k in data.attrs}}, config.out)


def pairs_per_epoch(config: AdaptConfig, data: TrainingData) -> int:
    extra = 0
    if data.concepts is not None:
        extra = min(data.concepts.n_pairs, round(config.concept_ratio * data.source.n_captions))
    return data.source.n_captions + extra


def new_state(config: AdaptConfig, run_config: dict, data: TrainingData, device: torch.device) -> TrainState:
    """Fresh heads (input standardisation fitted on train), losses, AdamW, schedule and weight average."""
    image_head, text_head = build_heads(run_config)
    fit_input_stats(image_head, data.source.image_chunks(data.chunk_rows))
    fit_input_stats(text_head, data.source.caption_chunks(data.chunk_rows))
    losses = nn.ModuleList(build_loss(config.loss, temperature=config.temperature, margin=config.margin,
                                      learn_temperature=config.learn_temperature) for _ in range(config.ensemble))
    image_head, text_head, losses = image_head.to(device), text_head.to(device), losses.to(device)
    pretraining = None
    if config.concept_pretrain > 0:
        if data.train is None:
            raise Incompatible(f"{config.features_dir}: --concept-pretrain needs the training split held in memory, and "
                               f"it is streamed within --max-memory-gb {config.max_memory_gb:g}; drop it or raise the budget")
        pretraining = pretrain_image_head(
            image_head, data.train, config.concept_pretrain, lr=config.lr, weight_decay=config.weight_decay,
            batch_size=config.batch_size, min_positives=config.concept_min_train, seed=config.seed, device=device,
            use_views=config.use_views).to_dict()
    supervision = concept_supervision(config, data)
    extra = (supervision.to(device),) if supervision is not None else ()
    optimizer = torch.optim.AdamW(param_groups([image_head, text_head], losses, config.weight_decay, config.lr, extra))
    steps = max(1, math.ceil(pairs_per_epoch(config, data) / config.batch_size))
    schedule = Schedule([config.lr] * len(optimizer.param_groups), max(1, round(config.warmup_epochs * steps)),
                        config.epochs * steps)
    return TrainState(image_head, text_head, losses, optimizer, schedule, device,
                      ema=weight_averages(image_head, text_head, config.ema), seed=config.seed, supervision=supervision,
                      pretraining=pretraining)


def concept_supervision(config: AdaptConfig, data: TrainingData) -> ConceptSupervision | None:
    """The concept levers (`--concept-loss`, `--graded`) on the training split's labels, or None."""
    if config.concept_loss <= 0 and config.graded <= 0:
        return None
    train = data.train
    if train is None or train.concepts is None or train.concepts.shape[1] == 0:
        raise Incompatible(f"{config.features_dir}: --concept-loss and --graded need concept labels in the training "
                           "split held in memory")
    return ConceptSupervision(train.concepts, train.concept_names, train.concept_text_features, config.concept_loss,
                              config.graded, config.concept_min_train)


def cached_batches(config: AdaptConfig, data: TrainingData):
    """One epoch of shuffled batches of cached features (and concept texts with --augment concepts)."""
    use_views = config.use_views and data.source.has_views
    neighbours: dict[tuple[int, int], torch.Tensor] = {}  # per block, found once (a block's rows never change)

    def block_neighbours(block) -> torch.Tensor | None:
        if config.hard_negatives <= 0:
            return None
        key = (int(block.image_rows[0]), int(block.caption_features.shape[0]))
        if key not in neighbours:
            neighbours[key] = caption_neighbours(block, config.hard_pool)
        return neighbours[key]

    def epoch(gen: torch.Generator):
        for block in data.source.blocks(gen):
            yield from iter_batches(block, config.batch_size, gen, concepts=data.concepts,
                                    concept_ratio=config.concept_ratio if data.concepts else 0.0, use_views=use_views,
                                    neighbours=block_neighbours(block), hard_negatives=config.hard_negatives)

    return epoch


def validator(valid: CachedSplit, device: torch.device):
    return lambda state: evaluate_split(*state.chosen_heads, valid, device)


class RunFiles:
    """The `on_epoch` hook of an adapter run: metrics.jsonl, best.safetensors, last.safetensors."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def start(self, resume_rows: list[dict] | None) -> None:
        rows = resume_rows or []
        (self.run_dir / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def __call__(self, state: TrainState, row: dict) -> None:
        with open(self.run_dir / ckpt.METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if state.best_epoch == state.epoch and state.best_heads is not None:
            ckpt.save_heads(self.run_dir / ckpt.BEST, *state.chosen_heads)
        ckpt.save_training_state(self.run_dir / ckpt.LAST, state)
        reached(f"adapt-epoch:{state.epoch}")


def read_metrics(run_dir: Path, upto: int | None = None) -> list[dict]:
    path = run_dir / ckpt.METRICS
    if not path.exists():
        return []
    rows = read_jsonl(path)
    return [r for r in rows if upto is None or r.get("epoch", 0) <= upto]


def resume_state(state: TrainState, run_dir: Path) -> list[dict]:
    """Continue from last.safetensors (and the best heads so far from best.safetensors); returns the
    metrics rows of the finished epochs (lines of an epoch killed before its checkpoint are dropped)."""
    ckpt.load_training_state(run_dir / ckpt.LAST, state)
    if (run_dir / ckpt.BEST).exists():
        tensors, _ = ckpt.read_verified(run_dir / ckpt.BEST)
        state.best_heads = tuple({k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")}
                                 for p in ("image_head", "text_head"))
    return read_metrics(run_dir, upto=state.epoch)


def summarize(run_dir: Path, run_config: dict, state: TrainState, n_pairs: int, extra: dict | None = None) -> dict:
    """The summary the CLI prints and summary.json keeps: best epoch, its valid recall, timings."""
    best = next((r for r in state.history if r.get("epoch") == state.best_epoch), {})
    keys = [k for k in best if k.startswith(tuple(f"{d}_" for d in DIRECTIONS)) or k == MEAN_RECALL]
    return {
        "run_dir": str(run_dir), "loss": run_config["loss"], "head": run_config["head"], "dim": run_config["dim"],
        "augment": run_config["augment"], "ensemble": run_config["ensemble"],
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "stopped_early": state.stopped_early,
        "seconds": round(state.elapsed, 2), "seconds_to_best": round(best.get("elapsed", 0.0), 2),
        "n_train_pairs": n_pairs, "device": str(state.device), "valid": {k: best[k] for k in keys}, **(extra or {}),
    }


def _check_resume(saved: dict, config: AdaptConfig, run_dir: Path) -> None:
    now = config.to_dict()
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if diff:
        raise Incompatible(f"{run_dir / ckpt.CONFIG}: --resume must keep the run's settings; changed " + "; ".join(diff))


def prepare_run_dir(config: AdaptConfig, resume: bool) -> Path:
    run_dir = Path(config.out)
    has_run = (run_dir / ckpt.CONFIG).exists()
    if has_run and not resume:
        raise AlreadyExists(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if resume and has_run:
        _check_resume(read_json(run_dir / ckpt.CONFIG), config, run_dir)
        if (run_dir / ckpt.SUMMARY).exists() and not (run_dir / ckpt.LAST).exists():
            raise BadRun(f"{run_dir}: finished, and its {ckpt.LAST} was removed then; --resume continues a run "
                         "from that file only (train with --keep-last to extend a finished run later)")
    return run_dir


def train(config: AdaptConfig, *, resume: bool = False, stop_after_epoch: int | None = None, progress: bool = True,
          splits: tuple[CachedSplit, CachedSplit] | None = None) -> dict:
    """Train (or fit, for cca) one run into `config.out`; returns the summary the CLI prints.

    `stop_after_epoch` ends the call after that epoch as a kill would (state saved, run unfinished),
    so `resume=True` can continue it. `splits` = (train, valid) already in memory skips reading
    `config.features_dir` (benchmarks on synthetic data)."""
    if splits is None:
        config = replace(config, features_dir=str(Path(config.features_dir).resolve()))
    if config.head == "cca":
        if config.ensemble not in (1, AdaptConfig.ensemble):
            raise BadOption("--head cca is a single closed-form solution; ensemble must be 1")
        config = replace(config, ensemble=1)
    run_dir = prepare_run_dir(config, resume)
    device = resolve_device(config.device)
    data = data_in_memory(config, *splits) if splits is not None else load_training_data(config)
    refitting, why_not = refit_decision(config, data)
    if config.refit and not refitting:
        raise Incompatible(f"{config.features_dir}: --refit {why_not}")
    run_config = run_config_for(config, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.head == "cca":
        return _fit_cca(config, run_config, run_dir, data, splits, progress)
    if resume and (run_dir / SELECTION).exists():  # killed while refitting: the chosen heads come back first
        (run_dir / SELECTION).replace(run_dir / ckpt.BEST)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(config, data.source.image_dim, data.source.text_dim, device))
    try:
        with torch.random.fork_rng(devices=[]):
            state = new_state(config, run_config, data, device)
            files = RunFiles(run_dir)
            resumed = resume and (run_dir / ckpt.LAST).exists()
            files.start(resume_state(state, run_dir) if resumed else None)
            ckpt.write_json(run_dir / ckpt.CONFIG, run_config)
            fit(state, cached_batches(config, data), config.epochs, validate=validator(data.valid, device),
                on_epoch=files, options=FitOptions(patience=config.patience, eval_every=config.eval_every,
                                                   progress=progress, stop_after_epoch=stop_after_epoch))
    finally:
        torch.set_num_threads(threads_before)
    state.history = read_metrics(run_dir)
    summary = summarize(run_dir, run_config, state, pairs_per_epoch(config, data), memory_record(data.plan))
    if state.pretraining is not None:
        summary["concept_pretrain"] = state.pretraining
    refit = None
    if not refitting and config.refit is None and why_not:
        summary["refit_skipped"] = why_not
    if refitting:
        def refit() -> dict:
            return refit_heads(config, run_config, run_dir, data, state.best_epoch, device, progress,
                               splits[1] if splits is not None else None)
    # valid as loaded, and train in memory or (streamed) its file, of which the query bank reads its sample
    return finish_run(run_dir, summary, config, (data.train if data.train is not None else data.source.path, data.valid),
                      refit)


def refit_decision(config: AdaptConfig, data: TrainingData) -> tuple[bool, str]:
    """(refit?, why not, in words, when the config asks for it or leaves it to the data). With
    `refit` None the run refits when it can: train held in memory with room for train + valid beside
    it (the memory plan), and one concept vocabulary in both splits."""
    if config.refit is False:
        return False, ""
    if data.train is None or (data.plan is not None and not data.plan.refit):
        return False, (f"trains on train + valid held in memory, which does not fit --max-memory-gb "
                       f"{config.max_memory_gb:g}; pass --no-refit or raise it")
    if data.train.concept_ids != data.valid.concept_ids:
        return False, "joins train and valid, whose concept vocabularies differ; pass --no-refit"
    return True, ""


def refit_heads(config: AdaptConfig, run_config: dict, run_dir: Path, data: TrainingData, epochs: int,
                device: torch.device, progress: bool, valid: CachedSplit | None = None) -> dict:
    """Fresh heads trained on train + valid for the `epochs` valid chose, with the same recipe and
    schedule, in place of the chosen heads (kept as selection.safetensors). Valid has chosen
    everything by then (epoch, query bank), so it is spent: the run's valid numbers stay the choice's,
    and test measures what the extra pairs bring. `valid` with its views (else read from the cache)."""
    if valid is None:
        valid = load_split(find_splits(config.features_dir)["valid"], with_views=config.use_views)
    train = data.train
    if (train.view_features is None) != (valid.view_features is None):
        train, valid = replace(train, view_features=None), replace(valid, view_features=None)
    both = data_in_memory(config, concat_splits([train, valid]), data.valid, data.plan)
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(config, both.source.image_dim, both.source.text_dim, device))
    try:
        with torch.random.fork_rng(devices=[]):
            state = new_state(config, run_config, both, device)
            fit(state, cached_batches(config, both), epochs,
                options=FitOptions(progress=progress, label="refit on train + valid"))
    finally:
        torch.set_num_threads(threads_before)
    (run_dir / ckpt.BEST).replace(run_dir / SELECTION)
    ckpt.save_heads(run_dir / ckpt.BEST, *state.chosen_heads)
    return {"epochs": state.epoch, "pairs_per_epoch": pairs_per_epoch(config, both), "images": both.source.n_images,
            "seconds": round(time.perf_counter() - t0, 1)}


def memory_record(plan: AdaptMemoryPlan | None) -> dict:
    """summary.json's account of memory: the plan (`finish_run` adds the measured peak, once the query
    bank's choice, the run's last step, is done)."""
    if plan is None:
        return {}
    return {"memory": {"plan": plan.describe(), "planned_bytes": plan.total, "budget_bytes": plan.budget,
                       "streamed": plan.stream, "chunk_rows": plan.chunk_rows}}


def finish_run(run_dir: Path, summary: dict, config: AdaptConfig,
               splits: tuple[CachedSplit | Path, CachedSplit] | None = None, refit=None) -> dict:
    """Choose the query bank on valid (unless turned off), refit the heads on train + valid when asked
    (`refit`, after every choice valid makes), then write summary.json: the file that marks a run
    finished comes last."""
    # the valid numbers (and the bank's) are the chosen heads', measured before any refit: once refit, those
    # heads are selection.safetensors, and they never trained on valid
    summary.update(valid_fields(SELECTION_HEADS if refit is not None else BEST_HEADS))
    if config.querybank:
        summary["querybank"] = calibrate(run_dir, splits=splits)
    else:
        (run_dir / QUERYBANK).unlink(missing_ok=True)
    if refit is not None:
        summary["refit"] = refit()
    summary["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    if "memory" in summary:
        summary["memory"]["peak_rss_bytes"] = peak_rss_bytes()
    ckpt.write_json(run_dir / ckpt.SUMMARY, summary)
    if not config.keep_last:  # only --resume reads it, and a finished run has nothing left to resume
        (run_dir / ckpt.LAST).unlink(missing_ok=True)
    return summary


def _fit_cca(config: AdaptConfig, run_config: dict, run_dir: Path, data: TrainingData,
             splits: tuple[CachedSplit, CachedSplit] | None = None, progress: bool = False) -> dict:
    """Closed form: ridge and correlation weighting picked on valid, like early stopping picks an epoch.
    Runs on the CPU: a few eigendecompositions of feature-sized matrices, no loop to accelerate."""
    t0 = time.perf_counter()
    fit_ = fit_cca_on_valid(data.train, data.valid, config.dim, progress=progress)
    rows = [{"epoch": i + 1, **r} for i, r in enumerate(fit_.grid)]
    (run_dir / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt.save_heads(run_dir / ckpt.BEST, fit_.image_head, fit_.text_head)
    run_config["closed_form"] = {"reg": fit_.reg, "power": fit_.power}
    ckpt.write_json(run_dir / ckpt.CONFIG, run_config)
    best = next(r["epoch"] for r in rows if (r["reg"], r["power"]) == (fit_.reg, fit_.power))
    state = TrainState(fit_.image_head, fit_.text_head, nn.ModuleList(), None, None, torch.device("cpu"),
                       epoch=len(rows), best_epoch=best, elapsed=time.perf_counter() - t0, history=rows)
    summary = summarize(run_dir, run_config, state, data.train.n_captions,
                        {"closed_form": run_config["closed_form"], **memory_record(data.plan)})
    return finish_run(run_dir, summary, config, (data.train, data.valid))


def format_summary(summary: dict) -> str:
    """The closing table: best epoch, valid R@1/5/10 both ways, seconds."""
    v = summary["valid"]
    cols = ["head", "loss", "best epoch", *(f"{d} R@{k}" for d in DIRECTIONS for k in DEFAULT_KS), "seconds"]
    best = summary["best_epoch"]
    if "closed_form" in summary:
        best = "closed form ({})".format(", ".join(f"{k} {x}" for k, x in summary["closed_form"].items()))
    vals = [summary["head"], summary["loss"] if summary["head"] != "cca" else "-",
            best if "closed_form" in summary else f"{best} / {summary['epochs_run']}"]
    vals += [f"{v[recall_key(d, k)]:.1f}" for d in DIRECTIONS for k in DEFAULT_KS]
    vals.append(f"{summary['seconds']:.1f}")
    widths = [max(len(c), len(str(x))) for c, x in zip(cols, vals)]
    line = lambda xs: "| " + " | ".join(str(x).ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    if "closed_form" in summary:
        note = f"closed form chosen on valid from {summary['epochs_run']} settings"
    else:
        note = "stopped early" if summary.get("stopped_early") else "ran all epochs"
    lines = [line(cols), rule, line(vals), f"valid recall in %; {note}; run saved in {summary['run_dir']}"]
    if summary.get("memory", {}).get("streamed"):
        mem = summary["memory"]
        lines.append(f"memory: {mem['plan']}; measured peak {format_bytes(mem['peak_rss_bytes'])}")
    bank = summary.get("querybank")
    if bank:
        lines.append(f"ranking: {bank['description']}, chosen on valid (mean recall "
                     f"{bank['valid_plain'][MEAN_RECALL]:.1f} with plain cosine -> {bank['valid'][MEAN_RECALL]:.1f})")
    refit = summary.get("refit")
    if refit:
        lines.append(f"refit: the heads kept were trained on train + valid ({refit['images']:,} images) for the "
                     f"{refit['epochs']} epochs valid chose, in {refit['seconds']:.0f} s; the valid numbers above are "
                     f"the choice's ({SELECTION})")
    if summary.get("refit_skipped"):
        lines.append(f"no refit: it {summary['refit_skipped']}")
    return "\n".join(lines)
