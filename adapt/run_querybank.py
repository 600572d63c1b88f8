"""Choosing a run's query-bank normalisation on valid, right after training.

The correction (`common.querybank`) needs only the run's own embeddings of the train split (the
bank) and of the valid split (where k and beta are picked); both caches are at hand when training
ends, so every run leaves `querybank.json` beside its heads and evaluation, search and the index
all rank with the same setting. Beta 0 is in the grid: a run whose valid recall the correction does
not raise keeps plain cosine. A run ranking another dataset's pool takes that dataset's own bank,
chosen on its own valid split, or plain cosine (`bank_for`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medembed.adapt.run import QUERYBANK, TRAINED_ON, AdaptedRun, load_adapter_run
from medembed.cache import schema
from medembed.cache.reader import CachedSplit, find_splits, load_split, open_cache, read_dataset
from medembed.common.errors import NotFound
from medembed.common.files import write_json
from medembed.common.querybank import QueryBank, bank_sample, choose, side_offset
from medembed.common.recall_keys import MEAN_RECALL

# rows of each side of the bank split a run's bank holds at most (evenly spaced rows beyond: `bank_sample`;
# roco-rad's train split, 3,722 pairs, is used whole)
BANK_ROWS = 16384

__all__ = ["BANK_ROWS", "BankOffsets", "bank_features", "bank_for", "bank_offsets", "calibrate", "pool_bank",
           "ranks_foreign_pool"]


def _rows_of(x: torch.Tensor, rows: np.ndarray | None) -> torch.Tensor:
    return x if rows is None else x[torch.from_numpy(rows)]


def bank_features(bank: str | Path | CachedSplit, max_rows: int = BANK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, caption features) of a bank split, float32: every row up to `max_rows` per side,
    else the same sample (`bank_sample`) whether the split is in memory or read from its file, where
    only the sampled rows are read."""
    if isinstance(bank, CachedSplit):
        return (_rows_of(bank.image_features, bank_sample(bank.n_images, max_rows)).float(),
                _rows_of(bank.caption_features, bank_sample(bank.n_captions, max_rows)).float())
    out = []
    with open_cache(bank) as f:
        for name in (schema.IMAGE_FEATURES, schema.CAPTION_FEATURES):
            rows = bank_sample(f[name].shape[0], max_rows)
            out.append(torch.from_numpy(read_dataset(f, name, () if rows is None else rows)).float())
    return out[0], out[1]


@torch.no_grad()
def _choose_on(run: AdaptedRun, train: CachedSplit | Path, valid: CachedSplit, split: str):
    """(setting, valid recall with plain cosine, with the setting, the bank's (image, caption) embeddings):
    k and beta chosen on `valid` against a bank of `train`'s rows, embedded by the run."""
    train_img, train_txt = bank_features(train)
    bank = run.embed_images(train_img), run.embed_texts(train_txt)
    img, txt = run.embed_images(valid.image_features.float()), run.embed_texts(valid.caption_features.float())
    setting, plain, after = choose(img, txt, valid.caption_image, *bank, bank_split=split,
                                   bank_features=str(Path(run.features_dir).resolve()), bank_rows=BANK_ROWS)
    return setting, plain, after, bank


def calibrate(run_dir: str | Path, run: AdaptedRun | None = None,
              splits: tuple[CachedSplit | Path, CachedSplit] | None = None) -> dict:
    """Pick the setting on valid with the run's chosen heads, write `querybank.json`, return its record:
    {"setting", "bank_split", "valid_plain" and "valid" (mean recall without / with it)}.

    `splits` = (train, valid) already in memory, train possibly as its file (a streamed split, of which
    only the bank's rows are read); else both come from the run's features folder (of train only the
    bank's rows: at most `BANK_ROWS` per side)."""
    run_dir = Path(run_dir)
    run = run or load_adapter_run(run_dir)
    if splits is None:
        files = run.split_files()
        missing = [s for s in ("train", "valid") if s not in files]
        if missing:
            raise NotFound(f"{run.features_dir}: no {' or '.join(missing)} split to choose the query bank on")
        train, valid, split = files["train"], load_split(files["valid"], with_views=False), "train"
    else:
        train, valid = splits
        split = train.split if isinstance(train, CachedSplit) else "train"
    setting, plain, after, _ = _choose_on(run, train, valid, split)

    def recall(summary: dict) -> dict:
        return {k: v for k, v in summary.items() if "R@" in k or k == MEAN_RECALL}

    record = {"setting": setting.to_dict(), "description": setting.describe(), "valid_plain": recall(plain),
              "valid": recall(after)}
    write_json(run_dir / QUERYBANK, record)
    return record


class BankOffsets:
    """What a run's query bank adds to the cosines of gallery images and captions. The bank's
    embeddings are computed once, on first use (or given, already computed); `None` for a side the
    setting leaves off."""

    def __init__(self, run: AdaptedRun, setting: QueryBank, bank_images: torch.Tensor | None = None,
                 bank_captions: torch.Tensor | None = None):
        self.run, self.setting = run, setting
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bank_images = bank_images
        self._bank_captions = bank_captions

    def _bank_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's raw (image, caption) features: its recorded rows of the run's training cache."""
        if self._features is None:
            recorded, found = self.run.training_cache()
            # the bank is the run's training cache (as calibrate records it): take it where the run finds
            # that cache now (moved with the run, relinked, or the run pointed at other data)
            folder = found if self.setting.bank_features in ("", recorded) else Path(self.setting.bank_features)
            files = find_splits(folder) if folder.is_dir() else {}
            if self.setting.bank_split not in files:
                raise NotFound(
                    f"{self.run.run_dir / QUERYBANK}: its bank, the {self.setting.bank_split} split of {folder}, is not "
                    "there; put the cache back, or delete that file to rank by plain cosine")
            self._features = bank_features(files[self.setting.bank_split], self.setting.bank_rows)
        return self._features

    @torch.no_grad()
    def bank_captions(self) -> torch.Tensor:
        """The bank of the image side: the run's unit embeddings of the bank split's captions."""
        if self._bank_captions is None:
            self._bank_captions = self.run.embed_texts(self._bank_features()[1])
        return self._bank_captions

    @torch.no_grad()
    def bank_images(self) -> torch.Tensor:
        """The bank of the caption side: the run's unit embeddings of the bank split's images."""
        if self._bank_images is None:
            self._bank_images = self.run.embed_images(self._bank_features()[0])
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


def ranks_foreign_pool(run) -> bool:
    """Does the run rank a pool other than the cache it was trained on (`eval --data`, `search` or
    `serve --data` over another dataset)? Its training bank then describes the wrong data."""
    if TRAINED_ON not in getattr(run, "config", {}):
        return False
    _, trained = run.training_cache()
    return Path(run.features_dir).resolve() != Path(trained).resolve()


def pool_bank(run) -> BankOffsets | None:
    """A foreign pool's own query bank: its dataset's train split as the bank, k and beta chosen on its
    valid split (the run's own setting was chosen for other data); None (plain cosine) when that
    dataset has no train or no valid split encoded, or when no setting beats plain cosine on its valid."""
    files = find_splits(run.features_dir)
    if not {"train", "valid"} <= set(files):
        return None
    setting, _, _, (bank_img, bank_txt) = _choose_on(run, files["train"], load_split(files["valid"], with_views=False),
                                                     "train")
    if not setting.active:
        return None
    return BankOffsets(run, setting, bank_images=bank_img, bank_captions=bank_txt)


def bank_for(run) -> tuple[BankOffsets | None, str]:
    """(the offsets the run ranks with, None for plain cosine; how it ranks, in words). Its own pool:
    the bank chosen after training (`querybank.json`). Another dataset's pool: that dataset's own bank
    (`pool_bank`), or plain cosine when it has none: a bank from the training data describes other
    images and captions, and ranked one institution's data below plain cosine."""
    setting = getattr(run, "querybank", None)
    if setting is None or not setting.active:
        return None, "plain cosine"
    if not ranks_foreign_pool(run):
        return BankOffsets(run, setting), setting.describe() + " chosen on valid"
    offsets = pool_bank(run)
    if offsets is None:
        return None, ("plain cosine (the pool's dataset has no train and valid split to build and choose a query bank "
                      "of its own, or none beat plain cosine on its valid split)")
    return offsets, offsets.setting.describe() + ", from the pool's own dataset (bank its train split, chosen on its valid)"


def bank_offsets(run) -> BankOffsets | None:
    """The run's offsets (see `bank_for`), or None when it ranks by plain cosine (or is no run folder
    with a bank: anything without a `querybank`, such as a closed-form baseline)."""
    return bank_for(run)[0]
