"""One name -> image tower, text tower, preprocessing, tokenizer and provenance.

Offline by default: the command line puts the Hugging Face hub in offline mode (HF_HUB_OFFLINE=1
unless set otherwise) before any model is built, so a missing model fails fast instead of hanging
on a network that is not there.
"""
from medembed.extract.backbones.core import PROVENANCE_KEYS, Backbone, BlockGroup, Tower
from medembed.extract.backbones.registry import (
    BUILTIN_BACKBONES,
    DEFAULT_BACKBONE,
    FAMILIES,
    NAME_PATTERNS,
    create_backbone,
    family_for,
    family_of,
    list_backbones,
)
from medembed.extract.backbones.transforms import AugmentConfig

__all__ = [
    "AugmentConfig",
    "Backbone",
    "BlockGroup",
    "BUILTIN_BACKBONES",
    "DEFAULT_BACKBONE",
    "FAMILIES",
    "NAME_PATTERNS",
    "PROVENANCE_KEYS",
    "Tower",
    "create_backbone",
    "family_for",
    "family_of",
    "list_backbones",
]
