"""A backbone family: everything model-specific about one kind of backbone, kept with the model.

The rest of the toolkit never asks "is this an open_clip model?": it asks the backbone's family.
A family builds backbones from the names it accepts, recognises backbones it built (fine-tuned
copies included), builds the unlocked top that tuning runs from cached mid-layer activations, and
draws the saliency map that says why an image matched. The registry (`registry.FAMILIES`) is data:
adding a family is one module defining a `FAMILY` and one line there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medembed.extract.backbones.core import Backbone
from medembed.extract.backbones.transforms import AugmentConfig

# (backbone, preprocessed pixels [1, ...], score of raw image features) -> (map [h, w], score):
# the map is unnormalised, at the resolution the family computes it; the caller resizes it.
Saliency = Callable[[Backbone, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BackboneFamily:
    name: str
    patterns: tuple[str, ...]  # the names it accepts, as a person would write them (for errors and help)
    accepts: Callable[[str], bool]
    create: Callable[[str, AugmentConfig], Backbone]
    owns: Callable[[Backbone], bool]
    cached_top: Callable[[Backbone, bool], object] | None = None  # (backbone, image side unlocked) -> top
    saliency: Saliency | None = None
