"""The fine-tuned model in one safetensors file: both towers and both heads, no pickle.

A fine-tuned backbone exists nowhere else: the registry can only rebuild its base, so this file is
what encodes new raw images and captions for `eval --data`, `search`, `index` and the search page.
Its name carries the sha256 of its towers (`BASE+ft-<12 hex>`), so every cache it writes lands in
a folder of its own and can never be mixed with the base backbone's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.heads import build_heads
from medembed.adapt.run_files import FINETUNED
from medembed.adapt.tuning.towers import release, tower_state
from medembed.common.errors import BadRun, NotFound
from medembed.common.hashing import tensor_digest
from medembed.common.tensors import embed_in_chunks, module_device
from medembed.extract.backbones import Backbone, create_backbone
from medembed.extract.imaging import open_image

FORMAT = "medembed-finetuned/1"
FT_MARK = "+ft-"
CHECKPOINT = FINETUNED


def base_name(backbone: Backbone) -> str:
    """The registry name a fine-tuned backbone was made from (what create_backbone rebuilds)."""
    return backbone.provenance.get("base_backbone") or backbone.name.split(FT_MARK)[0]


def mark_finetuned(backbone: Backbone, note: dict[str, str]) -> Backbone:
    """The same towers under the identity of their current weights: a new name and weights_sha256
    (`finetuned_from` keeps the lineage, `note` says how they were tuned). The backbone passed in
    keeps its own name and provenance."""
    sha = tensor_digest(tower_state(backbone))
    base = base_name(backbone)
    name = f"{base}{FT_MARK}{sha[:12]}"
    provenance = {**backbone.provenance, "backbone": name, "base_backbone": base, "weights_sha256": sha,
                  "weights": f"fine-tuned from {base}; sha256 of the towers' state dict",
                  "finetuned_from": backbone.provenance.get("weights_sha256", ""), **note}
    return replace(backbone, name=name, provenance=provenance)


def save_finetuned(path: str | Path, backbone: Backbone, image_head: nn.Module, text_head: nn.Module,
                   run_config: dict) -> Path:
    """Towers + heads in one safetensors file; the metadata says how to rebuild them."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tower_state(backbone).items()}
    tensors.update(ckpt.prefixed("image_head", image_head))
    tensors.update(ckpt.prefixed("text_head", text_head))
    meta = {"format": FORMAT, "base_backbone": base_name(backbone), "backbone": backbone.name,
            "provenance": json.dumps(backbone.provenance, sort_keys=True),
            "run_config": json.dumps(run_config, sort_keys=True, default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return ckpt.save_verified(path, tensors, meta)


def read_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """(Backbone, image_head, text_head, run_config) from a `save_finetuned` file, in eval mode on `device`.

    The base backbone is built from the registry (offline) and its towers overwritten strictly,
    so a file that does not match its base architecture fails loudly instead of half-loading."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no fine-tuned checkpoint")
    tensors, meta = ckpt.read_verified(path)
    if meta.get("format") != FORMAT:
        raise BadRun(f"{path}: not a fine-tuned backbone checkpoint (format {meta.get('format')!r}, expected {FORMAT})")
    backbone = create_backbone(meta["base_backbone"], device="cpu")
    for prefix, tower in (("image_model", backbone.image_model), ("text_model", backbone.text_model)):
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing, unexpected = tower.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise BadRun(f"{path}: {prefix} does not fit {meta['base_backbone']} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    backbone = replace(backbone, name=meta["backbone"], provenance=json.loads(meta["provenance"]))
    run_config = json.loads(meta["run_config"])
    image_head, text_head = build_heads(run_config)
    ckpt.load_prefixed(image_head, tensors, "image_head", path)
    ckpt.load_prefixed(text_head, tensors, "text_head", path)
    backbone.to(device)
    release(backbone)
    return backbone, image_head.to(device).eval(), text_head.to(device).eval(), run_config


@dataclass
class FinetunedModel:
    """A fine-tuned checkpoint as search and evaluation use it: raw images or captions in, unit embeddings out."""

    backbone: Backbone
    image_head: nn.Module
    text_head: nn.Module

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
        return cls(*read_finetuned(path, device)[:3])

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 64) -> torch.Tensor:
        """PIL images or image file paths -> L2-normalised float32 [N, D] on CPU."""
        out = []
        for s in range(0, len(images), batch_size):
            batch = [open_image(str(x)) if isinstance(x, (str, Path)) else x for x in images[s : s + batch_size]]
            pixels = torch.stack([self.backbone.preprocess(im) for im in batch])
            out.append(embed_in_chunks(self.image_head, self.backbone.encode_images(pixels),
                                       device=module_device(self.image_head)))
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> L2-normalised float32 [N, D] on CPU."""
        return embed_in_chunks(self.text_head, self.backbone.encode_texts(list(texts)), device=module_device(self.text_head))
