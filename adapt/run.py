"""A trained run as the rest of the toolkit sees it: two heads that turn raw cached features into
unit embeddings, rebuilt from `config.json` + `best.safetensors` (never pickle).

Every head kind, the closed-form cca included, saves the same layout, so evaluation and search
load any run the same way. A run that also carries a fine-tuned backbone (periodic unfreezing,
LiT) is opened by `model.runs.open_run`, which knows about backbones; this module does not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.heads import Projected, build_heads
from medembed.adapt.run_files import (  # QUERYBANK re-exported: the query-bank setting chosen on valid
    COMPACT,
    QUERYBANK,
    SELECTION,
)
from medembed.cache.reader import find_splits
from medembed.common.errors import BadInput, BadRun, NotFound
from medembed.common.files import read_json, relative_to, resolve_recorded
from medembed.common.querybank import QueryBank
from medembed.common.tensors import embed_in_chunks, module_device

__all__ = ["AdaptedRun", "QUERYBANK", "load_adapter_run", "describe_run", "missing_features_message", "portable_features",
           "read_querybank", "run_features_dir"]


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
        """The cache the run was trained on (or was pointed at), where it is now: see `run_features_dir`."""
        return run_features_dir(self.config, self.run_dir)

    def split_files(self) -> dict[str, Path]:
        """The finished split files of the run's features folder; a folder that is gone is named with
        how to re-point the run, not with advice to extract from scratch."""
        folder = self.features_dir
        if not folder.is_dir():
            raise NotFound(missing_features_message(self.checkpoint or self.run_dir, folder))
        return find_splits(folder)

    @property
    def dim(self) -> int:
        if "compact" in self.config:  # a compact run (`adapt.compact`): its heads end in the projection
            return int(self.config["compact"]["dims"])
        return int(self.config["dim"]) * int(self.config.get("ensemble", 1))

    @property
    def querybank(self) -> QueryBank | None:
        """The run's query-bank normalisation, or None where it has none (plain cosine): runs made
        with `--no-querybank`, before query banks existed, or a checkpoint file away from its folder."""
        return read_querybank(self.run_dir)

    def selection(self) -> AdaptedRun | None:
        """A refit run's heads as valid chose them (`selection.safetensors`), before they were trained
        afresh on train + valid; None for any other run. Settings that evaluation chooses on valid (the
        concept detectors' thresholds) are chosen with these, as the query bank was: the refit heads
        have trained on valid, so their valid embeddings would make every threshold look right."""
        path = self.run_dir / SELECTION
        if self.checkpoint is not None or not path.exists():
            return None
        image_head, text_head = build_heads(self.config)
        ckpt.load_heads(path, image_head, text_head)
        if "compact" in self.config:  # a compact run of a refit run: the same projection
            image_head, text_head = _projected(self.run_dir, self.config, image_head, text_head)
        device = module_device(self.image_head)
        return replace(self, image_head=image_head.to(device).eval(), text_head=text_head.to(device).eval())

    def with_features(self, features_dir: str | Path) -> AdaptedRun:
        """The same heads pointed at another cache of the same backbone (e.g. a newly encoded dataset);
        where the run's own training cache is (recorded and found now) is kept for its query bank."""
        config = {k: v for k, v in self.config.items() if k != FEATURES_RELATIVE}
        config.setdefault(TRAINED_ON, {"recorded": self.config.get("features_dir", ""), "now": str(self.features_dir)})
        return replace(self, config={**config, "features_dir": str(features_dir)})

    def training_cache(self) -> tuple[str, Path]:
        """(the features folder config.json recorded, where it is found now) of the cache the run was
        trained on, also after `with_features` pointed the run elsewhere."""
        if TRAINED_ON in self.config:
            return self.config[TRAINED_ON]["recorded"], Path(self.config[TRAINED_ON]["now"])
        return self.config.get("features_dir", ""), self.features_dir


FEATURES_RELATIVE = "features_dir_relative"  # config.json: the features folder relative to the run folder
TRAINED_ON = "trained_on"  # in memory only, after with_features: the training cache, recorded and found now


def portable_features(run_config: dict, run_dir: str | Path) -> dict:
    """config.json's features folder recorded both ways: absolute, and relative to the run folder, so
    a run moved together with its features (or a features folder moved alone, then `cli.py relink`)
    still finds them."""
    return {**run_config, FEATURES_RELATIVE: relative_to(run_config["features_dir"], run_dir)}


def run_features_dir(config: dict, run_dir: str | Path) -> Path:
    """The run's features folder now: relative to the run folder when that resolves, else absolute."""
    return resolve_recorded(config["features_dir"], config.get(FEATURES_RELATIVE), run_dir)


def missing_features_message(run_dir: str | Path, features_dir: str | Path) -> str:
    """What to do when a run's features folder is not where the run recorded it."""
    return (f"{run_dir}: its features folder {features_dir} is not there (moved or deleted?); if it moved, "
            f"`cli.py relink --run {run_dir} --features NEW_FOLDER` re-points the run (checked by provenance), "
            "otherwise extract the same dataset with the same backbone again")


def read_querybank(run_dir: str | Path) -> QueryBank | None:
    """The setting in a run folder's `querybank.json`, or None when there is none."""
    path = Path(run_dir) / QUERYBANK
    if not path.exists():
        return None
    try:
        return QueryBank.from_dict(json.loads(path.read_text())["setting"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: not a query-bank setting ({e})") from e


def load_adapter_run(run_dir: str | Path) -> AdaptedRun:
    """A run folder: `config.json` + `best.safetensors`."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise BadRun(f"{run_dir}: not a run (expected a run folder, an unfreezing run folder or its "
                     "finetuned.safetensors)")
    cfg_path = run_dir / ckpt.CONFIG
    if not cfg_path.exists():
        raise NotFound(f"{cfg_path}: no config.json, not an adapter run folder")
    config = read_json(cfg_path)
    for key in ("head", "dim", "image_dim", "text_dim"):
        if key not in config:
            raise BadRun(f"{cfg_path}: missing {key!r}; was this written by `cli.py adapt`?")
    image_head, text_head = build_heads(config)
    ckpt.load_heads(run_dir / ckpt.BEST, image_head, text_head)
    if "compact" in config:
        image_head, text_head = _projected(run_dir, config, image_head, text_head)
    return AdaptedRun(run_dir, config, image_head.eval(), text_head.eval())


def _projected(run_dir: Path, config: dict, image_head: nn.Module, text_head: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A compact run's heads: these heads followed by its projection (`compact.safetensors`)."""
    tensors, _ = ckpt.read_verified(run_dir / COMPACT)
    projection = tensors.get("projection")
    want = (int(config["dim"]) * int(config.get("ensemble", 1)), int(config["compact"]["dims"]))
    if projection is None or tuple(projection.shape) != want:
        raise BadRun(f"{run_dir / COMPACT}: expected a {want[0]} x {want[1]} projection, as config.json says")
    return Projected(image_head, projection), Projected(text_head, projection)


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
