"""Unlocking tower blocks, and running the unlocked top of a tower from cached mid-layer activations.

`lock_backbone` freezes both towers except their top blocks (an `UnlockSpec` per tower: none, the
top N, or all). When the bottom of a tower is frozen its output never changes, so running it every
step of fine-tuning is wasted work: the frozen trunk runs once per image and per caption, and
training starts from those mid-layer activations, running only the unlocked blocks, the tower's
own pooling and projection, and the heads. The price: an image is seen through one fixed view (the
eval transform), so random-crop augmentation is not available on this path.

How a tower is unlocked and how its top is run are its backbone family's (`BackboneFamily.unlock`,
`BackboneFamily.cached_top`): each top is built from the towers' public modules and checked on
construction against the tower's own forward pass; a layout it cannot reproduce raises
`MidCacheUnsupported`, and the raw path (whole towers every step) is used instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medembed.adapt.tuning.config import UnlockSpec as UnlockSpec  # re-exported
from medembed.common.errors import Incompatible
from medembed.extract.backbones import Backbone, family_of

# re-exported: tuning code and tests reach these through this module
from medembed.extract.backbones.tops import MidCacheUnsupported as MidCacheUnsupported
from medembed.extract.backbones.tops import TowerCut as TowerCut
from medembed.extract.backbones.tops import first_unlocked as first_unlocked
from medembed.extract.backbones.tops import plain as plain
from medembed.extract.backbones.tops import unlock_top_blocks


# ----------------------------------------------------------------------------------------- unlocking
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


def lock_backbone(backbone: Backbone, spec: UnlockSpec) -> list[nn.Parameter]:
    """Freeze both towers except the top blocks `spec` names; returns the trainable tower parameters.

    The backbone's family unlocks (`BackboneFamily.unlock`: its library's own locking, or the last N
    of `image_blocks()` / `text_blocks()`); a backbone of no family unlocks the latter way."""
    params = tower_parameters(backbone)
    for p in params.values():
        p.requires_grad_(False)
    family = family_of(backbone)
    (unlock_top_blocks if family is None else family.unlock)(backbone, spec.image, spec.text)
    trainable = [p for p in params.values() if p.requires_grad]
    if spec.any and not trainable:
        raise Incompatible(f"{backbone.name}: unlocking {spec} left no trainable parameter")
    return trainable


def release(backbone: Backbone) -> None:
    """Hand the towers back frozen and in eval mode (what extraction and search expect)."""
    for p in tower_parameters(backbone).values():
        p.requires_grad_(False)
    backbone.image_model.eval(), backbone.text_model.eval()


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
    """The cached-trunk runner its family builds for this backbone, checked against the full towers
    (the image tower only when its top is to be run: `image`)."""
    family = family_of(backbone)
    if family is None or family.cached_top is None:
        raise MidCacheUnsupported(f"{backbone.name}: its backbone family has no cached top; tune on the raw path "
                                  "(without --cached-trunk)")
    top = family.cached_top(backbone, image)
    _check(top, backbone, image)
    return top


@dataclass
class MidActivations:
    """Cached inputs of the first unlocked block: one row per image and per caption (None for a side
    that is not cached: a locked image tower reads the cache's final features, a wholly unlocked
    text tower takes tokens)."""

    images: torch.Tensor | None  # [N, ...] activation entering the first unlocked image block
    texts: torch.Tensor | None  # [M, context, width]
    text_aux: torch.Tensor | None  # [M, context]: what the text pooling needs (token ids, or the attention mask)

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
