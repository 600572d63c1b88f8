"""A backbone family: everything model-specific about one kind of backbone, kept with the model.

The rest of the toolkit never asks "is this an open_clip model?": it asks the backbone's family.
A family builds backbones from the names it accepts, recognises backbones it built (fine-tuned
copies included), unlocks the top blocks of their towers for tuning (and switches on its library's
own activation checkpointing where it has one), builds the unlocked top that tuning runs from cached
mid-layer activations, draws the saliency map that says why an image matched, and hands its
tokenizer over in a form other programs read. A part it cannot do is None, and the caller refuses
in one line naming the backbone. The registry (`registry.FAMILIES`) is data: adding a family is one
module defining a `FAMILY` and one line there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medembed.extract.backbones.core import Backbone
from medembed.extract.backbones.tops import unlock_top_blocks
from medembed.extract.backbones.transforms import AugmentConfig

# (backbone, preprocessed pixels [1, ...], score of raw image features) -> (map [h, w], score):
# the map is unnormalised, at the resolution the family computes it; the caller resizes it.
Saliency = Callable[[Backbone, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
# (backbone, image blocks, text blocks) -> None: make the top N blocks of each tower trainable ("all": the
# whole tower, 0: none), every other tower parameter having been frozen by the caller
Unlock = Callable[[Backbone, int | str, int | str], None]


@dataclass(frozen=True)
class PortableTokenizer:
    """A backbone's tokenizer as a program without medembed runs it: the `tokenizers` package's
    tokenizer.json plus what the caller does around it (cut at `max_length` word pieces, pad the
    batch to its longest text with `pad_id`), so the ids equal `Backbone.tokenize`'s."""

    max_length: int
    pad_id: int
    save: Callable[[Path], None]  # writes tokenizer.json to the path given


@dataclass(frozen=True)
class BackboneFamily:
    name: str
    patterns: tuple[str, ...]  # the names it accepts, as a person would write them (for errors and help)
    accepts: Callable[[str], bool]
    create: Callable[[str, AugmentConfig], Backbone]
    owns: Callable[[Backbone], bool]
    unlock: Unlock = unlock_top_blocks
    # switches on the library's own activation checkpointing over the whole towers (tuning on raw inputs)
    grad_checkpointing: Callable[[Backbone], None] | None = None
    cached_top: Callable[[Backbone, bool], object] | None = None  # (backbone, image side unlocked) -> top
    saliency: Saliency | None = None
    # the backbone's tokenizer in portable form; None (or a None answer) when it has none
    portable_tokenizer: Callable[[Backbone], PortableTokenizer | None] | None = None
