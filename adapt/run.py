"""A trained run as the rest of the toolkit sees it: two heads that turn raw cached features into
unit embeddings, rebuilt from `config.json` + `best.safetensors` (never pickle).

Every head kind, the closed-form cca included, saves the same layout, so evaluation and search
load any run the same way. A run reference may also be an unfreezing run's folder or its
`finetuned.safetensors`: then the run carries its fine-tuned backbone, the only thing that can turn
new raw images and captions into the features its heads were trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.closed_form import fit_closed_form
from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import build_towers, train

__all__ = ["AdaptedRun", "load_run", "load_checkpoint_run", "train", "fit_closed_form", "config_from_options", "format_summary"]


@dataclass
class AdaptedRun:
    run_dir: Path
    config: dict
    image_head: nn.Module
    text_head: nn.Module
    checkpoint: Path | None = None  # the fine-tuned backbone + heads file this run was loaded from
    backbone: object | None = None  # that file's fine-tuned backbone (None: rebuilt from the registry by name)

    @torch.no_grad()
    def _embed(self, head: nn.Module, feats: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        device = next((b.device for b in head.buffers()), torch.device("cpu"))
        out = [head(feats[s : s + chunk].to(device).float()).float().cpu() for s in range(0, feats.shape[0], chunk)]
        if not out:
            return torch.empty(0, int(self.config["dim"]) * int(self.config.get("ensemble", 1)))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def embed_images(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw cached image features [N, Di] -> L2-normalised float32 [N, D]."""
        return self._embed(self.image_head, feats)

    def embed_texts(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw cached text features [N, Dt] -> L2-normalised float32 [N, D]."""
        return self._embed(self.text_head, feats)

    @property
    def features_dir(self) -> Path:
        return Path(self.config["features_dir"])

    @property
    def dim(self) -> int:
        return int(self.config["dim"]) * int(self.config.get("ensemble", 1))

    def load_backbone(self, device: str = "cpu"):
        """The backbone whose raw features the heads take: the checkpoint's fine-tuned towers when
        the run came from one, else the registry backbone named in config.json."""
        if self.backbone is not None:
            return self.backbone
        from medembed.adapt.finetune import FT_MARK
        from medembed.extract.backbones import create_backbone

        name = self.config.get("backbone", "")
        if not name:
            raise ValueError(f"{self.run_dir}: config.json names no backbone, so new images or captions cannot be encoded")
        if FT_MARK in name:
            raise ValueError(f"{self.run_dir}: trained on features of the fine-tuned backbone {name}, which the registry "
                             "cannot rebuild; pass the unfreezing run folder or its finetuned.safetensors instead")
        return create_backbone(name, device=device)

    def with_features(self, features_dir: str | Path) -> AdaptedRun:
        """The same heads pointed at another cache of the same backbone (e.g. a newly encoded dataset)."""
        return replace(self, config={**self.config, "features_dir": str(features_dir)})


def load_run(run_dir: str | Path) -> AdaptedRun:
    """A run folder (`config.json` + `best.safetensors`), an unfreezing run's folder, or a
    fine-tuned checkpoint file."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        if run_dir.suffix != ".safetensors":
            raise ValueError(f"{run_dir}: not a run (expected a run folder, an unfreezing run folder or its "
                             "finetuned.safetensors)")
        return load_checkpoint_run(run_dir)
    if (run_dir / "unfreeze.json").exists():
        from medembed.adapt.finetune import CHECKPOINT

        if (run_dir / CHECKPOINT).exists():
            return load_checkpoint_run(run_dir / CHECKPOINT)
        stages = sorted(run_dir.glob("stage-[0-9]*"), key=lambda p: int(p.name.removeprefix("stage-")))
        if not stages:
            raise FileNotFoundError(f"{run_dir}: an unfreezing run with no finished stage")
        return replace(load_run(stages[-1]), run_dir=run_dir)  # no cycle ran: the heads of the only stage
    cfg_path = run_dir / ckpt.CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: no config.json, not an adapter run folder")
    config = json.loads(cfg_path.read_text())
    for key in ("head", "dim", "image_dim", "text_dim"):
        if key not in config:
            raise ValueError(f"{cfg_path}: missing {key!r}; was this written by `cli.py adapt`?")
    with torch.random.fork_rng(devices=[]):
        image_head, text_head = build_towers(config)
    ckpt.load_heads(run_dir / ckpt.BEST, image_head, text_head)
    return AdaptedRun(run_dir, config, image_head.eval(), text_head.eval())


def load_checkpoint_run(path: str | Path, device: str = "cpu") -> AdaptedRun:
    """A `finetuned.safetensors` (fine-tuned towers + heads) as a run: its heads, the config of the
    adapter stage that trained them (features_dir: the cache its backbone refreshed) and the backbone."""
    from medembed.adapt.finetune import read_finetuned

    path = Path(path)
    backbone, image_head, text_head, config = read_finetuned(path, device)
    return AdaptedRun(path.parent, config, image_head, text_head, checkpoint=path, backbone=backbone)


def describe_run(run: AdaptedRun) -> str:
    """What a run is, in a few words: head, loss and width, or the closed form's chosen setting;
    the fine-tuned backbone it carries."""
    c = run.config
    if c.get("head") == "cca":
        chosen = c.get("closed_form", {})
        text = "cca head, closed form" + (f" (ridge {chosen['reg']}, weighting {chosen['power']} chosen on valid)"
                                          if chosen else "")
    else:
        text = f"{c.get('head', '?')} head, {c.get('loss', '?')} loss, dim {run.dim}"
    if run.checkpoint is not None:
        text += f"; fine-tuned backbone {run.backbone.name} from {run.checkpoint}"
    return text


def config_from_options(options: dict, explicit: set[str], resume: bool) -> AdaptConfig:
    """CLI options -> config. On --resume the saved config is the base and only options given on
    the command line override it (so `adapt --out runs/x --resume` alone continues the run).
    Options the chosen head or loss would ignore are refused, naming each and why."""
    out = Path(options["out"])
    if resume:
        if not (out / ckpt.CONFIG).exists():
            raise FileNotFoundError(f"--resume: {out} holds no run to continue (no {ckpt.CONFIG}); drop --resume "
                                    "to start a new run there")
        saved = AdaptConfig.from_run(out).to_dict()
        saved.update({k: v for k, v in options.items() if k in explicit and v is not None})
        config = AdaptConfig.from_dict(saved)
    else:
        if not options.get("features_dir"):
            raise ValueError("--features is required (unless --resume continues a run in --out)")
        config = AdaptConfig.from_dict({k: v for k, v in options.items() if v is not None})
    ignored = config.ignored(explicit - {"features_dir", "out"})
    if ignored:
        raise ValueError("options that would have no effect on this run: " + "; ".join(ignored))
    return config


def format_summary(summary: dict) -> str:
    """The closing table: best epoch, valid R@1/5/10 both ways, seconds."""
    v = summary["valid"]
    cols = ["head", "loss", "best epoch", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10", "seconds"]
    best = summary["best_epoch"]
    if "closed_form" in summary:
        best = "closed form ({})".format(", ".join(f"{k} {x}" for k, x in summary["closed_form"].items()))
    vals = [summary["head"], summary["loss"] if summary["head"] != "cca" else "-", f"{best} / {summary['epochs_run']}"]
    vals += [f"{v[f'{d}_R@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    vals.append(f"{summary['seconds']:.1f}")
    widths = [max(len(c), len(str(x))) for c, x in zip(cols, vals)]
    line = lambda xs: "| " + " | ".join(str(x).ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = "stopped early" if summary.get("stopped_early") else "ran all epochs"
    return "\n".join([line(cols), rule, line(vals), f"valid recall in %; {note}; run saved in {summary['run_dir']}"])
