"""Cached partial unfreeze: keep the activations that enter the first unlocked block, train only the top.

When the bottom of a tower is frozen its output never changes, so running it every step of
fine-tuning is wasted work. Here the frozen trunk runs once per image and per caption; training
then starts from those mid-layer activations and runs only the unlocked blocks, the tower's own
pooling and projection, and the heads. The price: an image is seen through one fixed view (the
eval transform), so random-crop augmentation is not available on this path.

Supported layouts: open_clip CLIP models with a VisionTransformer image tower and the classic text
transformer (token embedding + resblocks + ln_final + text projection), and the default
EfficientNet-Lite0 + MiniLM pair. Other towers raise `MidCacheUnsupported`; use the raw-image path.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class MidCacheUnsupported(ValueError):
    pass


def open_clip_model(backbone) -> nn.Module | None:
    """The open_clip model behind a Backbone (the owner of both towers), or None for other families."""
    for module in getattr(backbone, "extra_modules", ()):
        if hasattr(module, "lock_image_tower") and hasattr(module, "encode_text"):
            return module
    return None


def first_unlocked(blocks: Sequence[nn.Module]) -> int:
    """Index of the lowest block with a trainable parameter; len(blocks) when all are frozen."""
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


def _frozen(module: nn.Module | None) -> bool:
    return module is None or not any(p.requires_grad for p in module.parameters())


@dataclass
class TowerCut:
    """Where one tower is cut: blocks[:cut] (and the stem) are frozen and cached, the rest trains."""

    cut: int
    n_blocks: int


class OpenClipTop:
    """The unlocked top of an open_clip CLIP's two towers, run from cached mid-layer activations.

    Mirrors open_clip's own forward (VisionTransformer.forward and CLIP.encode_text) after the cut,
    so with nothing trained the top reproduces encode_image / encode_text exactly.
    """

    def __init__(self, clip: nn.Module):
        visual = getattr(clip, "visual", None)
        if visual is None or not hasattr(visual, "_embeds") or not hasattr(visual, "transformer"):
            raise MidCacheUnsupported("cached partial unfreeze needs an open_clip VisionTransformer image tower")
        if not hasattr(clip, "token_embedding") or not hasattr(clip, "transformer"):
            raise MidCacheUnsupported("cached partial unfreeze needs open_clip's classic text transformer")
        if not visual.transformer.batch_first or not clip.transformer.batch_first:
            raise MidCacheUnsupported("cached partial unfreeze expects batch-first transformers")
        self.clip = clip
        self.visual = visual
        self.image = TowerCut(first_unlocked(list(visual.transformer.resblocks)), len(visual.transformer.resblocks))
        self.text = TowerCut(first_unlocked(list(clip.transformer.resblocks)), len(clip.transformer.resblocks))
        stem = [visual.conv1, visual.ln_pre]
        if not all(_frozen(m) for m in stem) or visual.class_embedding.requires_grad \
                or visual.positional_embedding.requires_grad:
            raise MidCacheUnsupported("the image stem is unlocked: nothing below the first unlocked block to cache")
        if clip.token_embedding.weight.requires_grad or clip.positional_embedding.requires_grad:
            raise MidCacheUnsupported("the text embeddings are unlocked: nothing below the first unlocked block to cache")

    # -- the frozen trunk, run once -------------------------------------------------------------
    @torch.no_grad()
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.visual._embeds(pixels)
        for block in self.visual.transformer.resblocks[: self.image.cut]:
            x = block(x)
        return x

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

    # -- the trainable top ----------------------------------------------------------------------
    def image_top(self, x: torch.Tensor, run: Callable = lambda f, *a: f(*a)) -> torch.Tensor:
        for block in self.visual.transformer.resblocks[self.image.cut :]:
            x = run(block, x)
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def text_top(self, x: torch.Tensor, input_ids: torch.Tensor, run: Callable = lambda f, *a: f(*a)) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        clip = self.clip
        mask = clip.attn_mask
        for block in clip.transformer.resblocks[self.text.cut :]:
            x = run(lambda h, b=block: b(h, attn_mask=mask), x)
        x = clip.ln_final(x)
        x = text_global_pool(x, input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class EffnetMiniLMTop:
    """The unlocked top of the default backbone: the last MBConv blocks + head conv of EfficientNet-Lite0
    (then the global average pool), the last BERT layers of MiniLM (then the attention-mask mean)."""

    def __init__(self, backbone):
        self.net = backbone.image_model.net
        self.encoder = backbone.text_model.encoder
        image_blocks, text_blocks = backbone.image_blocks(), backbone.text_blocks()
        stage = first_unlocked(image_blocks)
        if stage == 0 or first_unlocked(text_blocks) == 0:
            raise MidCacheUnsupported("a stem or the text embeddings are unlocked: nothing below them to cache")
        # image_blocks() = [stem, stage 1..7, head]: blocks before the first unlocked stage form the trunk
        n_trunk = sum(len(s) for s in image_blocks[1:stage]) if stage < len(image_blocks) else len(self.net._blocks)
        self.image = TowerCut(n_trunk, len(self.net._blocks))
        self.text = TowerCut(first_unlocked(text_blocks) - 1, len(self.encoder.encoder.layer))

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        rate = self.net._global_params.drop_connect_rate
        return self.net._blocks[idx](x, drop_connect_rate=rate * idx / len(self.net._blocks) if rate else rate)

    @torch.no_grad()
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        for idx in range(self.image.cut):
            x = self._block(idx, x)
        return x

    def image_top(self, x: torch.Tensor, run: Callable = lambda f, *a: f(*a)) -> torch.Tensor:
        net = self.net
        for idx in range(self.image.cut, self.image.n_blocks):
            x = run(lambda h, i=idx: self._block(i, h), x)
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))

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

    def text_top(self, x: torch.Tensor, attention_mask: torch.Tensor, run: Callable = lambda f, *a: f(*a)):
        used = int(attention_mask.sum(dim=1).max())  # padding beyond the longest caption is dead weight
        x, attention_mask = x[:, :used], attention_mask[:, :used]
        ext = self._mask(x, attention_mask)
        for layer in self.encoder.encoder.layer[self.text.cut :]:
            x = run(lambda h, b=layer: self._layer(b, h, ext), x)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def top_for(backbone):
    """The cached-trunk runner for this backbone (OpenClipTop or EffnetMiniLMTop)."""
    clip = open_clip_model(backbone)
    if clip is not None:
        return OpenClipTop(clip)
    if hasattr(backbone.image_model, "net") and hasattr(backbone.text_model, "encoder"):
        return EffnetMiniLMTop(backbone)
    raise MidCacheUnsupported(f"{backbone.name}: cached partial unfreeze supports open_clip ViTs and the default backbone")


@dataclass
class MidActivations:
    """Cached inputs of the first unlocked block: one row per image and per caption."""

    images: torch.Tensor  # [N, ...] activation entering the first unlocked image block
    texts: torch.Tensor  # [M, context, width]
    text_aux: torch.Tensor  # [M, context]: token ids (open_clip pooling) or attention mask (mean pooling)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.texts, self.text_aux))


@torch.no_grad()
def build_mid_cache(top, image_batches, captions: list[str], tokenize, device: torch.device,
                    dtype: torch.dtype = torch.float32, text_batch: int = 256) -> MidActivations:
    """Run each frozen trunk once. `image_batches` yields preprocessed pixel batches in image-row order."""
    images = [top.image_trunk(p.to(device)).to("cpu", dtype) for p in image_batches]
    texts, aux = [], []
    for s in range(0, len(captions), text_batch):
        tokens = {k: v.to(device) for k, v in tokenize(captions[s : s + text_batch]).items()}
        x, a = top.text_trunk(tokens)
        texts.append(x.to("cpu", dtype))
        aux.append(a.cpu())
    width = max(t.shape[1] for t in texts)  # batches padded to their own longest caption: pad to one length
    texts = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in texts]
    aux = [torch.nn.functional.pad(a, (0, width - a.shape[1])) for a in aux]
    return MidActivations(torch.cat(images), torch.cat(texts), torch.cat(aux))
