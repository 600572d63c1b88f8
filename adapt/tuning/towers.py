"""Unlocking tower blocks, and running the unlocked top of a tower from cached mid-layer activations.

`lock_backbone` freezes both towers except their top blocks (an `UnlockSpec` per tower: none, the
top N, or all). When the bottom of a tower is frozen its output never changes, so running it every
step of fine-tuning is wasted work: the frozen trunk runs once per image and per caption, and
training starts from those mid-layer activations, running only the unlocked blocks, the tower's
own pooling and projection, and the heads. The price: an image is seen through one fixed view (the
eval transform), so random-crop augmentation is not available on this path.

Supported layouts: open_clip CLIP models with a plain VisionTransformer image tower (class-token or
average pooling, no attentional pool) and the classic text transformer, and the default
EfficientNet-Lite0 + MiniLM pair. Each top is built from the towers' public modules and checked on
construction against the tower's own forward pass; a layout it cannot reproduce raises
`MidCacheUnsupported`, and the raw path (whole towers every step) is used instead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medembed.common.errors import MedembedError
from medembed.extract.backbones import Backbone


class MidCacheUnsupported(MedembedError, ValueError):
    pass


def plain(f: Callable, *args):
    return f(*args)


# ----------------------------------------------------------------------------------------- unlocking
@dataclass(frozen=True)
class UnlockSpec:
    """How much of each tower trains: 0 (locked), the top N blocks, or "all"."""

    image: int | str = 0
    text: int | str = 0

    @classmethod
    def parse(cls, spec: str) -> UnlockSpec:
        """`text:2`, `image:1,text:all`, or a bare `N` / `all` for both towers (what --unlock takes)."""
        spec = str(spec).strip().lower()
        if ":" not in spec:
            n = _count(spec, "--unlock")
            return cls(n, n)
        out = {"image": 0, "text": 0}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            tower, _, n = part.partition(":")
            if tower not in out:
                raise ValueError(f"--unlock {spec!r}: tower must be image or text, got {tower!r}")
            out[tower] = _count(n, f"--unlock {tower}")
        return cls(**out)

    @property
    def any(self) -> bool:
        return self.image != 0 or self.text != 0

    def __str__(self) -> str:
        return ",".join(f"{t}:{n}" for t, n in (("image", self.image), ("text", self.text)) if n != 0) or "none"


def _count(value: str, flag: str) -> int | str:
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number of top blocks or 'all', got {value!r}") from None
    if n < 0:
        raise ValueError(f"{flag} must be >= 0, got {n}")
    return n


def open_clip_model(backbone: Backbone) -> nn.Module | None:
    """The open_clip model behind a Backbone (the owner of both towers), or None for other families."""
    for module in backbone.extra_modules:
        if hasattr(module, "lock_image_tower") and hasattr(module, "encode_text"):
            return module
    return None


def tower_parameters(backbone: Backbone) -> dict[str, nn.Parameter]:
    """Every parameter of both towers under `image_model.` / `text_model.` names, each once."""
    out, seen = {}, set()
    for prefix, tower in (("image_model", backbone.image_model), ("text_model", backbone.text_model)):
        for name, p in tower.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{prefix}.{name}"] = p
    return out


def tower_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Both towers' weights and buffers under `image_model.` / `text_model.`: what a fine-tuning changes."""
    state = {f"image_model.{k}": v for k, v in backbone.image_model.state_dict().items()}
    state.update({f"text_model.{k}": v for k, v in backbone.text_model.state_dict().items()})
    return state


def _unlock_top(blocks: list[nn.Module], n: int | str) -> None:
    for block in blocks if n == "all" else blocks[len(blocks) - n:] if n else []:
        for p in block.parameters():
            p.requires_grad_(True)


def lock_backbone(backbone: Backbone, spec: UnlockSpec) -> list[nn.Parameter]:
    """Freeze both towers except the top blocks `spec` names; returns the trainable tower parameters.

    open_clip models use open_clip's own LiT-style locking (lock_image_tower / lock_text_tower);
    other backbones unlock the last N of `image_blocks()` / `text_blocks()`."""
    params = tower_parameters(backbone)
    for p in params.values():
        p.requires_grad_(False)
    clip = open_clip_model(backbone)
    if clip is not None:
        for p in params.values():
            p.requires_grad_(True)
        if spec.image != "all":
            clip.lock_image_tower(unlocked_groups=spec.image)
        if spec.text != "all":
            clip.lock_text_tower(unlocked_layers=spec.text)
    else:
        _unlock_top(backbone.image_blocks(), spec.image)
        _unlock_top(backbone.text_blocks(), spec.text)
    trainable = [p for p in params.values() if p.requires_grad]
    if spec.any and not trainable:
        raise ValueError(f"{backbone.name}: unlocking {spec} left no trainable parameter")
    return trainable


def release(backbone: Backbone) -> None:
    """Hand the towers back frozen and in eval mode (what extraction and search expect)."""
    for p in tower_parameters(backbone).values():
        p.requires_grad_(False)
    backbone.image_model.eval(), backbone.text_model.eval()


def first_unlocked(blocks: Sequence[nn.Module]) -> int:
    """Index of the lowest block with a trainable parameter; len(blocks) when all are frozen."""
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


def _frozen(*modules) -> bool:
    return not any(p.requires_grad for m in modules if m is not None for p in
                   (m.parameters() if isinstance(m, nn.Module) else [m]))


@dataclass
class TowerCut:
    """Where one tower is cut: blocks[:cut] (and the stem) are frozen and cached, the rest trains."""

    cut: int
    n_blocks: int


# ------------------------------------------------------------------------------------ the two tops
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
        if not _frozen(visual.conv1, visual.ln_pre, visual.class_embedding, visual.positional_embedding):
            raise MidCacheUnsupported("the image stem is unlocked: nothing below the first unlocked block to cache")
        if not _frozen(clip.token_embedding, clip.positional_embedding):
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


def _check(top, backbone: Backbone, image: bool = True) -> None:
    """The top after the trunk must compute what the whole tower computes (else refuse the layout);
    the image side is checked only when it is unlocked (`image`)."""
    pixels, tokens = top.probe(backbone)
    device = backbone.device
    pixels, tokens = pixels.to(device), {k: v.to(device) for k, v in tokens.items()}
    modes = backbone.image_model.training, backbone.text_model.training
    backbone.image_model.eval(), backbone.text_model.eval()
    try:
        with torch.no_grad():
            ok_image = not image or torch.allclose(top.image_top(top.image_trunk(pixels)), backbone.image_model(pixels),
                                                   atol=1e-4, rtol=1e-4)
            ok_text = torch.allclose(top.text_top(*top.text_trunk(tokens)), backbone.text_model(**tokens),
                                     atol=1e-4, rtol=1e-4)
    finally:
        backbone.image_model.train(modes[0]), backbone.text_model.train(modes[1])
    if not (ok_image and ok_text):
        which = " and ".join(n for n, ok in (("image", ok_image), ("text", ok_text)) if not ok)
        raise MidCacheUnsupported(f"{backbone.name}: the cached {which} top does not reproduce the tower's own output")


def top_for(backbone: Backbone, image: bool = True):
    """The cached-trunk runner for this backbone (OpenClipTop or EffnetMiniLMTop), checked against
    the full towers (the image tower only when its top is to be run: `image`)."""
    clip = open_clip_model(backbone)
    if clip is not None:
        top = OpenClipTop(clip)
    elif hasattr(backbone.image_model, "net") and hasattr(backbone.text_model, "encoder"):
        top = EffnetMiniLMTop(backbone, image)
    else:
        raise MidCacheUnsupported(f"{backbone.name}: cached partial unfreeze supports open_clip ViTs and the default "
                                  "backbone")
    _check(top, backbone, image)
    return top


@dataclass
class MidActivations:
    """Cached inputs of the first unlocked block: one row per image and per caption (None for a side
    that is not cached: a locked image tower reads the cache's final features, a wholly unlocked
    text tower takes tokens)."""

    images: torch.Tensor | None  # [N, ...] activation entering the first unlocked image block
    texts: torch.Tensor | None  # [M, context, width]
    text_aux: torch.Tensor | None  # [M, context]: token ids (open_clip pooling) or attention mask (mean pooling)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.texts, self.text_aux) if t is not None)


@torch.no_grad()
def build_mid_cache(top, image_batches, captions: list[str] | None, tokenize, device: torch.device,
                    dtype: torch.dtype = torch.float32, text_batch: int = 256) -> MidActivations:
    """Run each frozen trunk once. `image_batches` yields preprocessed pixel batches in image-row
    order; None (or no captions) leaves that side uncached."""
    images = None
    if image_batches is not None:
        images = torch.cat([top.image_trunk(p.to(device)).to("cpu", dtype) for p in image_batches])
    if not captions:
        return MidActivations(images, None, None)
    # the trunk runs on captions of similar length together (little padding), results go back in order
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    texts, aux = [None] * len(captions), [None] * len(captions)
    for s in range(0, len(order), text_batch):
        idx = order[s : s + text_batch]
        tokens = {k: v.to(device) for k, v in tokenize([captions[i] for i in idx]).items()}
        x, a = top.text_trunk(tokens)
        for j, i in enumerate(idx):
            texts[i], aux[i] = x[j].to("cpu", dtype), a[j].cpu()
    width = max(t.shape[0] for t in texts)  # pad every caption to the longest one's length
    texts = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[0])) for t in texts])
    aux = torch.stack([torch.nn.functional.pad(a, (0, width - a.shape[0])) for a in aux])
    return MidActivations(images, texts, aux)
