"""The training loop: cached features in, a run folder out.

Reproducibility without saving RNG state: every epoch reseeds torch and its batch generator from
(seed, epoch), so an epoch's batches, views, templates and dropout masks depend only on the
weights it starts from. `--resume` therefore reproduces an uninterrupted run bit for bit from the
last finished epoch: heads, loss parameters and AdamW moments come back from last.safetensors, the
learning rate is a pure function of the step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.closed_form import fit_cca_on_valid
from medembed.adapt.config import AdaptConfig
from medembed.adapt.data import ConceptTexts, MemorySource, StreamSource, estimated_bytes, iter_batches, read_concepts
from medembed.adapt.heads import EnsembleHead, build_head, fit_input_stats
from medembed.adapt.losses import build_loss
from medembed.cache.reader import CachedSplit, find_splits, load_split, read_attrs
from medembed.common.ranking import recall_summary

PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocess", "image_layer", "image_pooling", "text_layer",
                   "text_pooling", "dataset", "dataset_fingerprint", "toolkit_version", "synthetic")
# options that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"epochs", "patience", "device", "threads", "eval_every", "max_memory_gb", "chunk_rows"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def training_threads(config: AdaptConfig, image_dim: int, text_dim: int, device: torch.device) -> int:
    """CPU threads for the loop. A step on a few-thousand-pair set is a handful of small GEMMs,
    where waking and syncing a second thread costs more than it saves (and on a shared machine a
    busy sibling core stalls every step): below ~4G multiply-adds per step, use one thread."""
    if config.threads:
        return config.threads
    step_macs = config.batch_size * (image_dim + text_dim) * config.dim * config.ensemble
    return 1 if device.type != "cpu" or step_macs < 4e9 else torch.get_num_threads()


def build_towers(run_config: dict) -> tuple[nn.Module, nn.Module]:
    """Image and text heads as the config describes them, freshly initialised from its seed.
    Shared by training and `load_run`, so a saved run always rebuilds to the same shapes."""
    cfg = AdaptConfig.from_dict(run_config)
    image_dim, text_dim = int(run_config["image_dim"]), int(run_config["text_dim"])
    if cfg.head == "cca":
        return build_head("cca", image_dim, cfg.dim), build_head("cca", text_dim, cfg.dim)
    towers: list[list[nn.Module]] = [[], []]
    for k in range(cfg.ensemble):
        torch.manual_seed(cfg.seed * 1009 + k)
        for tower, in_dim in zip(towers, (image_dim, text_dim)):
            tower.append(build_head(cfg.head, in_dim, cfg.dim, dropout=cfg.dropout,
                                    input_dropout=cfg.input_dropout, alpha=cfg.alpha))
    if cfg.ensemble == 1:
        return towers[0][0], towers[1][0]
    return EnsembleHead(towers[0]), EnsembleHead(towers[1])


def _members(head: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return head.member_outputs(x) if isinstance(head, EnsembleHead) else [head(x)]


@torch.no_grad()
def embed(head: nn.Module, feats: torch.Tensor, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    was = head.training
    head.eval()
    out = torch.cat([head(feats[s : s + chunk].to(device).float()).float().cpu() for s in range(0, feats.shape[0], chunk)])
    head.train(was)
    return torch.nn.functional.normalize(out, dim=-1)


def evaluate_split(image_head: nn.Module, text_head: nn.Module, split: CachedSplit, device: torch.device) -> dict:
    return recall_summary(embed(image_head, split.image_features, device),
                          embed(text_head, split.caption_features, device), split.caption_image)


def _ema_fn(decay: float):
    """Exponential moving average whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the
    first updates: a fixed 0.98 would keep a run of a few dozen steps close to its random init."""

    def update(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged * d + current * (1.0 - d)

    return update


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(heads: list[nn.Module], loss: nn.Module, weight_decay: float) -> list[dict]:
    # decay weight matrices only: biases, LayerNorm gains and the temperature stay free
    decay, free = [], []
    for h in heads:
        for p in h.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else free).append(p)
    free += [p for p in loss.parameters() if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


def _load_data(config: AdaptConfig):
    files = find_splits(config.features_dir)
    for need in ("train", "valid"):
        if need not in files:
            raise FileNotFoundError(f"{config.features_dir}: no {need}.h5 (training needs train and a valid split "
                                    f"for early stopping; found {', '.join(files)})")
    train_path = files["train"]
    stream = config.head != "cca" and estimated_bytes(train_path) > config.max_memory_gb * 2**30
    if stream:
        source = StreamSource(train_path, chunk_rows=config.chunk_rows, with_views=config.use_views)
        concepts = read_concepts(train_path) if config.augment == "concepts" else None
        train_split = None
    else:
        train_split = load_split(train_path, with_views=config.use_views)
        source = MemorySource(train_split)
        concepts = (train_split.concepts, train_split.concept_names, train_split.concept_text_features)
    return source, train_split, concepts, load_split(files["valid"], with_views=False), read_attrs(train_path)


def _check_resume(saved: dict, config: AdaptConfig, run_dir: Path) -> None:
    now = config.to_dict()
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
    if diff:
        raise ValueError(f"{run_dir / ckpt.CONFIG}: --resume must keep the run's settings; changed " + "; ".join(diff))


def _run_config(config: AdaptConfig, image_dim: int, text_dim: int, attrs: dict) -> dict:
    return {**config.to_dict(), "image_dim": image_dim, "text_dim": text_dim,
            "backbone": attrs.get("backbone", ""), "cache": {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}}


def _read_metrics(run_dir: Path, upto: int | None = None) -> list[dict]:
    path = run_dir / ckpt.METRICS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r.get("epoch", 0) <= upto]


def _summary(run_dir: Path, run_config: dict, rows: list[dict], state: dict) -> dict:
    best = next((r for r in rows if r.get("epoch") == state["best_epoch"]), {})
    keys = [k for k in best if k.startswith(("t2i_", "i2t_")) or k == "mean_recall"]
    return {
        "run_dir": str(run_dir), "loss": run_config["loss"], "head": run_config["head"], "dim": run_config["dim"],
        "augment": run_config["augment"], "ensemble": run_config["ensemble"],
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "stopped_early": state["stopped_early"],
        "seconds": round(state["elapsed"], 2), "seconds_to_best": round(best.get("elapsed", 0.0), 2),
        "n_train_pairs": state.get("n_train_pairs", 0), "device": state.get("device", "cpu"),
        "valid": {k: best[k] for k in keys}, **({"closed_form": state["closed_form"]} if "closed_form" in state else {}),
    }


def train(config: AdaptConfig, *, resume: bool = False, stop_after_epoch: int | None = None, progress: bool = True,
          splits: tuple[CachedSplit, CachedSplit] | None = None) -> dict:
    """Train (or fit, for cca) one run into `config.out`; returns the summary the CLI prints.

    `stop_after_epoch` ends the call after that epoch as a kill would (state saved, run unfinished),
    so `resume=True` can continue it. `splits` = (train, valid) already in memory skips reading
    `config.features_dir` (benchmarks on synthetic data)."""
    run_dir = Path(config.out)
    if splits is None:
        config = replace(config, features_dir=str(Path(config.features_dir).resolve()))
    if config.head == "cca" and config.ensemble > 1:
        raise ValueError("--head cca is a single closed-form solution; ensemble must be 1")
    has_run = (run_dir / ckpt.CONFIG).exists()
    if has_run and not resume:
        raise FileExistsError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if resume and has_run:
        _check_resume(json.loads((run_dir / ckpt.CONFIG).read_text()), config, run_dir)
    device = resolve_device(config.device)

    if splits is not None:
        train_split, valid = splits
        source = MemorySource(train_split)
        concepts = (train_split.concepts, train_split.concept_names, train_split.concept_text_features)
        attrs = dict(train_split.attrs)
    else:
        source, train_split, concepts, valid, attrs = _load_data(config)
    run_config = _run_config(config, source.image_dim, source.text_dim, attrs)
    run_dir.mkdir(parents=True, exist_ok=True)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(training_threads(config, source.image_dim, source.text_dim, device))
    try:
        with torch.random.fork_rng(devices=[]):
            if config.head == "cca":
                if train_split is None:
                    raise ValueError(f"{config.features_dir}: --head cca needs the training split in memory; "
                                     "raise max_memory_gb in the run config")
                return _fit_cca(config, run_config, run_dir, train_split, valid)
            return _train_loop(config, run_config, run_dir, source, concepts, valid, device, resume, stop_after_epoch, progress)
    finally:
        torch.set_num_threads(threads_before)


def _fit_cca(config: AdaptConfig, run_config: dict, run_dir: Path, train_split: CachedSplit, valid: CachedSplit) -> dict:
    """Closed form: ridge and correlation weighting picked on valid, like early stopping picks an epoch.
    Runs on the CPU: a few eigendecompositions of feature-sized matrices, no loop to accelerate."""
    t0 = time.perf_counter()
    fit = fit_cca_on_valid(train_split, valid, config.dim)
    rows = [{"epoch": i + 1, **r} for i, r in enumerate(fit.grid)]
    (run_dir / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt.save_heads(run_dir / ckpt.BEST, fit.image_head, fit.text_head)
    run_config["closed_form"] = {"reg": fit.reg, "power": fit.power}
    ckpt.write_json(run_dir / ckpt.CONFIG, run_config)
    best = next(r["epoch"] for r in rows if (r["reg"], r["power"]) == (fit.reg, fit.power))
    state = {"epoch": len(rows), "best_epoch": best, "stopped_early": False,
             "elapsed": time.perf_counter() - t0, "n_train_pairs": train_split.n_captions, "device": "cpu",
             "closed_form": run_config["closed_form"]}
    summary = _summary(run_dir, run_config, rows, state)
    ckpt.write_json(run_dir / ckpt.SUMMARY, summary)
    return summary


def _train_loop(config, run_config, run_dir, source, concepts, valid, device, resume, stop_after_epoch, progress) -> dict:
    torch.manual_seed(config.seed)
    image_head, text_head = build_towers(run_config)
    fit_input_stats(image_head, source.image_chunks())
    fit_input_stats(text_head, source.caption_chunks())
    losses = nn.ModuleList(build_loss(config.loss, temperature=config.temperature, margin=config.margin,
                                      learn_temperature=config.learn_temperature) for _ in range(config.ensemble))
    image_head, text_head, losses = image_head.to(device), text_head.to(device), losses.to(device)
    optimizer = torch.optim.AdamW(_param_groups([image_head, text_head], losses, config.weight_decay), lr=config.lr)
    # weight averages: smoother heads than the last step's, chosen and saved in their place
    ema = None
    if config.ema > 0:
        from torch.optim.swa_utils import AveragedModel

        ema = {name: AveragedModel(head, avg_fn=_ema_fn(config.ema), use_buffers=True)
               for name, head in (("ema_image_head", image_head), ("ema_text_head", text_head))}

    concept_texts = ConceptTexts(*concepts) if config.augment == "concepts" else None
    extra = min(concept_texts.n_pairs, round(config.concept_ratio * source.n_captions)) if concept_texts else 0
    n_pairs = source.n_captions + extra
    steps_per_epoch = max(1, math.ceil(n_pairs / config.batch_size))
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    total = config.epochs * steps_per_epoch

    state = {"epoch": 0, "step": 0, "best_epoch": 0, "best": -1.0, "bad": 0, "elapsed": 0.0,
             "stopped_early": False, "n_train_pairs": n_pairs, "device": str(device)}
    last = run_dir / ckpt.LAST
    if resume and last.exists():
        state.update(ckpt.load_training_state(last, image_head, text_head, losses, optimizer, extra=ema))
        rows = _read_metrics(run_dir, upto=state["epoch"])  # drop lines of an epoch killed before its checkpoint
        (run_dir / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (run_dir / ckpt.METRICS).write_text("")
    ckpt.write_json(run_dir / ckpt.CONFIG, run_config)

    use_views = config.use_views and source.has_views
    while state["epoch"] < config.epochs and not (state["bad"] >= config.patience):
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        epoch_seed = config.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        gen = torch.Generator().manual_seed(epoch_seed)
        image_head.train(), text_head.train(), losses.train()
        total_loss, n_steps = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=not progress,
                   leave=False, unit="step", dynamic_ncols=True)
        for block in source.blocks(gen):
            for batch in iter_batches(block, config.batch_size, gen, concepts=concept_texts,
                                      concept_ratio=config.concept_ratio if concept_texts else 0.0, use_views=use_views):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], config.lr, warmup, total)
                pos = batch.positives.to(device, non_blocking=True)
                imgs = _members(image_head, batch.images.to(device, non_blocking=True))
                txts = _members(text_head, batch.texts.to(device, non_blocking=True))
                loss = sum(fn(i, t, pos) for fn, i, t in zip(losses, imgs, txts)) / len(losses)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    for avg, head in zip(ema.values(), (image_head, text_head)):
                        avg.update_parameters(head)
                state["step"] += 1
                n_steps += 1
                total_loss += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / n_steps:.4f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": total_loss / max(n_steps, 1), "steps": n_steps,
               "lr": optimizer.param_groups[0]["lr"], "train_seconds": train_seconds}
        temp = getattr(losses[0], "temperature", None)
        if temp is not None:
            row["temperature"] = temp
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            chosen = (image_head, text_head) if ema is None else tuple(a.module for a in ema.values())
            row.update(evaluate_split(*chosen, valid, device))
            if row["mean_recall"] > state["best"]:
                state.update(best=row["mean_recall"], best_epoch=epoch, bad=0)
                ckpt.save_heads(run_dir / ckpt.BEST, *chosen)
            else:
                state["bad"] += 1
        state["elapsed"] += time.perf_counter() - t0
        row["elapsed"] = state["elapsed"]
        state["epoch"] = epoch
        state["stopped_early"] = state["bad"] >= config.patience and epoch < config.epochs
        with open(run_dir / ckpt.METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        ckpt.save_training_state(last, image_head, text_head, losses, optimizer, state, extra=ema)
        if progress:
            tqdm.write(f"epoch {epoch}: loss {row['train_loss']:.4f}"
                       + (f"  valid R@10 t2i {row['t2i_R@10']:.1f} i2t {row['i2t_R@10']:.1f}" if "t2i_R@10" in row else "")
                       + f"  ({train_seconds:.1f}s)")
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break

    summary = _summary(run_dir, run_config, _read_metrics(run_dir), state)
    ckpt.write_json(run_dir / ckpt.SUMMARY, summary)
    return summary
