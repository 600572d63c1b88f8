"""Name -> Backbone. The name is the whole identity of a feature space: caches are filed under it."""
from __future__ import annotations

import torch

from medembed.extract.backbones.core import Backbone
from medembed.extract.backbones.effnet_minilm import MS_NAME as EFFNET_MS_MINILM
from medembed.extract.backbones.effnet_minilm import NAME as EFFNET_MINILM
from medembed.extract.backbones.effnet_minilm import create_effnet_minilm
from medembed.extract.backbones.open_clip_family import TINY_CLIP, create_open_clip, parse_open_clip_name
from medembed.extract.backbones.transforms import AugmentConfig

# the multi-scale, two-view variant: +4.7 / +2.6 test R@10 on roco-rad over the single pool (BENCHMARKS.md)
DEFAULT_BACKBONE = EFFNET_MS_MINILM
BUILTIN_BACKBONES = (EFFNET_MS_MINILM, EFFNET_MINILM, TINY_CLIP)
NAME_PATTERNS = (
    "hf-hub:ORG/REPO (an open_clip model in the local Hugging Face cache)",
    "local-dir:/path (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin)",
    "ARCH or ARCH@PRETRAINED_TAG or ARCH@/path/to/checkpoint, ARCH one of open_clip.list_models()",
)


def list_backbones() -> list[str]:
    """The named backbones; any open_clip model is reachable through NAME_PATTERNS as well."""
    return list(BUILTIN_BACKBONES)


def create_backbone(name: str, device: str | torch.device = "cpu",
                    augment: AugmentConfig = AugmentConfig()) -> Backbone:
    """Build a backbone on `device` in eval mode; ValueError naming the valid choices for unknown names."""
    if name in (EFFNET_MINILM, EFFNET_MS_MINILM):
        backbone = create_effnet_minilm(augment, multiscale_views=name == EFFNET_MS_MINILM)
    else:
        spec = parse_open_clip_name(name)
        if spec is None:
            raise ValueError(
                f"unknown backbone '{name}'. Known: {', '.join(BUILTIN_BACKBONES)}; "
                f"or {'; '.join(NAME_PATTERNS)}.")
        backbone = create_open_clip(spec, augment)
    return backbone.to(device)
