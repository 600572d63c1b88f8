"""Opening any run reference as a model that can encode new raw images and captions, and pointing
runs at a new dataset encoded by their own backbone.

A reference is a run folder (heads on a registry backbone's cache), a run folder that also holds a
fine-tuned checkpoint (periodic unfreezing, LiT), or that `finetuned.safetensors` file itself. The
backbone that turns new raw inputs into the features the heads read is the checkpoint's own towers
when there is one, else the registry backbone named in config.json.

A run's heads only understand the raw features of the backbone they were trained on. For a run
made with periodic unfreezing that backbone exists nowhere but in the run's
`finetuned.safetensors`, so a new dataset has to be encoded with the checkpoint's own towers; it
is extracted once, like any dataset, into `{features_root}/{dataset}/{backbone}/` (the fine-tuned
backbone's name carries its weights hash, so the folder can never be mistaken for the base
backbone's), and later calls find it up to date. `eval --data`, `search --data`, the page, the
index and export all open runs here.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from medembed.adapt.run import AdaptedRun, load_adapter_run
from medembed.adapt.tuning.finetuned import CHECKPOINT, FT_MARK, read_finetuned
from medembed.common.device import resolve_device
from medembed.common.errors import BadRun
from medembed.extract.backbones import Backbone, create_backbone
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT, ExtractConfig, extract
from medembed.extract.records import Dataset


def open_run(ref: str | Path | AdaptedRun) -> AdaptedRun:
    """A loaded run from any reference (a loaded run is returned as it is)."""
    if isinstance(ref, AdaptedRun):
        return ref
    path = Path(ref)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BadRun(f"{path}: not a run (expected a run folder, an unfreezing run folder or its "
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
        raise BadRun(f"{run.run_dir}: config.json names no backbone, so new images or captions cannot be encoded")
    if FT_MARK in name:
        raise BadRun(f"{run.run_dir}: trained on features of the fine-tuned backbone {name}, which the registry "
                     f"cannot rebuild; pass the run folder that holds its {CHECKPOINT} instead")
    return create_backbone(name, device=device)


def as_dataset(data: str | Path | Dataset, follow_links: bool = False, readable_paths: bool = False) -> Dataset:
    """The dataset at `data`, read under the folder's rule (`follow_links`) and named by keyed hashes
    where its paths may identify patients (unless `readable_paths`), as `extract` reads it."""
    if isinstance(data, Dataset):
        return data
    return load_dataset(str(data), follow_links=follow_links, readable_paths=readable_paths)


def encode_dataset(run, data: str | Path | Dataset, splits: list[str] | None = None,
                   features_root: str | Path = DEFAULT_FEATURES_ROOT, batch_size: int = 64, workers: int = 2,
                   progress: bool = True) -> Path:
    """Extract `splits` (default: all) of the dataset at `data` with `run`'s backbone; returns the
    cache folder. A split already extracted by the same weights is reused, not recomputed."""
    dataset = as_dataset(data)
    device = resolve_device("auto").type
    backbone = run_backbone(run, device=device)
    backbone.to(device)
    # scoring a dataset the run was not trained on: images shared by its splits only matter to the
    # sections that learn from its train split, so they are encoded, with the extractor's warning shown
    cfg = ExtractConfig(data=str(dataset.root), backbone=backbone.name, splits=splits, batch_size=batch_size,
                        workers=workers, device=device, out=str(features_root), progress=progress,
                        allow_split_overlap=True)
    summary = extract(cfg, backbone=backbone, dataset=dataset)
    for warning in [*summary.warnings, *summary.refused] if progress else []:  # refused: what was not read, and why
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return Path(summary.out_dir)


def open_runs(refs: list, data: str | Path | Dataset | None = None, splits: list[str] | None = None,
              features_root: str | Path = DEFAULT_FEATURES_ROOT, progress: bool = True, follow_links: bool = False,
              readable_paths: bool = False) -> list[AdaptedRun]:
    """Load each run reference (run folder, unfreezing run folder, fine-tuned checkpoint, or an
    already loaded run); with `data`, point every run at that dataset encoded by its own backbone
    (`follow_links`, `readable_paths`: how the folder is read, as `extract` has them)."""
    runs = [open_run(r) for r in refs]
    if data is None:
        return runs
    dataset = as_dataset(data, follow_links, readable_paths)  # read once for all runs
    return [run.with_features(encode_dataset(run, dataset, splits, features_root, progress=progress)) for run in runs]
