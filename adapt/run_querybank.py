"""Choosing a run's query-bank normalisation on valid, right after training.

The correction (`common.querybank`) needs only the run's own embeddings of the train split (the
bank) and of the valid split (where k and beta are picked); both caches are at hand when training
ends, so every run leaves `querybank.json` beside its heads and evaluation, search and the index
all rank with the same setting. Beta 0 is in the grid: a run whose valid recall the correction does
not raise keeps plain cosine.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medembed.adapt.run import QUERYBANK, AdaptedRun, load_adapter_run
from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.common.files import write_json
from medembed.common.querybank import QueryBank, choose, side_offset

__all__ = ["BankOffsets", "bank_offsets", "calibrate"]


def calibrate(run_dir: str | Path, run: AdaptedRun | None = None,
              splits: tuple[CachedSplit, CachedSplit] | None = None) -> dict:
    """Pick the setting on valid with the run's chosen heads, write `querybank.json`, return its record:
    {"setting", "bank_split", "valid_plain" and "valid" (mean recall without / with it)}.

    `splits` = (train, valid) already in memory; else both are read from the run's features folder."""
    run_dir = Path(run_dir)
    run = run or load_adapter_run(run_dir)
    if splits is None:
        files = run.split_files()
        missing = [s for s in ("train", "valid") if s not in files]
        if missing:
            raise FileNotFoundError(f"{run.features_dir}: no {' or '.join(missing)} split to choose the query bank on")
        splits = (load_split(files["train"], with_views=False), load_split(files["valid"], with_views=False))
    train, valid = splits
    bank_img, bank_txt = run.embed_images(train.image_features.float()), run.embed_texts(train.caption_features.float())
    img, txt = run.embed_images(valid.image_features.float()), run.embed_texts(valid.caption_features.float())
    with torch.no_grad():
        setting, plain, after = choose(img, txt, valid.caption_image, bank_img, bank_txt, bank_split=train.split,
                                       bank_features=str(Path(run.features_dir).resolve()))
    def recall(summary: dict) -> dict:
        return {k: v for k, v in summary.items() if "R@" in k or k == "mean_recall"}

    record = {"setting": setting.to_dict(), "description": setting.describe(), "valid_plain": recall(plain),
              "valid": recall(after)}
    write_json(run_dir / QUERYBANK, record)
    return record


class BankOffsets:
    """What a run's query bank adds to the cosines of gallery images and captions. The bank's
    embeddings are computed once, on first use; `None` for a side the setting leaves off."""

    def __init__(self, run: AdaptedRun, setting: QueryBank, bank: CachedSplit | None = None):
        self.run, self.setting = run, setting
        self._bank = bank
        self._bank_images: torch.Tensor | None = None
        self._bank_captions: torch.Tensor | None = None

    def _split(self) -> CachedSplit:
        if self._bank is None:
            recorded, found = self.run.training_cache()
            # the bank is the run's training cache (as calibrate records it): take it where the run finds
            # that cache now (moved with the run, relinked, or the run pointed at other data)
            folder = found if self.setting.bank_features in ("", recorded) else Path(self.setting.bank_features)
            files = find_splits(folder) if folder.is_dir() else {}
            if self.setting.bank_split not in files:
                raise FileNotFoundError(
                    f"{self.run.run_dir / QUERYBANK}: its bank, the {self.setting.bank_split} split of {folder}, is not "
                    "there; put the cache back, or delete that file to rank by plain cosine")
            self._bank = load_split(files[self.setting.bank_split], with_views=False)
        return self._bank

    @torch.no_grad()
    def bank_captions(self) -> torch.Tensor:
        """The bank of the image side: the run's unit embeddings of the bank split's captions."""
        if self._bank_captions is None:
            self._bank_captions = self.run.embed_texts(self._split().caption_features.float())
        return self._bank_captions

    @torch.no_grad()
    def bank_images(self) -> torch.Tensor:
        """The bank of the caption side: the run's unit embeddings of the bank split's images."""
        if self._bank_images is None:
            self._bank_images = self.run.embed_images(self._split().image_features.float())
        return self._bank_images

    @torch.no_grad()
    def images(self, emb: torch.Tensor) -> torch.Tensor | None:
        """Offsets of gallery images [N] (unit embeddings of this run) for text queries."""
        if not self.setting.images.active:
            return None
        return side_offset(self.setting.images, emb, self.bank_captions())

    @torch.no_grad()
    def captions(self, emb: torch.Tensor) -> torch.Tensor | None:
        """Offsets of gallery captions [M] for image queries."""
        if not self.setting.captions.active:
            return None
        return side_offset(self.setting.captions, emb, self.bank_images())

    def __call__(self, images: torch.Tensor | None, captions: torch.Tensor | None):
        return (None if images is None else self.images(images), None if captions is None else self.captions(captions))


def bank_offsets(run) -> BankOffsets | None:
    """The run's offsets, or None when it ranks by plain cosine (or is no run folder with a bank:
    anything without a `querybank`, such as a closed-form baseline)."""
    setting = getattr(run, "querybank", None)
    return BankOffsets(run, setting) if setting is not None and setting.active else None
