"""A trained run as the rest of the toolkit sees it: two heads that turn raw cached features into
unit embeddings, rebuilt from `config.json` + `best.safetensors` (never pickle).

Every head kind, the closed-form cca included, saves the same layout, so evaluation and search
load any run the same way. A run that also carries a fine-tuned backbone (periodic unfreezing,
LiT) is opened by `adapt.tuning.runs.open_run`, which knows about backbones; this module does not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.heads import build_heads
from medembed.common.querybank import QueryBank
from medembed.common.tensors import embed_in_chunks, module_device

__all__ = ["AdaptedRun", "QUERYBANK", "load_run", "describe_run", "read_querybank"]

QUERYBANK = "querybank.json"  # the query-bank setting chosen on valid (`adapt.querybank`)


@dataclass
class AdaptedRun:
    run_dir: Path
    config: dict
    image_head: nn.Module
    text_head: nn.Module
    checkpoint: Path | None = None  # the fine-tuned backbone + heads file this run was loaded from
    backbone: object | None = None  # that file's fine-tuned backbone (None: rebuilt from the registry by name)

    @torch.no_grad()
    def embed_images(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw cached image features [N, Di] -> L2-normalised float32 [N, D]."""
        return embed_in_chunks(self.image_head, feats, device=module_device(self.image_head))

    @torch.no_grad()
    def embed_texts(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw cached text features [N, Dt] -> L2-normalised float32 [N, D]."""
        return embed_in_chunks(self.text_head, feats, device=module_device(self.text_head))

    @property
    def features_dir(self) -> Path:
        return Path(self.config["features_dir"])

    @property
    def dim(self) -> int:
        return int(self.config["dim"]) * int(self.config.get("ensemble", 1))

    @property
    def querybank(self) -> QueryBank | None:
        """The run's query-bank normalisation, or None where it has none (plain cosine): runs made
        with `--no-querybank`, before query banks existed, or a checkpoint file away from its folder."""
        return read_querybank(self.run_dir)

    def with_features(self, features_dir: str | Path) -> AdaptedRun:
        """The same heads pointed at another cache of the same backbone (e.g. a newly encoded dataset)."""
        return replace(self, config={**self.config, "features_dir": str(features_dir)})


def read_querybank(run_dir: str | Path) -> QueryBank | None:
    """The setting in a run folder's `querybank.json`, or None when there is none."""
    path = Path(run_dir) / QUERYBANK
    if not path.exists():
        return None
    try:
        return QueryBank.from_dict(json.loads(path.read_text())["setting"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a query-bank setting ({e})") from e


def load_run(run_dir: str | Path) -> AdaptedRun:
    """A run folder: `config.json` + `best.safetensors`."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ValueError(f"{run_dir}: not a run (expected a run folder, an unfreezing run folder or its "
                         "finetuned.safetensors)")
    cfg_path = run_dir / ckpt.CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: no config.json, not an adapter run folder")
    config = json.loads(cfg_path.read_text())
    for key in ("head", "dim", "image_dim", "text_dim"):
        if key not in config:
            raise ValueError(f"{cfg_path}: missing {key!r}; was this written by `cli.py adapt`?")
    image_head, text_head = build_heads(config)
    ckpt.load_heads(run_dir / ckpt.BEST, image_head, text_head)
    return AdaptedRun(run_dir, config, image_head.eval(), text_head.eval())


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
