"""What `eval` and `search` score: a run's own cache, or new raw images and captions.

A run's heads only understand the raw features of the backbone they were trained on. For a run
made with periodic unfreezing that backbone exists nowhere but in the run's
`finetuned.safetensors`, so a new dataset has to be encoded with the checkpoint's own towers; it
is extracted once, like any dataset, into `{features_root}/{dataset}/{backbone}/` (the fine-tuned
backbone's name carries its weights hash, so the folder can never be mistaken for the base
backbone's), and later calls find it up to date.
"""
from __future__ import annotations

import sys
from pathlib import Path

from medembed.adapt.run import AdaptedRun
from medembed.adapt.tuning.runs import open_run, run_backbone
from medembed.common.device import resolve_device
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import ExtractConfig, extract
from medembed.extract.records import Dataset


def _as_dataset(data: str | Path | Dataset, follow_links: bool = False, readable_paths: bool = False) -> Dataset:
    """The dataset at `data`, read under the folder's rule (`follow_links`) and named by keyed hashes
    where its paths may identify patients (unless `readable_paths`), as `extract` reads it."""
    if isinstance(data, Dataset):
        return data
    return load_dataset(str(data), follow_links=follow_links, readable_paths=readable_paths)


def encode_dataset(run, data: str | Path | Dataset, splits: list[str] | None = None,
                   features_root: str | Path = "features", batch_size: int = 64, workers: int = 2,
                   progress: bool = True) -> Path:
    """Extract `splits` (default: all) of the dataset at `data` with `run`'s backbone; returns the
    cache folder. A split already extracted by the same weights is reused, not recomputed."""
    dataset = _as_dataset(data)
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
              features_root: str | Path = "features", progress: bool = True, follow_links: bool = False,
              readable_paths: bool = False) -> list[AdaptedRun]:
    """Load each run reference (run folder, unfreezing run folder, fine-tuned checkpoint, or an
    already loaded run); with `data`, point every run at that dataset encoded by its own backbone
    (`follow_links`, `readable_paths`: how the folder is read, as `extract` has them)."""
    runs = [open_run(r) for r in refs]
    if data is None:
        return runs
    dataset = _as_dataset(data, follow_links, readable_paths)  # read once for all runs
    return [run.with_features(encode_dataset(run, dataset, splits, features_root, progress=progress)) for run in runs]


def eval_splits(data: str | Path | Dataset, split: str, needs_train: bool, needs_valid: bool,
                log=print, for_bank: bool = False) -> tuple[Dataset, list[str]]:
    """The dataset, and the splits to encode: the one scored, plus train when few-shot, detection
    or the closed form learn from it and valid when the closed form chooses its setting on it.
    Says which and why before anything is encoded, and how to avoid the extra ones."""
    dataset = _as_dataset(data)
    names = list(dataset.splits)
    if not dataset.records.n_captions():
        raise ValueError(f"{data}: an image-only collection (no captions): evaluation needs captions; search it by "
                         "text or image with `cli.py search --data` or `cli.py serve --data` instead")
    if split not in names:
        raise ValueError(f"{data}: no split {split} (splits here: {', '.join(names)})")
    wanted = [split]
    if needs_train and split != "train" and "train" in names:
        wanted.append("train")
        log(f"eval --data: the train split ({len(dataset.split('train'))} images) is encoded too: few-shot, "
            "detection and the closed-form baseline learn from it (--skip fewshot,detection --no-closed-form "
            "leaves it out)")
    if needs_valid and split != "valid" and "valid" in names:
        wanted.append("valid")
        log(f"eval --data: the valid split ({len(dataset.split('valid'))} images) is encoded too: the "
            "closed-form baseline and concept detection choose their settings on it (--no-closed-form "
            "--skip detection leaves it out)")
    bank = [s for s in ("train", "valid") if s in names and s not in wanted]
    if for_bank and split not in ("train", "valid") and {"train", "valid"} <= set(names) and bank:
        wanted += bank
        log(f"eval --data: the {' and '.join(bank)} split{'s are' if len(bank) > 1 else ' is'} encoded too: a run "
            "ranks another dataset with that dataset's own query bank (its train split, chosen on its valid split)")
    return dataset, wanted
