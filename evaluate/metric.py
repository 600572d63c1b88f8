"""What the eval pipeline knows of a metric, so that adding one is one module and one registry line.

A metric module declares `METRIC = Metric(...)`: its section name, the keys it produces, how it
scores a column (`score`) and what a random scorer gets (`chance`), both from one `ColumnInputs`,
and what data it needs (`Needs`). `evaluate.metrics.METRICS` lists the metrics in report order;
planning, scoring, report.md, the console table and `eval --skip` all iterate it, so none of them
names a section.

A section's settings are the `EvalOptions` field named after it (`EvalOptions.settings`): `None` for
a metric without any.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from medembed.cache.reader import CachedSplit
from medembed.model.embedding import EmbeddingModel

S = TypeVar("S")  # a metric's settings (its config dataclass, or None)
T = TypeVar("T")


def has_concepts(split: CachedSplit | None) -> bool:
    """The split carries concept labels (at least one positive)."""
    return split is not None and split.concepts is not None and split.concepts.shape[1] > 0 and split.concepts.nnz > 0


@dataclass(frozen=True)
class Needs:
    """What a section reads beyond the evaluated split's image embeddings. Planning loads the splits
    that the asked-for sections need; scoring skips a section on a pool that lacks them (and the
    report says why)."""

    texts: bool = False  # caption embeddings (freed after the last section that reads them)
    train: bool = False  # learns from the train split
    valid: bool = False  # chooses its settings on the valid split (without one: on part of train)
    concepts: bool = False  # concept labels on the evaluated split (and on train, when it learns from train)
    prompts: bool = False  # the cache's concept prompt features

    def met_by(self, test: CachedSplit, train: CachedSplit | None) -> bool:
        if self.concepts and not has_concepts(test):
            return False
        if self.prompts and test.concept_text_features is None:
            return False
        if self.train and (train is None or (self.concepts and not has_concepts(train))):
            return False
        return True


@dataclass
class ColumnInputs:
    """What one column offers its sections: the splits, K, and the column's embeddings, computed on
    first use and shared (few-shot and detection embed the train images once between them).
    `model` is None for the chance column, which scores from labels alone."""

    test: CachedSplit
    train: CachedSplit | None
    valid: CachedSplit | None
    ks: list[int]
    memory_mb: float
    model: EmbeddingModel | None = None
    progress: bool = False  # a section's long loops may show a bar on stderr (eval's progress setting)
    _memo: dict[str, object] = field(default_factory=dict, init=False, repr=False)

    def _once(self, name: str, make: Callable[[EmbeddingModel], T]) -> T:
        if name not in self._memo:
            if self.model is None:
                raise ValueError(f"the chance column has no embeddings ({name}): score it from labels")
            self._memo[name] = make(self.model)
        return self._memo[name]

    def images(self) -> torch.Tensor:
        return self._once("images", lambda m: m.images(self.test.image_features))

    def texts(self) -> torch.Tensor:
        return self._once("texts", lambda m: m.texts(self.test.caption_features))

    def train_images(self) -> torch.Tensor:
        return self._once("train_images", lambda m: m.images(self.train.image_features))

    def valid_images(self) -> torch.Tensor:
        return self._once("valid_images", lambda m: m.images(self.valid.image_features))

    def tuning_images(self, split: str) -> torch.Tensor:
        """Image embeddings of `split` ("train" or "valid") by the model that chooses settings on valid
        (`EmbeddingModel.tuner`): the column's own, except for a refit run, whose valid was trained on."""
        if not self.tuned_apart:
            return self.train_images() if split == "train" else self.valid_images()
        data = self.train if split == "train" else self.valid
        return self._once(f"tuning_{split}_images", lambda m: m.tuner.images(data.image_features))

    @property
    def tuned_apart(self) -> bool:
        """Settings are chosen with other embeddings than the column's (a refit run's selection heads)."""
        return self.model is not None and self.model.chooser is not None

    def concept_prompts(self) -> torch.Tensor | None:
        """[C, D] prompt-ensemble embeddings of the evaluated split's concepts (None without prompt features)."""
        if self.test.concept_text_features is None:
            return None
        return self._once("concept_prompts", lambda m: m.concept_prompts(self.test.concept_text_features))

    def offsets(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the run's query bank adds to each gallery image's / caption's cosines ((None, None): plain cosine)."""
        return self._once("offsets", lambda m: m.offsets(self.images(), self.texts()))

    def ranked_offsets(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The offsets a section ranked with, (None, None) when none did: example grids rank the same way."""
        return self._memo.get("offsets", (None, None))

    def release_texts(self) -> None:
        """Free the caption embeddings (on a 100k pool they are 100 MB) once no section needs them."""
        self._memo.pop("texts", None)


@dataclass
class Scores:
    """One section's numbers for one column, and what is built on them."""

    metrics: dict[str, float]
    # per-query 0/1 outcomes behind a rate metric (in %), by key: the paired difference with the first run
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)  # what the section's figure draws
    detail: object = None  # the module's full result (e.g. per-concept numbers for the report's CSV)


@dataclass(frozen=True)
class SectionView(Generic[S]):
    """What a section's part of report.md is written from."""

    title: str
    columns: dict[str, dict[str, float]]  # column -> its metrics, in table order
    keys: list[str]  # the keys this section produced, first-seen order over the columns
    details: dict[str, object]  # column -> this section's `Scores.detail`
    first: str  # the first run: the one the others are paired with, whose details the text describes
    test: CachedSplit  # the first run's evaluated split
    settings: S
    notes: list[str]  # why the section has no numbers, when it has none (Markdown lines)
    paired: list[str]  # every paired-comparison sentence (the retrieval section lists them)
    files: dict[str, str]  # this section's figure / table files, relative to the report


@dataclass(frozen=True)
class Metric(Generic[S]):
    """One section of an evaluation. `keys` is a regular expression every key the section produces
    matches (scoring refuses a stray key, so two sections never overwrite each other's numbers);
    `headline` the keys the console table shows (default: all). `report` writes the section's part
    of report.md (default: its title and one table); `optional` sections can be left out with `--skip`."""

    section: str
    keys: str
    score: Callable[[ColumnInputs, S], Scores]
    chance: Callable[[ColumnInputs, S], Scores]
    needs: Needs = Needs()
    title: str = ""  # the report's heading (default: the section name)
    name: str = ""  # how a sentence names it, e.g. "few-shot" (default: the section name)
    headline: str = ""
    report: Callable[[SectionView[S]], list[str]] | None = None
    optional: bool = True

    def __post_init__(self) -> None:
        for attr, default in (("title", self.section), ("name", self.section), ("headline", self.keys)):
            if not getattr(self, attr):
                object.__setattr__(self, attr, default)

    def owns(self, key: str) -> bool:
        return re.fullmatch(self.keys, key) is not None

    def is_headline(self, key: str) -> bool:
        return re.fullmatch(self.headline, key) is not None
