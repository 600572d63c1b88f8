"""Opening any run reference as a model that can encode new raw images and captions.

A reference is a run folder (heads on a registry backbone's cache), a run folder that also holds a
fine-tuned checkpoint (periodic unfreezing, LiT), or that `finetuned.safetensors` file itself. The
backbone that turns new raw inputs into the features the heads read is the checkpoint's own towers
when there is one, else the registry backbone named in config.json.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from medembed.adapt.run import AdaptedRun, load_adapter_run
from medembed.adapt.tuning.finetuned import CHECKPOINT, FT_MARK, read_finetuned
from medembed.extract.backbones import Backbone, create_backbone


def open_run(ref: str | Path | AdaptedRun) -> AdaptedRun:
    """A loaded run from any reference (a loaded run is returned as it is)."""
    if isinstance(ref, AdaptedRun):
        return ref
    path = Path(ref)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: not a run (expected a run folder, an unfreezing run folder or its "
                             f"{CHECKPOINT})")
        return open_checkpoint(path)
    if (path / CHECKPOINT).exists():
        return replace(open_checkpoint(path / CHECKPOINT), run_dir=path)
    return load_adapter_run(path)


def open_checkpoint(path: str | Path, device: str = "cpu") -> AdaptedRun:
    """A `finetuned.safetensors` (fine-tuned towers + heads) as a run: its heads, the config of the
    training that made them (features_dir: the cache its backbone refreshed) and the backbone."""
    path = Path(path)
    backbone, image_head, text_head, config = read_finetuned(path, device)
    return AdaptedRun(path.parent, config, image_head, text_head, checkpoint=path, backbone=backbone)


def run_backbone(run: AdaptedRun, device: str = "cpu") -> Backbone:
    """The backbone whose raw features the run's heads take: the checkpoint's fine-tuned towers when
    the run came from one, else the registry backbone named in config.json."""
    if run.backbone is not None:
        return run.backbone
    name = run.config.get("backbone", "")
    if not name:
        raise ValueError(f"{run.run_dir}: config.json names no backbone, so new images or captions cannot be encoded")
    if FT_MARK in name:
        raise ValueError(f"{run.run_dir}: trained on features of the fine-tuned backbone {name}, which the registry "
                         f"cannot rebuild; pass the run folder that holds its {CHECKPOINT} instead")
    return create_backbone(name, device=device)
