"""One name -> image tower, text tower, preprocessing, tokenizer and provenance.

Offline by default: the Hugging Face hub is put in offline mode before anything imports it, so a
missing model fails fast instead of hanging on a network that is not there.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from medembed.extract.backbones.core import PROVENANCE_KEYS, Backbone, BlockGroup, Tower  # noqa: E402
from medembed.extract.backbones.registry import BUILTIN_BACKBONES, DEFAULT_BACKBONE, NAME_PATTERNS, create_backbone, list_backbones  # noqa: E402
from medembed.extract.backbones.transforms import AugmentConfig  # noqa: E402

__all__ = [
    "AugmentConfig",
    "Backbone",
    "BlockGroup",
    "BUILTIN_BACKBONES",
    "DEFAULT_BACKBONE",
    "NAME_PATTERNS",
    "PROVENANCE_KEYS",
    "Tower",
    "create_backbone",
    "list_backbones",
]
