"""Training state kept in memory, and the one loop that advances it.

Every way of training in medembed is `fit(state, batches, epochs)`: the adapter run on cached
features, the periodic unfreezing cycles (raw images, or cached mid-layer activations, through the
unlocked tower blocks), and LiT mode (cached image features, a tuned text tower). They differ only
in what a batch holds and how it becomes features (`Encoders`); heads, losses, optimiser, learning
rate schedule, weight average, validation and early stopping are the same code.

State passes from stage to stage as this object, never through files: checkpoints are written
(by the `on_epoch` hook) only so an interrupted run can resume.

Reproducibility without saving RNG state: each epoch reseeds torch and its batch generator from
(seed, epoch), so an epoch's batches, views, templates and dropout masks depend only on the
weights it starts from.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from medembed.adapt.heads import EnsembleHead
from medembed.common.recall_keys import MEAN_RECALL, recall_key


@dataclass
class Schedule:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`; one peak learning
    rate per optimiser parameter group."""

    base_lrs: list[float]
    warmup: int
    total: int

    def lr(self, step: int, base: float) -> float:
        if step < self.warmup:
            return base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return base * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr(step, base)


def ema_update(decay: float) -> Callable:
    """Exponential moving average whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the
    first updates: a fixed 0.98 would keep a run of a few dozen steps close to its random init."""

    def update(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged * d + current * (1.0 - d)

    return update


def weight_averages(image_head: nn.Module, text_head: nn.Module, decay: float) -> dict[str, AveragedModel] | None:
    if decay <= 0:
        return None
    fn = ema_update(decay)
    return {name: AveragedModel(head, avg_fn=fn, use_buffers=True)
            for name, head in (("ema_image_head", image_head), ("ema_text_head", text_head))}


@dataclass
class Encoders:
    """How a batch's inputs become backbone features: identity for cached features, the unlocked
    tower blocks for raw pixels, tokens or cached mid-layer activations. Towers stay in eval mode
    while they train (dropout off, batch-norm statistics frozen), so what is locked stays bit-identical."""

    image: Callable = lambda x: x
    text: Callable = lambda x: x


@dataclass
class TrainState:
    """Everything a run is in the middle of: the heads and losses being trained, the optimiser and
    its schedule, the weight average, counters and the best epoch so far (its heads kept here)."""

    image_head: nn.Module
    text_head: nn.Module
    losses: nn.ModuleList
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: torch.device
    ema: dict[str, AveragedModel] | None = None
    seed: int = 0
    epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_epoch: int = 0
    bad: int = 0
    elapsed: float = 0.0
    stopped_early: bool = False
    best_heads: tuple[dict, dict] | None = None  # state dicts of the heads chosen at the best epoch
    history: list[dict] = field(default_factory=list)  # one row per epoch: loss, lr, valid recall, seconds
    tracked: tuple[nn.Module, ...] = ()  # modules tuned with the heads (towers): their best weights are kept too
    best_tracked: tuple[dict, ...] = ()
    supervision: nn.Module | None = None  # concept supervision (adapt.supervision): an extra loss, graded targets
    pretraining: dict | None = None  # what concept pre-training of the image head did (adapt.pretrain), if asked

    @property
    def chosen_heads(self) -> tuple[nn.Module, nn.Module]:
        """What validation scores and saving keeps: the weight average when there is one."""
        if self.ema is None:
            return self.image_head, self.text_head
        return self.ema["ema_image_head"].module, self.ema["ema_text_head"].module

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in ("epoch", "step", "best", "best_epoch", "bad", "elapsed", "stopped_early")}

    def restore_best(self) -> None:
        """Load the heads (and tuned towers) kept at the best epoch back in: what a finished run keeps."""
        if self.best_heads is not None:
            for head, state in zip(self.chosen_heads, self.best_heads):
                head.load_state_dict(state)
            for module, state in zip(self.tracked, self.best_tracked):
                module.load_state_dict(state)

    def reset_best(self) -> None:
        """Forget the best epoch (the features changed under the heads: a new stage starts)."""
        self.best, self.best_epoch, self.bad, self.best_heads, self.best_tracked = -1.0, 0, 0, None, ()


def members(head: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return head.member_outputs(x) if isinstance(head, EnsembleHead) else [head(x)]


def snapshot(modules) -> tuple[dict, ...]:
    """Detached copies of the modules' state dicts (weights kept in memory, not in files)."""
    return tuple({k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules)


def train_step(state: TrainState, batch, encoders: Encoders, autocast=None, scaler=None) -> float:
    """One optimiser step on one batch (anything with images, texts and a positives mask)."""
    state.schedule.apply(state.optimizer, state.step)
    with autocast or nullcontext():
        img = encoders.image(batch.images)
        txt = encoders.text(batch.texts)
        dev = state.device
        imgs = members(state.image_head, img.to(dev, non_blocking=True).float())
        txts = members(state.text_head, txt.to(dev, non_blocking=True).float())
        pos = batch.positives.to(dev, non_blocking=True)
        sup, rows = state.supervision, getattr(batch, "image_rows", None)
        soft = sup.soft_targets(rows) if sup is not None else None
        extra = {"soft": soft} if soft is not None else {}
        loss = sum(fn(i, t, pos, **extra) for fn, i, t in zip(state.losses, imgs, txts)) / len(state.losses)
        if sup is not None:
            loss = loss + sup.aux_loss(imgs, txts, rows, state.text_head)
    state.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(state.optimizer)
        scaler.update()
    else:
        loss.backward()
        state.optimizer.step()
    if state.ema is not None:
        for avg, head in zip(state.ema.values(), (state.image_head, state.text_head)):
            avg.update_parameters(head)
    state.step += 1
    return float(loss.detach())


def _train_mode(state: TrainState, on: bool) -> None:
    for m in (state.image_head, state.text_head, state.losses):
        m.train(on)


@dataclass
class FitOptions:
    patience: int | None = None  # epochs without a better valid mean_recall before stopping (None: never)
    eval_every: int = 1
    progress: bool = False
    stop_after_epoch: int | None = None  # end after this epoch as a kill would (tests of --resume)
    autocast: object | None = None  # a context manager for mixed precision (CUDA)
    scaler: object | None = None
    label: str = "epoch"


def fit(
    state: TrainState,
    batches: Callable[[torch.Generator], Iterable],
    epochs: int,
    *,
    encoders: Encoders | None = None,
    validate: Callable[[TrainState], dict] | None = None,
    on_epoch: Callable[[TrainState, dict], None] | None = None,
    options: FitOptions | None = None,
) -> TrainState:
    """Advance `state` until its epoch counter reaches `epochs` (or early stopping ends it).

    `batches(gen)` gives one epoch's batches from a generator seeded by (seed, epoch). After each
    epoch `validate(state)` (if given) scores the chosen heads; a better mean_recall keeps their
    weights in `state.best_heads`. `on_epoch(state, row)` sees the epoch's row (for metrics files
    and resume checkpoints). Returns the same state, advanced."""
    encoders = encoders or Encoders()
    opts = options or FitOptions()
    while state.epoch < epochs and not (opts.patience is not None and state.bad >= opts.patience):
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        epoch_seed = state.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        gen = torch.Generator().manual_seed(epoch_seed)
        _train_mode(state, True)
        total, n = 0.0, 0
        bar = tqdm(desc=f"{opts.label} {epoch}/{epochs}", disable=not opts.progress, leave=False, unit="step",
                   dynamic_ncols=True)
        for batch in batches(gen):
            total += train_step(state, batch, encoders, opts.autocast, opts.scaler)
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / n:.4f}")
        bar.close()
        _train_mode(state, False)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "steps": n,
               "lr": state.optimizer.param_groups[0]["lr"], "train_seconds": time.perf_counter() - t0}
        temp = getattr(state.losses[0], "temperature", None)
        if temp is not None:
            row["temperature"] = temp
        if validate is not None and (epoch % opts.eval_every == 0 or epoch == epochs):
            _validate(state, validate, row, epoch)
        state.elapsed += time.perf_counter() - t0
        row["elapsed"] = state.elapsed
        state.epoch = epoch
        state.stopped_early = opts.patience is not None and state.bad >= opts.patience and epoch < epochs
        state.history.append(row)
        if on_epoch is not None:
            on_epoch(state, row)
        if opts.progress:
            # the epoch kept is chosen on mean recall, so that is what the log leads with
            tqdm.write(f"{opts.label} {epoch}: loss {row['train_loss']:.4f}"
                       + (f"  valid mean recall {row[MEAN_RECALL]:.1f} (R@10 t2i {row[recall_key('t2i', 10)]:.1f} "
                          f"i2t {row[recall_key('i2t', 10)]:.1f})" + ("  *best" if state.best_epoch == epoch else "")
                          if MEAN_RECALL in row else "")
                       + f"  ({row['train_seconds']:.1f}s)")
        if opts.stop_after_epoch is not None and epoch >= opts.stop_after_epoch:
            break
    return state


def _validate(state: TrainState, validate: Callable[[TrainState], dict], row: dict, epoch: int) -> None:
    row.update(validate(state))
    if row[MEAN_RECALL] > state.best:
        state.best, state.best_epoch, state.bad = row[MEAN_RECALL], epoch, 0
        state.best_heads = snapshot(state.chosen_heads)
        state.best_tracked = snapshot(state.tracked)
    else:
        state.bad += 1
