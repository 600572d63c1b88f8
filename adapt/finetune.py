"""Periodic unfreezing: adapter epochs on the cache, then a short end-to-end fine-tuning of the top of
both backbones on raw images and captions, then a re-extracted cache, then adapters again.

Why: heads on frozen features can only re-mix what the backbone already computes. Unfreezing the
top blocks now and then lets the features themselves move toward the domain, while most epochs
stay on the cheap cached path. Each refreshed cache is written under a new backbone name
(`BASE+ft-<12 hex of the weights>`) with its own weights_sha256, so the old cache stays valid and
the two can never be mixed.

The fine-tuned towers plus heads are saved as one safetensors file (`load_finetuned` rebuilds
them for new raw images and captions). The towers train in eval mode: dropout off and batch-norm
statistics frozen, so a locked parameter or buffer is bit-identical after a cycle.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.data import caption_keys
from medembed.adapt.heads import EnsembleHead
from medembed.adapt.losses import build_loss
from medembed.adapt.run import load_run, train
from medembed.adapt.trainer import build_towers, lr_at, resolve_device
from medembed.cache.reader import find_splits, load_split, read_attrs

FORMAT = "medembed-finetuned/1"
FT_MARK = "+ft-"
CHECKPOINT = "finetuned.safetensors"


@dataclass
class UnfreezeConfig:
    """How often, how long and how much of the backbones to fine-tune between adapter stages."""

    every: int = 5  # K: adapter epochs between two unfreeze cycles
    epochs: int = 1  # E: end-to-end epochs per cycle
    unlocked_layers: int | str = 2  # N top groups of each tower, or "all" (full fine-tuning)
    grad_checkpointing: bool = False
    backbone_lr: float = 1e-5  # the towers move slowly: their features are what the cache holds
    head_lr: float = 1e-4  # heads arrive trained; a small step keeps them near what they learned
    weight_decay: float = 0.01
    batch_size: int = 32
    workers: int = 0
    augment: bool = True  # random crops on the raw-image path (the cached path always uses the eval view)
    cached_trunk: bool = False  # cached partial unfreeze: run the frozen trunk once, train only the top
    max_pairs: int = 0  # 0: every training caption per epoch; else a fixed random subset (CPU budgets)
    data: str | None = None  # dataset folder; None: the cache's own data_root
    features_root: str | None = None  # where refreshed caches go; None: beside the current one
    extract_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        self.unlocked_layers = parse_unlocked(self.unlocked_layers)
        for name in ("every", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"unfreeze {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("unfreeze batch_size must be >= 2: a contrastive batch needs a negative")
        if self.cached_trunk and self.unlocked_layers == "all":
            raise ValueError("--unlocked-layers all leaves no frozen trunk to cache; drop the cached path")


def parse_unlocked(value: int | str) -> int | str:
    """'all' or a positive whole number of top groups (what --unlocked-layers accepts)."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return "all"
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"--unlocked-layers must be a whole number or 'all', got {value!r}") from None
    if value < 1:
        raise ValueError(f"--unlocked-layers must be >= 1 (or 'all'), got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------- locking
def _open_clip(backbone) -> nn.Module | None:
    from medembed.adapt.midcache import open_clip_model

    return open_clip_model(backbone)


def tower_parameters(backbone) -> dict[str, nn.Parameter]:
    """Every parameter of both towers under `image_model.` / `text_model.` names, each once."""
    out, seen = {}, set()
    for prefix, tower in (("image_model", backbone.image_model), ("text_model", backbone.text_model)):
        for name, p in tower.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{prefix}.{name}"] = p
    return out


def lock_backbone(backbone, unlocked: int | str) -> list[nn.Parameter]:
    """Freeze both towers except their top `unlocked` groups; returns the trainable tower parameters.

    open_clip models use open_clip's own LiT-style locking (lock_image_tower / lock_text_tower);
    other backbones unlock the last N of `image_blocks()` / `text_blocks()`.
    """
    params = tower_parameters(backbone)
    for p in params.values():
        p.requires_grad_(unlocked == "all")
    if unlocked != "all":
        clip = _open_clip(backbone)
        if clip is not None:
            clip.lock_image_tower(unlocked_groups=unlocked)
            clip.lock_text_tower(unlocked_layers=unlocked)
        else:
            for block in [*backbone.image_blocks()[-unlocked:], *backbone.text_blocks()[-unlocked:]]:
                for p in block.parameters():
                    p.requires_grad_(True)
    trainable = [p for p in params.values() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{backbone.name}: unlocking {unlocked} groups left no trainable parameter")
    return trainable


def _run_plain(fn, *args):
    return fn(*args)


def _run_checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


@contextmanager
def checkpointed_blocks(backbone, enabled: bool) -> Iterator[None]:
    """Recompute the activations of every unlocked block in the backward pass instead of storing them.

    Wraps the blocks' own forward (restored on exit), so it works for any tower cut into blocks,
    open_clip or not, and regardless of train/eval mode.
    """
    if not enabled:
        yield
        return
    patched = []
    for block in [*backbone.image_blocks(), *backbone.text_blocks()]:
        if type(block).forward is nn.Module.forward or isinstance(block, (nn.ModuleList, nn.ModuleDict)):
            children = list(block.children()) if isinstance(block, nn.ModuleList) else []
        else:
            children = [block]
        for module in children:
            if any(p.requires_grad for p in module.parameters()) and "forward" not in module.__dict__:
                original = module.forward
                module.forward = lambda *a, _f=original, **k: checkpoint(_f, *a, use_reentrant=False, **k)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# ------------------------------------------------------------------------------------- training data
class RawPairs(torch.utils.data.Dataset):
    """(pixels, caption, image row) for each training caption, images read from the dataset folder."""

    def __init__(self, root: Path, locations: list[str], captions: list[str], caption_image: torch.Tensor,
                 transform: Callable):
        self.root, self.locations, self.captions = root, locations, captions
        self.caption_image, self.transform = caption_image, transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        from medembed.extract.records import open_image

        row = int(self.caption_image[i])
        location = self.locations[row]
        try:
            image = open_image(str(self.root / location))
        except Exception as e:
            raise RuntimeError(f"{self.root / location}: cannot read training image ({type(e).__name__}: {e})") from e
        return self.transform(image), self.captions[i], row, i


def _collate(items):
    pixels, captions, rows, index = zip(*items)
    return torch.stack(pixels), list(captions), torch.tensor(rows), torch.tensor(index)


def _positives(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (rows[:, None] == rows[None, :]) | (keys[:, None] == keys[None, :])


def _members(head: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return head.member_outputs(x) if isinstance(head, EnsembleHead) else [head(x)]


def _autocast(device: torch.device):
    if device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@dataclass
class CycleStats:
    epochs: int
    pairs_per_epoch: int
    seconds: float
    seconds_per_epoch: float
    pairs_per_s: float
    train_loss: float
    path: str  # "raw" or "cached"
    unlocked_layers: int | str
    trainable_backbone_params: int
    peak_gpu_memory_gb: float = 0.0
    mid_cache_seconds: float = 0.0
    mid_cache_mb: float = 0.0


def fine_tune(backbone, image_head: nn.Module, text_head: nn.Module, losses: nn.ModuleList, train_path: str | Path,
              unfreeze: UnfreezeConfig, device: torch.device, data_root: str | Path | None = None,
              progress: bool = False) -> CycleStats:
    """One unfreeze cycle: E epochs of end-to-end training of the unlocked blocks + heads + loss.

    Reads image locations and captions from the training cache file, images from `data_root`
    (default: the cache's own data_root). Both the raw-image path and the cached partial unfreeze
    (unfreeze.cached_trunk) go through here, so they train the same parameters the same way.
    """
    split = load_split(train_path, with_views=False)
    root = Path(data_root or unfreeze.data or split.attrs.get("data_root", ""))
    if not root.is_dir():
        raise FileNotFoundError(f"{train_path}: images folder {root} (data_root) not found; pass UnfreezeConfig.data")
    backbone.to(device)
    trainable = lock_backbone(backbone, unfreeze.unlocked_layers)
    backbone.image_model.eval(), backbone.text_model.eval()
    image_head.to(device).train(), text_head.to(device).train(), losses.to(device).train()
    head_params = [p for m in (image_head, text_head, losses) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": trainable, "lr": unfreeze.backbone_lr, "base_lr": unfreeze.backbone_lr},
        {"params": head_params, "lr": unfreeze.head_lr, "base_lr": unfreeze.head_lr},
    ], weight_decay=unfreeze.weight_decay)

    gen = torch.Generator().manual_seed(unfreeze.seed)
    n_pairs = split.n_captions if not unfreeze.max_pairs else min(unfreeze.max_pairs, split.n_captions)
    subset = torch.randperm(split.n_captions, generator=gen)[:n_pairs].sort().values
    keys = caption_keys(split.captions)
    steps_per_epoch = max(1, n_pairs // unfreeze.batch_size)
    total_steps, warmup = unfreeze.epochs * steps_per_epoch, max(1, steps_per_epoch // 10)
    autocast, scaler = _autocast(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    mid, top, mid_seconds = None, None, 0.0
    if unfreeze.cached_trunk:
        from medembed.adapt.midcache import build_mid_cache, top_for

        top = top_for(backbone)
        t0 = time.perf_counter()
        images_needed = torch.unique(split.caption_image[subset])
        row_of = torch.full((split.n_images,), -1, dtype=torch.long)
        row_of[images_needed] = torch.arange(images_needed.numel())
        eval_set = RawPairs(root, split.image_locations, [""] * images_needed.numel(), images_needed, backbone.preprocess)
        loader = torch.utils.data.DataLoader(eval_set, batch_size=64, num_workers=unfreeze.workers, collate_fn=_collate)
        with autocast:
            mid = build_mid_cache(top, (p for p, _, _, _ in loader), [split.captions[i] for i in subset.tolist()],
                                  backbone.tokenize, device)
        mid_seconds = time.perf_counter() - t0

    run = _run_checkpointed if unfreeze.grad_checkpointing else _run_plain
    transform = backbone.augment if unfreeze.augment else backbone.preprocess
    pairs = RawPairs(root, split.image_locations, split.captions, split.caption_image, transform)
    step, total_loss, n_steps = 0, 0.0, 0
    t0 = time.perf_counter()
    with checkpointed_blocks(backbone, unfreeze.grad_checkpointing and not unfreeze.cached_trunk):
        for _epoch in range(unfreeze.epochs):
            order = torch.randperm(n_pairs, generator=gen)
            batches = [order[s : s + unfreeze.batch_size] for s in range(0, steps_per_epoch * unfreeze.batch_size,
                                                                         unfreeze.batch_size)]
            if mid is None:
                sampler = [subset[b].tolist() for b in batches]
                loader = torch.utils.data.DataLoader(pairs, batch_sampler=sampler, num_workers=unfreeze.workers,
                                                     collate_fn=_collate, pin_memory=device.type == "cuda")
            else:
                loader = batches
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, group["base_lr"], warmup, total_steps)
                with autocast:
                    if mid is None:
                        pixels, captions, rows, cap = batch
                        tokens = {k: v.to(device) for k, v in backbone.tokenize(captions).items()}
                        img_feats = backbone.image_model(pixels.to(device, non_blocking=True))
                        txt_feats = backbone.text_model(**tokens)
                        pos = _positives(rows, keys[cap])
                    else:
                        local = batch
                        cap = subset[local]
                        rows = split.caption_image[cap]
                        img_feats = top.image_top(mid.images[row_of[rows]].to(device).float(), run)
                        txt_feats = top.text_top(mid.texts[local].to(device).float(), mid.text_aux[local].to(device), run)
                        pos = _positives(rows, keys[cap])
                    pos = pos.to(device)
                    imgs = _members(image_head, img_feats.float())
                    txts = _members(text_head, txt_feats.float())
                    loss = sum(fn(i, t, pos) for fn, i, t in zip(losses, imgs, txts)) / len(losses)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step, n_steps, total_loss = step + 1, n_steps + 1, total_loss + float(loss.detach())
                if progress and n_steps % 10 == 0:
                    print(f"  unfreeze step {n_steps}/{total_steps}: loss {total_loss / n_steps:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    for p in tower_parameters(backbone).values():
        p.requires_grad_(False)
    backbone.image_model.eval(), backbone.text_model.eval()
    image_head.eval(), text_head.eval()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return CycleStats(
        epochs=unfreeze.epochs, pairs_per_epoch=steps_per_epoch * unfreeze.batch_size, seconds=round(seconds, 3),
        seconds_per_epoch=round(seconds / unfreeze.epochs, 3),
        pairs_per_s=round(n_steps * unfreeze.batch_size / seconds, 2) if seconds > 0 else 0.0,
        train_loss=total_loss / max(n_steps, 1), path="cached" if mid is not None else "raw",
        unlocked_layers=unfreeze.unlocked_layers, trainable_backbone_params=sum(p.numel() for p in trainable),
        peak_gpu_memory_gb=round(peak, 3), mid_cache_seconds=round(mid_seconds, 3),
        mid_cache_mb=round(mid.nbytes / 2**20, 2) if mid is not None else 0.0)

# ------------------------------------------------------------------------- identity, refresh, saving
def tower_state(backbone) -> dict[str, torch.Tensor]:
    """Both towers' weights and buffers under `image_model.` / `text_model.`: what a fine-tuning changes."""
    state = {f"image_model.{k}": v for k, v in backbone.image_model.state_dict().items()}
    state.update({f"text_model.{k}": v for k, v in backbone.text_model.state_dict().items()})
    return state


def base_name(backbone) -> str:
    """The registry name a fine-tuned backbone was made from (what create_backbone rebuilds)."""
    return backbone.provenance.get("base_backbone") or backbone.name.split(FT_MARK)[0]


def mark_finetuned(backbone, cycle: int, unfreeze: UnfreezeConfig) -> str:
    """Give the backbone the identity of its current weights: a new name and weights_sha256.

    The name carries the short hash, so every refreshed cache lands in a folder of its own and the
    cache it was trained from is never overwritten; `finetuned_from` keeps the lineage."""
    from medembed.extract.backbones.core import sha256_state_dict

    sha = sha256_state_dict(tower_state(backbone))
    base = base_name(backbone)
    previous = backbone.provenance.get("weights_sha256", "")
    backbone.name = f"{base}{FT_MARK}{sha[:12]}"
    backbone.provenance.update({
        "backbone": backbone.name,
        "base_backbone": base,
        "weights_sha256": sha,
        "weights": f"fine-tuned from {base}; sha256 of the towers' state dict",
        "finetuned_from": previous,
        "finetune_cycle": str(cycle),
        "finetune_unlocked_layers": str(unfreeze.unlocked_layers),
    })
    return sha


def refresh_cache(backbone, features_dir: str | Path, unfreeze: UnfreezeConfig, device: torch.device,
                  progress: bool = False) -> Path:
    """Re-extract every split of `features_dir` with the (fine-tuned) backbone into a new folder.

    Same dataset, dtype, augmented views and concept templates as the old cache; only the
    backbone identity differs, which is what sends the output to `{root}/{dataset}/{new name}/`."""
    from medembed.extract.datasets import load_dataset
    from medembed.extract.pipeline import ExtractConfig, cache_dir, extract

    files = find_splits(features_dir)
    if not files:
        raise FileNotFoundError(f"{features_dir}: no cached split to refresh")
    attrs = read_attrs(next(iter(files.values())))
    data = unfreeze.data or attrs.get("data_root")
    if not data or not Path(data).is_dir():
        raise FileNotFoundError(f"{features_dir}: dataset folder {data!r} (data_root) not found; pass UnfreezeConfig.data")
    dataset = load_dataset(data, name=attrs.get("dataset"))
    root = Path(unfreeze.features_root) if unfreeze.features_root else Path(features_dir).resolve().parents[1]
    templates = tuple(str(attrs.get("templates", "")).split("\n")) if attrs.get("templates") else ExtractConfig.templates
    cfg = ExtractConfig(data=str(data), backbone=backbone.name, splits=list(files), batch_size=unfreeze.extract_batch_size,
                        workers=unfreeze.workers, device=device.type, out=str(root), dtype=str(attrs.get("dtype", "float16")),
                        views=int(attrs.get("views", 0)), templates=templates, progress=progress)
    out = cache_dir(root, dataset.name, backbone.name)
    if out.resolve() == Path(features_dir).resolve():
        raise RuntimeError(f"{out}: refreshed cache would overwrite the cache it replaces (backbone name unchanged)")
    extract(cfg, backbone=backbone, dataset=dataset)
    return out


def save_finetuned(path: str | Path, backbone, image_head: nn.Module, text_head: nn.Module, run_config: dict) -> Path:
    """Towers + heads in one safetensors file (no pickle); the metadata says how to rebuild them."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tower_state(backbone).items()}
    for prefix, head in (("image_head", image_head), ("text_head", text_head)):
        tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()})
    meta = {"format": FORMAT, "base_backbone": base_name(backbone), "backbone": backbone.name,
            "provenance": json.dumps(backbone.provenance, sort_keys=True),
            "run_config": json.dumps(run_config, sort_keys=True, default=str), "sha256": ckpt.digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """(Backbone, image_head, text_head) from a `save_finetuned` file, in eval mode on `device`."""
    return read_finetuned(path, device)[:3]


def read_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """(Backbone, image_head, text_head, run_config) from a `save_finetuned` file, in eval mode on `device`.

    The base backbone is built from the registry (offline) and its towers overwritten strictly,
    so a file that does not match its base architecture fails loudly instead of half-loading."""
    from medembed.extract.backbones import create_backbone

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint")
    tensors, meta = ckpt.read_verified(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fine-tuned backbone checkpoint (format {meta.get('format')!r}, expected {FORMAT})")
    backbone = create_backbone(meta["base_backbone"], device="cpu")
    for prefix, tower in (("image_model", backbone.image_model), ("text_model", backbone.text_model)):
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing, unexpected = tower.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: {prefix} does not fit {meta['base_backbone']} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    backbone.name = meta["backbone"]
    backbone.provenance = json.loads(meta["provenance"])
    run_config = json.loads(meta["run_config"])
    with torch.random.fork_rng(devices=[]):
        image_head, text_head = build_towers(run_config)
    ckpt._load_prefixed(image_head, tensors, "image_head", path)
    ckpt._load_prefixed(text_head, tensors, "text_head", path)
    backbone.to(device)
    backbone.image_model.eval(), backbone.text_model.eval()
    return backbone, image_head.to(device).eval(), text_head.to(device).eval(), run_config


# ------------------------------------------------------------------------------------ the whole loop
def _stage_losses(stage_dir: Path, run_config: dict) -> nn.ModuleList:
    """The loss modules (learned temperature) as the adapter stage left them."""
    cfg = AdaptConfig.from_dict(run_config)
    losses = nn.ModuleList(build_loss(cfg.loss, temperature=cfg.temperature, margin=cfg.margin,
                                      learn_temperature=cfg.learn_temperature) for _ in range(cfg.ensemble))
    last = stage_dir / ckpt.LAST
    if last.exists():
        ckpt._load_prefixed(losses, load_file(str(last)), "loss", last)
    return losses


def _seed_next_stage(stage_dir: Path, image_head: nn.Module, text_head: nn.Module, losses: nn.ModuleList,
                     config: AdaptConfig) -> None:
    """Write a `last.safetensors` at epoch 0 so `train(..., resume=True)` continues from the
    fine-tuned heads and temperature (keeping their input standardisation) rather than a fresh init."""
    from medembed.adapt.trainer import _param_groups

    stage_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(_param_groups([image_head, text_head], losses, config.weight_decay), lr=config.lr)
    state = {"epoch": 0, "step": 0, "best_epoch": 0, "best": -1.0, "bad": 0, "elapsed": 0.0, "stopped_early": False}
    ckpt.save_training_state(stage_dir / ckpt.LAST, image_head.cpu(), text_head.cpu(), losses.cpu(), optimizer, state)


def _check_cache_matches(backbone, features_dir: str | Path) -> None:
    attrs = read_attrs(find_splits(features_dir)["train"])
    if attrs.get("weights_sha256") != backbone.provenance.get("weights_sha256"):
        raise ValueError(f"{features_dir}: cache weights_sha256 {str(attrs.get('weights_sha256'))[:12]}... was not made "
                         f"by backbone {backbone.name} ({backbone.provenance.get('weights_sha256', '')[:12]}...); "
                         "fine-tuning from it would start from other features than the heads were trained on")


def train_with_unfreezing(config: AdaptConfig, unfreeze: UnfreezeConfig, progress: bool = True) -> dict:
    """Adapters for K epochs, an unfreeze cycle, refreshed cache, adapters again ... for config.epochs
    adapter epochs in all. Stages go to `{out}/stage-0`, `{out}/stage-1`, ...; the fine-tuned towers
    plus the final best heads go to `{out}/finetuned.safetensors`. Returns the last stage's summary
    with `cycles` (timings, new cache folders) and `checkpoint` added."""
    from medembed.extract.backbones import create_backbone

    if config.head == "cca":
        raise ValueError("--head cca is closed form; periodic unfreezing needs a trained head (linear, mlp, residual)")
    out = Path(config.out)
    if (out / "unfreeze.json").exists():
        raise FileExistsError(f"{out}: already holds an unfreezing run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    features_dir = str(Path(config.features_dir).resolve())
    done, stage, cycles, backbone, summary = 0, 0, [], None, {}
    started = time.perf_counter()
    record = {"adapt": config.to_dict(), "unfreeze": asdict(unfreeze), "stages": [], "cycles": cycles}
    ckpt.write_json(out / "unfreeze.json", record)
    while True:
        epochs = min(unfreeze.every, config.epochs - done)
        stage_dir = out / f"stage-{stage}"
        stage_cfg = replace(config, features_dir=features_dir, out=str(stage_dir), epochs=epochs)
        summary = train(stage_cfg, resume=stage > 0, progress=progress)
        done += epochs
        record["stages"].append({"stage": stage, "features_dir": features_dir, "epochs": epochs,
                                 "valid": summary["valid"], "best_epoch": summary["best_epoch"]})
        ckpt.write_json(out / "unfreeze.json", record)
        run = load_run(stage_dir)
        if done >= config.epochs:
            break
        if backbone is None:
            backbone = create_backbone(read_attrs(find_splits(features_dir)["train"])["backbone"].split(FT_MARK)[0],
                                       device=device)
        _check_cache_matches(backbone, features_dir)
        losses = _stage_losses(stage_dir, run.config)
        stats = fine_tune(backbone, run.image_head, run.text_head, losses, find_splits(features_dir)["train"],
                          unfreeze, device, progress=progress)
        mark_finetuned(backbone, stage + 1, unfreeze)
        t0 = time.perf_counter()
        new_dir = refresh_cache(backbone, features_dir, unfreeze, device, progress=progress)
        cycles.append({**asdict(stats), "refresh_seconds": round(time.perf_counter() - t0, 2),
                       "backbone": backbone.name, "features_dir": str(new_dir), "after_adapter_epochs": done})
        ckpt.write_json(out / "unfreeze.json", record)
        features_dir = str(new_dir)
        stage += 1
        _seed_next_stage(out / f"stage-{stage}", run.image_head, run.text_head, losses, config)
    if backbone is not None:
        save_finetuned(out / CHECKPOINT, backbone, run.image_head, run.text_head, run.config)
    summary = {**summary, "run_dir": str(out), "cycles": cycles, "stages": record["stages"],
               "checkpoint": str(out / CHECKPOINT) if backbone is not None else None, "features_dir": features_dir,
               "total_seconds": round(time.perf_counter() - started, 2)}
    ckpt.write_json(out / ckpt.SUMMARY, summary)
    return summary


@dataclass
class FinetunedModel:
    """A fine-tuned checkpoint as search and evaluation use it: raw images or captions in, unit embeddings out."""

    backbone: object
    image_head: nn.Module
    text_head: nn.Module

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
        return cls(*load_finetuned(path, device))

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 64) -> torch.Tensor:
        """PIL images or image file paths -> L2-normalised float32 [N, D] on CPU."""
        from medembed.extract.records import open_image

        out = []
        for s in range(0, len(images), batch_size):
            batch = [open_image(str(x)) if isinstance(x, (str, Path)) else x for x in images[s : s + batch_size]]
            pixels = torch.stack([self.backbone.preprocess(im) for im in batch])
            out.append(self.image_head(self.backbone.encode_images(pixels)).float().cpu())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> L2-normalised float32 [N, D] on CPU."""
        head_device = next(self.text_head.parameters()).device
        feats = self.backbone.encode_texts(list(texts)).to(head_device)
        return nn.functional.normalize(self.text_head(feats).float().cpu(), dim=-1)
