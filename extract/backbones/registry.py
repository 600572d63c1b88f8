"""Name -> Backbone. The name is the whole identity of a feature space: caches are filed under it.

`FAMILIES` is data: each family (a module's `FAMILY`) says which names it builds and owns its
model-specific code (loader, unlocking and checkpointing for tuning, cached top, saliency map,
portable tokenizer); the first family accepting a name builds it."""
from __future__ import annotations

import torch

from medembed.common.errors import BadOption
from medembed.extract.backbones.core import Backbone
from medembed.extract.backbones.effnet_minilm import FAMILY as EFFNET_MINILM
from medembed.extract.backbones.effnet_minilm import MS_NAME, NAME
from medembed.extract.backbones.family import BackboneFamily
from medembed.extract.backbones.open_clip_family import FAMILY as OPEN_CLIP
from medembed.extract.backbones.open_clip_family import TINY_CLIP
from medembed.extract.backbones.transforms import AugmentConfig

FAMILIES: tuple[BackboneFamily, ...] = (EFFNET_MINILM, OPEN_CLIP)

# the multi-scale, two-view variant: +4.7 / +2.6 test R@10 on roco-rad over the single pool (BENCHMARKS.md)
DEFAULT_BACKBONE = MS_NAME
BUILTIN_BACKBONES = (MS_NAME, NAME, TINY_CLIP)
NAME_PATTERNS = OPEN_CLIP.patterns


def list_backbones() -> list[str]:
    """The named backbones; any open_clip model is reachable through NAME_PATTERNS as well."""
    return list(BUILTIN_BACKBONES)


def family_for(name: str) -> BackboneFamily:
    """The family that builds `name`; ValueError naming the valid choices for unknown names."""
    for family in FAMILIES:
        if family.accepts(name):
            return family
    raise BadOption(f"unknown backbone '{name}'. Known: {', '.join(BUILTIN_BACKBONES)}; or {'; '.join(NAME_PATTERNS)}.")


def family_of(backbone: Backbone) -> BackboneFamily | None:
    """The family a built backbone (or a fine-tuned copy of one) belongs to; None for a stand-in."""
    return next((f for f in FAMILIES if f.owns(backbone)), None)


def create_backbone(name: str, device: str | torch.device = "cpu",
                    augment: AugmentConfig = AugmentConfig()) -> Backbone:
    """Build a backbone on `device` in eval mode; ValueError naming the valid choices for unknown names."""
    return family_for(name).create(name, augment).to(device)
