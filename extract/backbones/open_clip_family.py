"""Every open_clip model behind the one Backbone interface.

Names: `hf-hub:ORG/REPO`, `local-dir:/path` (open_clip_config.json with model_cfg + preprocess_cfg,
next to open_clip_model.safetensors / open_clip_pytorch_model.bin), `ARCH` (random init, seeded) or
`ARCH@TAG` (a pretrained tag, or a checkpoint file path), and `tiny-clip`, a seeded random-init
miniature for fast tests. Features are encode_image / encode_text with normalize=False.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medembed.common.errors import Incompatible, ToolError
from medembed.common.hashing import sha256_files, tensor_digest
from medembed.extract.backbones.core import Backbone, BlockGroup, Tower, seeded_init
from medembed.extract.backbones.family import BackboneFamily
from medembed.extract.backbones.tops import MidCacheUnsupported, TowerCut, all_frozen, first_unlocked, plain
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
        raise ToolError(
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


# ------------------------------------------------------------------ unlocking for tuning
def open_clip_model(backbone: Backbone) -> nn.Module | None:
    """The open_clip model behind a Backbone (the owner of both towers), or None for other families."""
    for module in backbone.extra_modules:
        if hasattr(module, "lock_image_tower") and hasattr(module, "encode_text"):
            return module
    return None


def unlock_open_clip(backbone: Backbone, image: int | str, text: int | str) -> None:
    """open_clip's own LiT-style locking (lock_image_tower / lock_text_tower), which knows each
    architecture's groups: both towers trainable, then all but their top groups locked again."""
    clip = open_clip_model(backbone)
    for tower in (backbone.image_model, backbone.text_model):
        for p in tower.parameters():
            p.requires_grad_(True)
    if image != "all":
        clip.lock_image_tower(unlocked_groups=image)
    if text != "all":
        clip.lock_text_tower(unlocked_layers=text)


def grad_checkpointing(backbone: Backbone) -> None:
    """open_clip's activation checkpointing over every block of both towers."""
    open_clip_model(backbone).set_grad_checkpointing(True)


# ------------------------------------------------------------------ tuning from cached activations


def vit_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A ViT's input tokens: patch embedding, class token, positions, pre-norm ([B, 1 + patches, width])."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))


def vit_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ViT's final norm, class-token or mean pooling and projection of its last tokens."""
    after_pool = getattr(visual, "final_ln_after_pool", False)
    if not after_pool:
        x = visual.ln_post(x)
    pooled = x[:, 0] if getattr(visual, "pool_type", "tok") == "tok" else x[:, 1:].mean(dim=1)
    if after_pool:
        pooled = visual.ln_post(pooled)
    return pooled @ visual.proj if visual.proj is not None else pooled


class OpenClipTop:
    """The unlocked top of an open_clip CLIP's two towers, run from cached mid-layer activations:
    the ViT's patch embedding and class token before the cut, its final norm, pooling and
    projection after it; the text transformer's token embedding before, `text_global_pool` after."""

    def __init__(self, clip: nn.Module):
        visual = getattr(clip, "visual", None)
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
        if visual is None or not all(hasattr(visual, a) for a in needed) or getattr(visual, "attn_pool", None):
            raise MidCacheUnsupported("cached partial unfreeze needs a plain open_clip VisionTransformer image tower")
        if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            raise MidCacheUnsupported(f"cached partial unfreeze: ViT pool_type {visual.pool_type!r} is not supported")
        if not all(hasattr(clip, a) for a in ("token_embedding", "transformer", "ln_final", "text_projection")):
            raise MidCacheUnsupported("cached partial unfreeze needs open_clip's classic text transformer")
        self.clip, self.visual = clip, visual
        self.image = TowerCut(first_unlocked(list(visual.transformer.resblocks)), len(visual.transformer.resblocks))
        self.text = TowerCut(first_unlocked(list(clip.transformer.resblocks)), len(clip.transformer.resblocks))
        if not all_frozen(visual.conv1, visual.ln_pre, visual.class_embedding, visual.positional_embedding):
            raise MidCacheUnsupported("the image stem is unlocked: nothing below the first unlocked block to cache")
        if not all_frozen(clip.token_embedding, clip.positional_embedding):
            raise MidCacheUnsupported("the text embeddings are unlocked: nothing below the first unlocked block to cache")

    @torch.no_grad()
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        x = vit_tokens(self.visual, pixels)
        for block in self.visual.transformer.resblocks[: self.image.cut]:
            x = block(x)
        return x

    def image_top(self, x: torch.Tensor, run: Callable = plain) -> torch.Tensor:
        for block in self.visual.transformer.resblocks[self.image.cut :]:
            x = run(block, x)
        return vit_pool(self.visual, x)

    @torch.no_grad()
    def text_trunk(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations entering the first unlocked block, what the pooling needs later: the token ids)."""
        input_ids = tokens["input_ids"]
        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(input_ids).to(cast) + clip.positional_embedding.to(cast)
        for block in clip.transformer.resblocks[: self.text.cut]:
            x = block(x, attn_mask=clip.attn_mask)
        return x, input_ids

    def text_top(self, x: torch.Tensor, input_ids: torch.Tensor, run: Callable = plain) -> torch.Tensor:
        clip = self.clip
        mask = clip.attn_mask
        for block in clip.transformer.resblocks[self.text.cut :]:
            x = run(lambda h, b=block: b(h, attn_mask=mask), x)
        x = clip.ln_final(x)
        from open_clip.transformer import text_global_pool  # open_clip costs ~250 MB and 3 s to import: only here

        x = text_global_pool(x, input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def probe(self, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = self.visual.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)), backbone.tokenize(["a", "a b c"])


# ------------------------------------------------------------------ why an image matched
class ViTRollout:
    """The blocks of an open_clip ViT run by hand so each block's attention stays in the graph."""

    def __init__(self, visual: nn.Module):
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise Incompatible("explanation maps support plain open_clip VisionTransformers")
        self.visual = visual

    @staticmethod
    def _attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        b, n, d = x.shape
        h = attn.num_heads
        q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)  # [B, H, N, N]
        out = (probs @ v).transpose(1, 2).reshape(b, n, d)
        return attn.out_proj(out), probs

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, probs = vit_tokens(self.visual, pixels), []
        for block in self.visual.transformer.resblocks:
            a, p = self._attention(block, block.ln_1(x))
            probs.append(p)
            x = x + block.ls_1(a)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return vit_pool(self.visual, x), probs


def rollout_map(backbone: Backbone, pixels: torch.Tensor,
                score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-weighted attention rollout: each block's attention, its heads weighted by the score's
    gradient, multiplied through the blocks; the class token's row over the patches is the map."""
    visual = open_clip_model(backbone).visual.eval()
    vit = ViTRollout(visual)
    with torch.enable_grad():
        feats, probs = vit.forward(pixels.to(backbone.device))
        if not torch.allclose(feats, backbone.image_model(pixels.to(backbone.device)), atol=1e-4, rtol=1e-4):
            raise Incompatible(f"{backbone.name}: the ViT's blocks run by hand do not reproduce its output")
        for p in probs:
            p.retain_grad()
        value = score(feats)
        value.backward()
    n = probs[0].shape[-1]
    rolled = torch.eye(n)
    for p in probs:
        weighted = (p.grad * p).clamp_min(0).mean(1)[0].detach().cpu()  # heads weighted by the score's gradient
        layer = torch.eye(n) + weighted
        rolled = (layer / layer.sum(-1, keepdim=True)) @ rolled
    side = int(round((n - 1) ** 0.5))
    return rolled[0, 1:].reshape(side, side), value.detach()


def _accepts(name: str) -> bool:
    return parse_open_clip_name(name) is not None


def _create(name: str, augment: AugmentConfig) -> Backbone:
    return create_open_clip(parse_open_clip_name(name), augment)


def _cached_top(backbone: Backbone, image: bool) -> OpenClipTop:
    return OpenClipTop(open_clip_model(backbone))


FAMILY = BackboneFamily(
    name="open_clip",
    patterns=(
        "hf-hub:ORG/REPO (an open_clip model in the local Hugging Face cache)",
        "local-dir:/path (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin)",
        "ARCH or ARCH@PRETRAINED_TAG or ARCH@/path/to/checkpoint, ARCH one of open_clip.list_models()",
    ),
    accepts=_accepts,
    create=_create,
    owns=lambda backbone: open_clip_model(backbone) is not None,
    unlock=unlock_open_clip,
    grad_checkpointing=grad_checkpointing,
    cached_top=_cached_top,
    saliency=rollout_map,
)
