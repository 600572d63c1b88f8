"""Shared pieces of tuning that families build on: which blocks are unlocked, where a tower is cut.

A tower whose bottom is frozen computes the same activations every step, so tuning runs the frozen
trunk once per image and caption and trains from the activations entering the first unlocked block
(`adapt.tuning.towers`). Each family builds its own top (`BackboneFamily.cached_top`) from these."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from medembed.common.errors import MedembedError
from medembed.extract.backbones.core import Backbone


class MidCacheUnsupported(MedembedError, ValueError):
    """The backbone's layout cannot be run from cached mid-layer activations (the raw path still can)."""


def plain(f: Callable, *args):
    """Run a block as it is (the alternative is activation checkpointing)."""
    return f(*args)


def first_unlocked(blocks: Sequence[nn.Module]) -> int:
    """Index of the lowest block with a trainable parameter; len(blocks) when all are frozen."""
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


def unlock_top_blocks(backbone: Backbone, image: int | str, text: int | str) -> None:
    """The last `image` of `image_blocks()` and the last `text` of `text_blocks()` trainable ("all":
    every block): how a family unlocks whose library has no locking of its own."""
    for blocks, n in ((backbone.image_blocks(), image), (backbone.text_blocks(), text)):
        for block in blocks if n == "all" else blocks[len(blocks) - n:] if n else []:
            for p in block.parameters():
                p.requires_grad_(True)


def all_frozen(*modules) -> bool:
    """No trainable parameter among these modules or bare parameters (None entries are skipped)."""
    return not any(p.requires_grad for m in modules if m is not None for p in
                   (m.parameters() if isinstance(m, nn.Module) else [m]))


@dataclass
class TowerCut:
    """Where one tower is cut: blocks[:cut] (and the stem) are frozen and cached, the rest trains."""

    cut: int
    n_blocks: int
