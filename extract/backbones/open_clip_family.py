"""Every open_clip model behind the one Backbone interface.

Names: `hf-hub:ORG/REPO`, `local-dir:/path` (open_clip_config.json with model_cfg + preprocess_cfg,
next to open_clip_model.safetensors / open_clip_pytorch_model.bin), `ARCH` (random init, seeded) or
`ARCH@TAG` (a pretrained tag, or a checkpoint file path), and `tiny-clip`, a seeded random-init
miniature for fast tests. Features are encode_image / encode_text with normalize=False.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medembed.common.hashing import sha256_files, tensor_digest
from medembed.extract.backbones.core import Backbone, BlockGroup, Tower, seeded_init
from medembed.extract.backbones.transforms import AugmentConfig, augment_transform

TINY_CLIP = "tiny-clip"
TINY_CLIP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / f"{TINY_CLIP}.json"
RANDOM_INIT_SEED = 0
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

# Where each tower keeps its repeated blocks, relative to the open_clip model (first match wins).
IMAGE_BLOCK_PATHS = ("visual.transformer.resblocks", "visual.trunk.blocks", "visual.trunk.stages",
                     "visual.trunk.layers")
RESNET_STAGES = ("visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4")
TEXT_BLOCK_PATHS = ("transformer.resblocks", "text.transformer.resblocks", "text.transformer.encoder.layer",
                    "text.transformer.encoder.block", "text.transformer.layers", "text.transformer.layer")
# Parameters outside the blocks belong to the stem when a path component is one of these (or names an
# embedding); everything else outside the blocks (final norms, projections, pooling heads) is the head.
STEM_COMPONENTS = {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3", "ln_pre", "norm_pre", "cls_token",
                   "class_embedding", "stem", "reg_token"}
TOWER_CONTAINERS = {"visual", "trunk", "text", "transformer"}
NOT_A_TOWER = {"logit_scale", "logit_bias"}
NOT_TEXT_CHILDREN = {"visual", "text_decoder"}


@dataclass(frozen=True)
class OpenClipName:
    """How a backbone name maps onto open_clip's (model_name, pretrained) pair."""

    backbone: str
    model_name: str
    pretrained: str | None

    @property
    def schema(self) -> str | None:
        for prefix in (HF_HUB_PREFIX, LOCAL_DIR_PREFIX):
            if self.model_name.startswith(prefix):
                return prefix[:-1]
        return None


def ensure_tiny_clip_registered() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)


def parse_open_clip_name(name: str) -> OpenClipName | None:
    """None when `name` is not something open_clip can build (so the caller can list the valid names)."""
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return OpenClipName(name, name, None)
    import open_clip

    ensure_tiny_clip_registered()
    arch, _, tag = name.partition("@")
    arch = arch.replace("/", "-")  # open_clip's own spelling rule: ViT-B/32 is ViT-B-32
    if arch not in open_clip.list_models():
        return None
    return OpenClipName(name, arch, tag or None)


class OpenClipImage(Tower):
    """open_clip's encode_image(normalize=False); owns exactly the visual tower's parameters."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual
        object.__setattr__(self, "_clip", clip)  # used for forward, deliberately not registered

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._clip.encode_image(pixels, normalize=False)

    def blocks(self) -> list[nn.Module]:
        return tower_blocks(self._clip, is_image_param, IMAGE_BLOCK_PATHS)


class OpenClipText(Tower):
    """open_clip's encode_text(normalize=False); owns the text tower's parameters.

    In open_clip's CLIP class the text tower is not one submodule but a set of attributes on the model
    (token_embedding, transformer, ln_final, text_projection, ...), so they are gathered here by sharing.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        modules = {n: m for n, m in clip.named_children() if n not in NOT_TEXT_CHILDREN}
        params = {n: p for n, p in clip.named_parameters(recurse=False) if n not in NOT_A_TOWER}
        self.tower = BlockGroup(modules, params)
        object.__setattr__(self, "_clip", clip)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        return self._clip.encode_text(input_ids, normalize=False)

    def blocks(self) -> list[nn.Module]:
        return tower_blocks(self._clip, is_text_param, TEXT_BLOCK_PATHS)


def is_image_param(name: str) -> bool:
    return name.startswith("visual.")


def is_text_param(name: str) -> bool:
    return name.split(".", 1)[0] not in NOT_TEXT_CHILDREN | NOT_A_TOWER


def find_blocks(clip: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    for path in paths:
        try:
            container = clip.get_submodule(path)
        except AttributeError:
            continue
        if len(container) > 0:
            return list(container)
    if paths is IMAGE_BLOCK_PATHS:
        stages = []
        for path in RESNET_STAGES:
            try:
                stages.append(clip.get_submodule(path))
            except AttributeError:
                break
        if len(stages) == len(RESNET_STAGES):
            return stages
    return []


def is_stem_param(name: str) -> bool:
    """Judged by the tower's own first-level part, so an attention pool's position embedding stays in the head."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in TOWER_CONTAINERS:
        parts = parts[1:]
    return parts[0] in STEM_COMPONENTS or "embed" in parts[0]


def tower_blocks(clip: nn.Module, in_tower, paths: tuple[str, ...]) -> list[nn.Module]:
    """[stem, *repeated blocks, head]; the whole tower as one block when its layout is unknown."""
    blocks = find_blocks(clip, paths)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    stem: dict[str, nn.Parameter] = {}
    head: dict[str, nn.Parameter] = {}
    for name, param in clip.named_parameters():
        if not in_tower(name) or id(param) in in_blocks:
            continue
        (stem if blocks and is_stem_param(name) else head)[name] = param
    groups = [BlockGroup(parameters=stem)] if stem else []
    groups += blocks
    if head:
        groups.append(BlockGroup(parameters=head))
    return groups


@dataclass
class OpenClipTokenize:
    """open_clip tokenizers pad/truncate to the model's context length and return ids only."""

    tokenizer: Any

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}


LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolved_checkpoint(spec: OpenClipName) -> str | None:
    """The file the weights came from (hashed for provenance): a local-dir's weights file, or the
    local Hugging Face cache copy of a hub or pretrained tag (never downloaded: offline mode)."""
    from open_clip import pretrained

    try:
        if spec.schema == "local-dir":
            folder = Path(spec.model_name[len(LOCAL_DIR_PREFIX):])
            return next((str(folder / n) for n in LOCAL_DIR_WEIGHTS if (folder / n).is_file()), None)
        if spec.schema == "hf-hub":
            return pretrained.download_pretrained_from_hf(spec.model_name[len(HF_HUB_PREFIX):])
        if spec.pretrained:
            tag_cfg = pretrained.get_pretrained_cfg(spec.model_name, spec.pretrained)
            if tag_cfg:
                return pretrained.download_pretrained(tag_cfg) or None
            return spec.pretrained if os.path.isfile(spec.pretrained) else None
    except Exception:  # provenance falls back to hashing the loaded state dict
        return None
    return None


def text_tower_kind(clip: nn.Module) -> str:
    text = getattr(clip, "text", None)
    if text is not None:
        inner = getattr(text, "transformer", None)
        return type(text).__name__ + (f" over {type(inner).__name__}" if inner is not None else "")
    return f"{type(clip.transformer).__name__} with token embedding and text projection"


def preprocess_json(cfg: dict[str, Any]) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, sort_keys=True)


def open_clip_provenance(spec: OpenClipName, clip: nn.Module) -> dict[str, str]:
    """Which weights, preprocessing, layers and pooling make this backbone's features."""
    import open_clip

    pp = dict(clip.visual.preprocess_cfg)
    checkpoint = resolved_checkpoint(spec)
    if checkpoint:
        weights_sha, _ = sha256_files([checkpoint])
        weights = os.path.basename(checkpoint)
    else:
        weights_sha = tensor_digest(clip.state_dict())
        weights = f"random init (torch seed {RANDOM_INIT_SEED}); sha256 of the state dict"
    visual = clip.visual
    text_pool = getattr(clip, "text_pool_type", None) or getattr(getattr(clip, "text", None), "pool_type", None)
    return {
        "backbone": spec.backbone,
        "weights_sha256": weights_sha,
        "weights": weights,
        "preprocess": preprocess_json(pp),
        "image_layer": "projection (open_clip encode_image, normalize=False)",
        "image_pooling": f"pool_type={getattr(visual, 'pool_type', 'model default')}"
                         + (", attentional pool" if getattr(visual, "attn_pool", None) is not None else ""),
        "text_layer": "projection (open_clip encode_text, normalize=False)",
        "text_pooling": f"pool_type={text_pool or 'model default'}",
        "image_model": f"open_clip {spec.model_name} visual ({type(visual).__name__})",
        "text_model": f"open_clip {spec.model_name} text ({text_tower_kind(clip)})",
        "open_clip_version": open_clip.__version__,
    }


def create_open_clip(spec: OpenClipName, augment: AugmentConfig = AugmentConfig()) -> Backbone:
    import open_clip

    if spec.model_name == TINY_CLIP:
        ensure_tiny_clip_registered()
    try:
        with seeded_init(RANDOM_INIT_SEED):
            clip, _, preprocess = open_clip.create_model_and_transforms(
                spec.model_name, pretrained=spec.pretrained, device="cpu")
        tokenizer = open_clip.get_tokenizer(spec.model_name)
    except Exception as e:
        raise RuntimeError(
            f"open_clip could not build backbone '{spec.backbone}': {type(e).__name__}: {e}. "
            "There is no hub access here: weights must already be in the Hugging Face cache, "
            "or be given as local-dir:/folder or ARCH@/path/to/checkpoint.") from e
    clip.eval()
    image_model, text_model = OpenClipImage(clip), OpenClipText(clip)
    tokenize = OpenClipTokenize(tokenizer)

    pp = dict(clip.visual.preprocess_cfg)
    size = pp["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        image_dim = image_model(torch.zeros(1, 3, height, width)).shape[-1]
        text_dim = text_model(**tokenize(["a"])).shape[-1]

    provenance = open_clip_provenance(spec, clip)
    interpolation = pp.get("interpolation", "bicubic")
    return Backbone(
        name=spec.backbone,
        image_model=image_model,
        text_model=text_model,
        preprocess=preprocess,
        augment=augment_transform(
            size if isinstance(size, int) else (height, width), pp["mean"], pp["std"],
            interpolation if interpolation in ("bicubic", "bilinear") else "bicubic", augment),
        tokenize=tokenize,
        image_dim=int(image_dim),
        text_dim=int(text_dim),
        provenance=provenance,
        extra_modules=(clip,),
    )
