"""Training tower blocks together with the heads: LiT mode and periodic unfreezing.

Heads on frozen features can only re-mix what the backbone already computes. Unlocking the top
blocks lets the features themselves move toward the domain. Two schedules, both advancing the same
in-memory `TrainState` with `adapt.state.fit`:

- continuous (`every == 0`): the unlocked blocks train with the heads in every epoch, from cached
  mid-layer activations. With only the text tower unlocked this is LiT ("locked image tuning"):
  image features come from the HDF5 cache and are never recomputed; the text tower's frozen lower
  layers run once; an epoch costs the unlocked text layers and the heads.
- periodic (`every == K`): adapter epochs on the cache, then a short cycle of the unlocked blocks
  and the heads (raw images and captions, or cached mid-layer activations), then a refreshed
  cache, then adapter epochs again. A cycle after which the best validation recall is lower than
  before it is rolled back (towers, heads and cache as they were) and unfreezing stops.

Either way the tuned towers get a new identity (`BASE+ft-<hash>`), every split of the cache is
re-encoded under it into a new folder (the old cache stays; with the image tower locked only the
caption and concept-prompt features are recomputed), and the towers plus the heads are saved as
one `finetuned.safetensors` in the run folder, beside the usual config.json / best.safetensors.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import portable_features
from medembed.adapt.state import FitOptions, Schedule, TrainState, fit, snapshot, weight_averages
from medembed.adapt.trainer import (
    TrainingData,
    cached_batches,
    finish_run,
    load_training_data,
    new_state,
    param_groups,
    prepare_run_dir,
    run_config_for,
    summarize,
    validator,
)
from medembed.adapt.tuning import sources
from medembed.adapt.tuning.config import TuneConfig as TuneConfig  # re-exported
from medembed.adapt.tuning.finetuned import CHECKPOINT, FT_MARK, mark_finetuned, save_finetuned
from medembed.adapt.tuning.towers import (
    MidActivations,
    MidCacheUnsupported,
    UnlockSpec,
    build_mid_cache,
    lock_backbone,
    release,
    top_for,
)
from medembed.cache import schema
from medembed.cache.reader import (
    CachedSplit,
    find_splits,
    load_split,
    open_cache,
    read_attrs,
    recorded_data_root,
    string_chunks,
)
from medembed.cache.schema import PRIVATE_LOCATION
from medembed.cache.writer import write_split
from medembed.common.device import resolve_device
from medembed.common.errors import BadOption, Incompatible, NotFound, ToolError
from medembed.common.ranking import recall_summary
from medembed.common.tensors import embed_in_chunks
from medembed.extract.access import FOLLOW_LINKS
from medembed.extract.backbones import FAMILIES, Backbone, create_backbone, family_of
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import ExtractConfig, cache_dir, extract


def _autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler); none on the CPU."""
    if device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


# ------------------------------------------------------------------------------------------ the cache
def _base_backbone(features_dir: str | Path, device: torch.device) -> Backbone:
    attrs = read_attrs(find_splits(features_dir)["train"])
    name = str(attrs.get(schema.BACKBONE, ""))
    if FT_MARK in name:
        raise Incompatible(f"{features_dir}: features of the fine-tuned backbone {name}; tune from its base cache or "
                           "continue from the run that made it")
    backbone = create_backbone(name, device=device)
    if attrs.get(schema.WEIGHTS_SHA256) != backbone.provenance.get(schema.WEIGHTS_SHA256):
        raise Incompatible(f"{features_dir}: cache weights_sha256 {str(attrs.get(schema.WEIGHTS_SHA256))[:12]}... was not made "
                           f"by backbone {name} ({backbone.provenance.get(schema.WEIGHTS_SHA256, '')[:12]}...); tuning from "
                           "it would start from other features than the heads are trained on")
    return backbone


def _data_root(features_dir: str | Path, tune: TuneConfig) -> Path:
    train = find_splits(features_dir)["train"]
    root = Path(tune.data or recorded_data_root(read_attrs(train), train))
    if not root.is_dir():
        raise NotFound(f"{features_dir}: dataset folder {str(root)!r} (data_root) not found; pass the "
                       "dataset folder (TuneConfig.data)")
    return root


def refresh_cache(backbone: Backbone, features_dir: str | Path, tune: TuneConfig, device: torch.device,
                  text_only: bool = False, progress: bool = False) -> Path:
    """Every split of `features_dir` re-encoded with the tuned backbone into a new folder, named
    after its identity (`{root}/{dataset}/{BASE+ft-hash}/`); the old cache is left as it was.

    `text_only` (the image tower was locked): image features are copied, caption and concept-prompt
    features recomputed; otherwise the whole extraction runs again with the same settings."""
    files = find_splits(features_dir)
    attrs = read_attrs(next(iter(files.values())))
    root = Path(tune.features_root) if tune.features_root else Path(features_dir).resolve().parents[1]
    out = cache_dir(root, str(attrs.get(schema.DATASET, "")), backbone.name)
    if out.resolve() == Path(features_dir).resolve():
        raise ToolError(f"{out}: the refreshed cache would overwrite the cache it replaces (backbone name unchanged)")
    if text_only:
        for name, path in files.items():
            _refresh_texts(backbone, load_split(path, dtype=None), out / schema.split_file(name))
        return out
    data = _data_root(features_dir, tune)
    # read as the cache was: links followed or not, records named by keyed hashes or by their paths
    dataset = load_dataset(data, name=attrs.get(schema.DATASET), follow_links=attrs.get(schema.DATA_ACCESS) == FOLLOW_LINKS,
                           readable_paths=_kept_readable_paths(files, attrs))
    templates = tuple(str(attrs[schema.TEMPLATES]).split("\n")) if attrs.get(schema.TEMPLATES) else ExtractConfig.templates
    cfg = ExtractConfig(data=str(data), backbone=backbone.name, splits=list(files), batch_size=tune.extract_batch_size,
                        workers=tune.workers, device=device.type, out=str(root), dtype=str(attrs.get(schema.DTYPE, "float16")),
                        views=int(attrs.get(schema.VIEWS, 0)), templates=templates, progress=progress,
                        allow_split_overlap=True)  # the same records as the cache it refreshes, overlap already allowed
    return Path(extract(cfg, backbone=backbone, dataset=dataset).out_dir)


def _kept_readable_paths(files: dict[str, Path], attrs: dict) -> bool:
    """Whether a cache kept its images' readable paths, so that its refresh may keep them too: not
    when its records are keyed (`image_ids`), nor when any location it stored is private -- caches made
    before ids were keyed stored a plain `private:ID` for image-only folders and MIMIC-CXR, with no
    `image_ids` to say so."""
    if attrs.get(schema.IMAGE_ID_SCHEME):
        return False
    for path in files.values():
        with open_cache(path) as f:
            if schema.IMAGE_LOCATIONS not in f:
                continue
        for chunk in string_chunks(path, schema.IMAGE_LOCATIONS):
            if any(location.startswith(PRIVATE_LOCATION) for location in chunk):
                return False
    return True


@torch.no_grad()
def _refresh_texts(backbone: Backbone, split: CachedSplit, path: Path) -> None:
    """One split with its caption and concept-prompt features re-encoded by the tuned text tower."""
    dtype = split.caption_features.dtype
    captions = backbone.encode_texts(split.captions).to(dtype)
    prompts = split.concept_text_features
    if prompts is not None and split.templates:
        named = [i for i, n in enumerate(split.concept_names) if n]
        texts = [t.format(name=split.concept_names[i]) for i in named for t in split.templates]
        prompts = prompts.clone()
        if named:
            prompts[named] = backbone.encode_texts(texts).to(dtype).reshape(len(named), len(split.templates), -1)
    attrs = {**split.attrs, **{k: str(v) for k, v in backbone.provenance.items()}, schema.BACKBONE: backbone.name,
             schema.CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
             schema.REFRESHED: "caption and concept-prompt features"}
    refreshed = replace(split, caption_features=captions, concept_text_features=prompts, attrs=attrs)
    write_split(path, refreshed, dtype=str(split.attrs.get(schema.DTYPE, "float16")))


# ---------------------------------------------------------------------------------- tuned features
@dataclass
class TunedInputs:
    """What the unlocked blocks train from: a pair list, cached mid-layer activations (or None on
    the raw path) and the top that runs them."""

    pairs: sources.Pairs
    top: object | None
    mid: MidActivations | None
    image_row_of: torch.Tensor | None  # image row -> row of mid.images


def _image_pixel_batches(split: CachedSplit, rows: torch.Tensor, root: Path, backbone: Backbone, batch: int = 32):
    dataset = sources.RawImages(root, split, backbone.preprocess)
    first_caption = {}
    for c, r in enumerate(split.caption_image.tolist()):
        first_caption.setdefault(r, c)
    for s in range(0, rows.numel(), batch):
        yield torch.stack([dataset[first_caption[int(r)]][0] for r in rows[s : s + batch]])


def tuned_inputs(split: CachedSplit, backbone: Backbone, spec: UnlockSpec, tune: TuneConfig, root: Path | None,
                 device: torch.device, cached: bool, max_pairs: int = 0) -> TunedInputs:
    """The pairs of `split` and, on the cached path, the activations entering the unlocked blocks."""
    pairs = sources.Pairs.of(split, max_pairs, tune.seed)
    if not cached:
        return TunedInputs(pairs, None, None, None)
    text_cached = spec.text != "all"
    top = top_for(backbone, image=spec.image != 0) if spec.image != 0 or text_cached else None
    images, image_row_of = None, None
    if spec.image != 0:
        needed = torch.unique(split.caption_image[pairs.subset])
        image_row_of = torch.full((split.n_images,), -1, dtype=torch.long)
        image_row_of[needed] = torch.arange(needed.numel())
        images = _image_pixel_batches(split, needed, root, backbone)
    captions = [split.captions[i] for i in pairs.subset.tolist()] if text_cached else None
    mid = build_mid_cache(top, images, captions, backbone.tokenize, device)
    return TunedInputs(pairs, top, mid, image_row_of)


def tuned_validator(inputs: TunedInputs, valid: CachedSplit, spec: UnlockSpec, backbone: Backbone,
                    device: torch.device):
    """Valid recall with the texts (and images) run through the current unlocked blocks."""
    top, mid = inputs.top, inputs.mid

    @torch.no_grad()
    def validate(state: TrainState) -> dict:
        image_head, text_head = state.chosen_heads
        image_head.eval(), text_head.eval()
        if spec.image == 0:
            img = embed_in_chunks(image_head, valid.image_features, device=device)
        else:
            feats = torch.cat([top.image_top(x.to(device)) for x in mid.images.split(64)])
            img = embed_in_chunks(image_head, feats[inputs.image_row_of[torch.arange(valid.n_images)]], device=device)
        if mid.texts is not None:
            feats = torch.cat([top.text_top(x.to(device), a.to(device)) for x, a in
                               zip(mid.texts.split(128), mid.text_aux.split(128))])
        else:
            feats = backbone.encode_texts(valid.captions)
        txt = embed_in_chunks(text_head, feats, device=device)
        return recall_summary(img, txt, valid.caption_image)

    return validate


def _tower_group(state: TrainState, trainable: list[nn.Parameter], tune: TuneConfig) -> None:
    state.optimizer.add_param_group({"params": trainable, "lr": tune.backbone_lr, "weight_decay": tune.weight_decay})
    state.schedule.base_lrs.append(tune.backbone_lr)


# ------------------------------------------------------------------------------------- the run folder
def _write_run(run_dir: Path, run_config: dict, state: TrainState, backbone: Backbone | None, record: dict,
               n_pairs: int) -> dict:
    """config.json, best.safetensors, finetuned.safetensors (when the towers changed), summary.json."""
    image_head, text_head = state.chosen_heads
    ckpt.save_heads(run_dir / ckpt.BEST, image_head, text_head)
    if backbone is not None:
        save_finetuned(run_dir / CHECKPOINT, backbone, image_head, text_head, run_config)
    ckpt.write_json(run_dir / ckpt.CONFIG, run_config)
    summary = summarize(run_dir, run_config, state, n_pairs, {
        **record, "checkpoint": str(run_dir / CHECKPOINT) if backbone is not None else None,
        "features_dir": run_config["features_dir"]})
    return finish_run(run_dir, summary, AdaptConfig.from_dict(run_config))


def _metrics_hook(run_dir: Path, extra: dict | None = None):
    def on_epoch(state: TrainState, row: dict) -> None:
        with open(run_dir / ckpt.METRICS, "a") as f:
            f.write(json.dumps({**row, **(extra or {})}) + "\n")

    return on_epoch


def _run_config(config: AdaptConfig, data: TrainingData, tune: TuneConfig) -> dict:
    return {**run_config_for(config, data), "tune": asdict(tune)}


def _tuned_config(run_config: dict, backbone: Backbone, features_dir: Path) -> dict:
    attrs = read_attrs(find_splits(features_dir)["train"])
    cache = {k: attrs[k] for k in run_config["cache"] if k in attrs}
    return portable_features({**run_config, "features_dir": str(features_dir), "backbone": backbone.name, "cache": cache},
                             run_config["out"])


@dataclass
class Start:
    """What every tuned run starts from: the resolved config, its run folder, device, the cached
    data in memory and the base backbone that made the cache."""

    config: AdaptConfig
    run_dir: Path
    device: torch.device
    data: TrainingData
    backbone: Backbone


def _start(config: AdaptConfig) -> Start:
    device = resolve_device(config.device)
    config = replace(config, features_dir=str(Path(config.features_dir).resolve()))
    run_dir = prepare_run_dir(config, resume=False)
    data = load_training_data(config)
    if data.train is None:
        raise BadOption(f"{config.features_dir}: tuning towers needs the training split in memory; raise max_memory_gb")
    return Start(config, run_dir, device, data, _base_backbone(config.features_dir, device))


# ---------------------------------------------------------------------------------- continuous (LiT)
def train_tuned(config: AdaptConfig, tune: TuneConfig, progress: bool = True) -> dict:
    """The unlocked blocks train with the heads in every epoch, from cached mid-layer activations."""
    s = _start(config)
    config, run_dir, device, data, backbone, spec = s.config, s.run_dir, s.device, s.data, s.backbone, tune.spec
    if data.concepts is not None and config.augment == "concepts":
        raise BadOption("--augment concepts adds pairs to adapter epochs; with --unlock and no --unfreeze-every "
                        "every epoch trains the towers on captions only (use --augment auto or none)")
    data = replace(data, concepts=None)  # "auto": the tower epochs train on captions
    trainable = lock_backbone(backbone, spec)
    root = _data_root(config.features_dir, tune) if spec.image != 0 else None
    t0 = time.perf_counter()
    train_in = tuned_inputs(data.train, backbone, spec, tune, root, device, cached=True)
    valid_in = tuned_inputs(data.valid, backbone, spec, tune, root, device, cached=True)
    mid_seconds = time.perf_counter() - t0
    run_config = _run_config(config, data, tune)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ckpt.METRICS).write_text("")
    state = new_state(config, run_config, data, device)
    _tower_group(state, trainable, tune)
    state.tracked = (backbone.image_model, backbone.text_model)
    batches = sources.cached_batches(train_in.pairs, train_in.mid, config.batch_size, train_in.image_row_of,
                                     data.train.image_features if spec.image == 0 else None, backbone.tokenize)
    encoders = sources.cached_encoders(train_in.top, backbone, device, spec.image == 0, train_in.mid.texts is not None,
                                       tune.grad_checkpointing)
    autocast, scaler = _autocast(device)
    validate = tuned_validator(valid_in, data.valid, spec, backbone, device)
    fit(state, batches, config.epochs, encoders=encoders, validate=validate,
        on_epoch=_metrics_hook(run_dir), options=FitOptions(patience=config.patience, progress=progress,
                                                            autocast=autocast, scaler=scaler))
    state.restore_best()
    release(backbone)
    tuned = mark_finetuned(backbone, {"tuned": f"{spec} with the heads, {state.best_epoch} epochs"})
    t1 = time.perf_counter()
    new_dir = refresh_cache(tuned, config.features_dir, tune, device, text_only=spec.image == 0, progress=progress)
    record = {"mode": "lit" if spec.image == 0 else "continuous", "unlock": str(spec), "tuned_backbone": tuned.name,
              "mid_cache_seconds": round(mid_seconds, 2), "mid_cache_mb": round(train_in.mid.nbytes / 2**20, 1),
              "refresh_seconds": round(time.perf_counter() - t1, 2)}
    return _write_run(run_dir, _tuned_config(run_config, tuned, new_dir), state, tuned, record, train_in.pairs.subset.numel())


# --------------------------------------------------------------------------------------- periodic
@dataclass
class Kept:
    """What a cycle may have to give back: the towers, heads and cache from before it."""

    towers: tuple[dict, dict]
    heads: tuple[dict, dict]
    backbone: Backbone
    data: TrainingData
    features_dir: Path
    tuned: bool
    best: float


@dataclass
class Periodic:
    """A periodic-unfreezing run in progress."""

    config: AdaptConfig
    tune: TuneConfig
    device: torch.device
    backbone: Backbone
    data: TrainingData
    features_dir: Path
    state: TrainState
    run_dir: Path
    progress: bool
    tuned: bool = False  # the towers differ from the base backbone's
    stages: list[dict] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)
    inputs: TunedInputs | None = None
    root: Path | None = None  # the dataset folder raw images are read from


def _adapter_stage(run: Periodic, until: int) -> None:
    run.state.reset_best()
    fit(run.state, cached_batches(run.config, run.data), until, validate=validator(run.data.valid, run.device),
        on_epoch=_metrics_hook(run.run_dir, {"stage": len(run.stages)}),
        options=FitOptions(patience=run.config.patience, progress=run.progress))
    run.state.restore_best()
    run.stages.append({"stage": len(run.stages), "features_dir": str(run.features_dir), "epochs": run.state.epoch,
                       "best_epoch": run.state.best_epoch, "valid_mean_recall": run.state.best,
                       "backbone": run.backbone.name})


def _load_heads_into_training(state: TrainState) -> None:
    """The chosen (averaged) heads become the heads that train on: a cycle starts from what validated best."""
    if state.ema is not None:
        for head, chosen in zip((state.image_head, state.text_head), state.chosen_heads):
            head.load_state_dict(chosen.state_dict())


def _cycle(run: Periodic) -> None:
    """One unfreeze cycle: the unlocked blocks and the heads, then a refreshed cache."""
    tune, state, spec = run.tune, run.state, run.tune.spec
    _load_heads_into_training(state)
    trainable = lock_backbone(run.backbone, spec)
    if run.inputs is None:  # the trunk below the unlocked blocks never changes: its activations are cached once
        run.root = _data_root(run.config.features_dir, tune)
        run.inputs = tuned_inputs(run.data.train, run.backbone, spec, tune, run.root, run.device, tune.cached_trunk,
                                  tune.max_pairs)
    inputs = run.inputs
    heads = [p for m in (state.image_head, state.text_head, state.losses, state.supervision) if m is not None
             for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable, "lr": tune.backbone_lr},
                                   {"params": heads, "lr": tune.head_lr}], weight_decay=tune.weight_decay)
    steps = max(1, inputs.pairs.subset.numel() // tune.batch_size)
    cycle = TrainState(state.image_head, state.text_head, state.losses, optimizer,
                       Schedule([tune.backbone_lr, tune.head_lr], max(1, steps // 10), tune.epochs * steps),
                       run.device, seed=tune.seed + len(run.cycles))
    if inputs.mid is not None:
        batches = sources.cached_batches(inputs.pairs, inputs.mid, tune.batch_size, inputs.image_row_of,
                                         run.data.train.image_features if spec.image == 0 else None,
                                         run.backbone.tokenize)
        encoders = sources.cached_encoders(inputs.top, run.backbone, run.device, spec.image == 0,
                                           inputs.mid.texts is not None, tune.grad_checkpointing)
    else:
        batches = sources.raw_batches(inputs.pairs, run.root, run.backbone, tune.batch_size, tune.workers,
                                      tune.augment, pin=run.device.type == "cuda")
        encoders = sources.raw_encoders(run.backbone, run.device)
        if tune.grad_checkpointing:
            _library_grad_checkpointing(run.backbone)
    autocast, scaler = _autocast(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    t0 = time.perf_counter()
    fit(cycle, batches, tune.epochs, encoders=encoders, on_epoch=_metrics_hook(run.run_dir, {"cycle": len(run.cycles) + 1}),
        options=FitOptions(progress=run.progress, autocast=autocast, scaler=scaler, label="cycle epoch"))
    seconds = time.perf_counter() - t0
    release(run.backbone)
    run.backbone = mark_finetuned(run.backbone, {"finetune_cycle": str(len(run.cycles) + 1), "unlocked": str(spec)})
    t1, wall = time.perf_counter(), time.time()
    new_dir = refresh_cache(run.backbone, run.features_dir, tune, run.device, text_only=spec.image == 0,
                            progress=run.progress)
    run.data, run.features_dir = load_training_data(replace(run.config, features_dir=str(new_dir))), new_dir
    created = written_since(new_dir, wall)
    run.tuned = True
    _restart_adapter_optimizer(run)
    pairs_seen = cycle.step * tune.batch_size
    run.cycles.append({"cycle": len(run.cycles) + 1, "after_adapter_epochs": state.epoch, "path":
                       "cached" if inputs.mid is not None else "raw", "unlock": str(spec),
                       "trainable_backbone_params": sum(p.numel() for p in trainable), "seconds": round(seconds, 2),
                       "pairs_per_s": round(pairs_seen / seconds, 2) if seconds > 0 else 0.0,
                       "train_loss": cycle.history[-1]["train_loss"] if cycle.history else float("nan"),
                       "refresh_seconds": round(time.perf_counter() - t1, 2), "backbone": run.backbone.name,
                       "features_dir": str(new_dir), "cache_created": created, "peak_gpu_memory_gb": round(
                           torch.cuda.max_memory_allocated(run.device) / 2**30, 3) if run.device.type == "cuda" else 0.0})


def _library_grad_checkpointing(backbone: Backbone) -> None:
    """The family's own checkpointing over the whole towers; refused for a family without one."""
    family = family_of(backbone)
    if family is None or family.grad_checkpointing is None:
        able = " or ".join(f.name for f in FAMILIES if f.grad_checkpointing is not None)
        raise MidCacheUnsupported(f"{backbone.name}: gradient checkpointing on raw images needs an {able} backbone; "
                                  "use --cached-trunk (checkpointing then covers the unlocked blocks)")
    family.grad_checkpointing(backbone)


def _restart_adapter_optimizer(run: Periodic) -> None:
    """Fresh AdamW moments and weight average: the heads moved during the cycle, on other features."""
    state, config = run.state, run.config
    extra = (state.supervision,) if state.supervision is not None else ()
    fresh = torch.optim.AdamW(param_groups([state.image_head, state.text_head], state.losses, config.weight_decay,
                                           config.lr, extra))
    fresh.param_groups[0]["lr"] = fresh.param_groups[1]["lr"] = state.schedule.lr(state.step, config.lr)
    state.optimizer = fresh
    state.ema = weight_averages(state.image_head, state.text_head, config.ema)


def written_since(folder: str | Path, wall_clock: float) -> bool:
    """Whether every cache file of `folder` was written at or after `wall_clock` (time.time()), i.e. by
    this cycle rather than found in place: only then may a rollback delete the folder."""
    written = list(Path(folder).glob(schema.FILE_GLOB))
    return bool(written) and all(p.stat().st_mtime >= wall_clock - 1 for p in written)


def _keep(run: Periodic) -> Kept:
    return Kept(snapshot((run.backbone.image_model, run.backbone.text_model)), snapshot(run.state.chosen_heads),
                run.backbone, run.data, run.features_dir, run.tuned, run.state.best)


def _roll_back(run: Periodic, kept: Kept) -> None:
    """Towers, heads and cache exactly as before the cycle (the tower modules are shared by every
    name the backbone had, so loading the kept weights restores them bit for bit). The rolled-back
    cycle's re-extracted cache is deleted when the cycle wrote it: nothing will ever read it again."""
    dropped = Path(run.features_dir)
    if dropped.resolve() != Path(kept.features_dir).resolve() and run.cycles and run.cycles[-1].get("cache_created"):
        shutil.rmtree(dropped, ignore_errors=True)
        run.cycles[-1]["cache_deleted"] = True
    for module, weights in zip((run.backbone.image_model, run.backbone.text_model), kept.towers):
        module.load_state_dict(weights)
    run.backbone, run.data, run.features_dir, run.tuned = kept.backbone, kept.data, kept.features_dir, kept.tuned
    for head, weights in zip((run.state.image_head, run.state.text_head), kept.heads):
        head.load_state_dict(weights)
    _restart_adapter_optimizer(run)  # the weight average restarts from the restored heads
    run.state.best, run.state.best_heads = kept.best, kept.heads


def train_with_unfreezing(config: AdaptConfig, tune: TuneConfig, progress: bool = True) -> dict:
    """Adapters for K epochs, an unfreeze cycle, a refreshed cache, adapters again ... for
    config.epochs adapter epochs in all. Returns the summary with `stages`, `cycles` and, when a
    cycle was kept, `checkpoint` (finetuned.safetensors in the run folder)."""
    if tune.every < 1:
        raise BadOption("periodic unfreezing needs --unfreeze-every K >= 1")
    s = _start(config)
    config, run_dir, device, data, backbone = s.config, s.run_dir, s.device, s.data, s.backbone
    run_config = _run_config(config, data, tune)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ckpt.METRICS).write_text("")
    run = Periodic(config, tune, device, backbone, data, Path(config.features_dir),
                   new_state(config, run_config, data, device), run_dir, progress)
    active, kept, notes = True, None, []
    while run.state.epoch < config.epochs:
        _adapter_stage(run, min(run.state.epoch + tune.every, config.epochs))
        if kept is not None and run.state.best < kept.best and tune.rollback:
            notes.append(f"cycle {len(run.cycles)} lowered the best valid mean recall ({kept.best:.2f} -> "
                         f"{run.state.best:.2f}): rolled back, unfreezing stopped")
            _roll_back(run, kept)
            active = False
        kept = None
        if run.state.epoch >= config.epochs or run.state.stopped_early:
            break
        if active:
            kept = _keep(run)
            _cycle(run)
    final = _tuned_config(run_config, run.backbone, run.features_dir)
    record = {"mode": "periodic", "unlock": str(tune.spec), "stages": run.stages, "cycles": run.cycles, "notes": notes}
    return _write_run(run_dir, final, run.state, run.backbone if run.tuned else None, record,
                      run.data.source.n_captions)


def tuned_summary_lines(summary: dict) -> list[str]:
    """What the CLI prints after the head table for a tuned run."""
    lines = [f"tuned: {summary.get('mode')} ({summary.get('unlock')}); cache {summary.get('features_dir')}"]
    for c in summary.get("cycles", []):
        lines.append(f"  cycle {c['cycle']} ({c['path']}): {c['seconds']} s, {c['pairs_per_s']} pairs/s, refresh "
                     f"{c['refresh_seconds']} s -> {c['backbone']}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    if summary.get("checkpoint"):
        lines.append(f"  checkpoint: {summary['checkpoint']}")
    return lines


__all__ = ["TuneConfig", "refresh_cache", "train_tuned", "train_with_unfreezing", "tuned_summary_lines"]
