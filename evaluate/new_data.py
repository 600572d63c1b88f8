"""The splits `eval --data` encodes: the one scored, plus the ones its sections learn from.

Scoring a run on a new dataset encodes that dataset with the run's own backbone
(`model.runs.open_runs`); a section that fits on train or chooses settings on valid needs those
splits encoded too, so the plan says which before anything is encoded, and how to avoid them.
"""
from __future__ import annotations

from pathlib import Path

from medembed.common.errors import Incompatible
from medembed.extract.records import Dataset
from medembed.model.runs import as_dataset


def eval_splits(data: str | Path | Dataset, split: str, needs_train: bool, needs_valid: bool,
                log=print, for_bank: bool = False) -> tuple[Dataset, list[str]]:
    """The dataset, and the splits to encode: the one scored, plus train when few-shot, detection
    or the closed form learn from it and valid when the closed form chooses its setting on it.
    Says which and why before anything is encoded, and how to avoid the extra ones."""
    dataset = as_dataset(data)
    names = list(dataset.splits)
    if not dataset.records.n_captions():
        raise Incompatible(f"{data}: an image-only collection (no captions): evaluation needs captions; search it by "
                           "text or image with `cli.py search --data` or `cli.py serve --data` instead")
    if split not in names:
        raise Incompatible(f"{data}: no split {split} (splits here: {', '.join(names)})")
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
