"""The one object every backbone is turned into, plus the helpers all loaders share.

Extraction, adapter training and search only ever talk to `Backbone`: raw (un-normalised) pooled
features from two towers, one eval transform, one train-time view, one tokenizer and a provenance
record precise enough to tell whether two caches were made by the same weights and preprocessing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from medembed.cache.provenance import BACKBONE_KEYS

# every backbone's provenance names what fixes its feature space and the models it was made of
PROVENANCE_KEYS = (*BACKBONE_KEYS, "image_model", "text_model")


CPU_TEXT_BATCH = 16


class Tower(nn.Module):
    """A feature tower that also knows how to cut itself into unfreezable blocks."""

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def exportable(self) -> nn.Module:
        """The same function in a form `torch.onnx.export` traces faithfully (no branches on the
        inputs' values): the tower itself unless a subclass knows better."""
        return self


class BlockGroup(nn.Module):
    """Shares (does not copy) a set of parameters and modules under one nn.Module.

    Lets a loose parameter such as a projection matrix be part of an unfreezable "block" even
    though it lives directly on the model rather than inside a submodule.
    """

    def __init__(self, modules: dict[str, nn.Module] | None = None,
                 parameters: dict[str, nn.Parameter] | None = None) -> None:
        super().__init__()
        for name, module in (modules or {}).items():
            self.add_module(_safe_name(name), module)
        for name, param in (parameters or {}).items():
            self.register_parameter(_safe_name(name), param)


def _safe_name(name: str) -> str:
    return name.replace(".", "__")


@dataclass
class Backbone:
    """Image tower + text tower + the preprocessing and tokenizer that go with them.

    `image_model(pixels)` and `text_model(**tokens)` return RAW pooled features; normalising is the
    consumer's choice, so caches keep the information a learned head might want.
    `extra_modules` are owners of state the towers use but do not hold themselves (an open_clip
    model's text attention mask, for instance); `to` moves them too, so move a backbone with
    `Backbone.to`, not tower by tower.
    """

    name: str
    image_model: Tower
    text_model: Tower
    preprocess: Callable
    augment: Callable
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    image_dim: int
    text_dim: int
    provenance: dict[str, str]
    extra_modules: tuple[nn.Module, ...] = field(default=(), repr=False)
    cpu_micro_batch: int = 0  # > 0: run inference on the CPU this many images at a time (see encode_images)
    # the image tower as another runtime runs it on the CPU (see onnx_runtime.use_onnx_images); None: PyTorch
    image_runtime: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    # the text tower on another runtime (tokens by name -> features); None: PyTorch
    text_runtime: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    def to(self, device: str | torch.device) -> Backbone:
        for module in (*self.extra_modules, self.image_model, self.text_model):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.image_model.parameters()).device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw float32 image features, left on the backbone's device (the caller decides when to copy).

        On the CPU a convolutional tower runs fastest on small batches whose activations stay in
        the cache (EfficientNet-Lite0: 16 images at a time is about 2x faster than 64), so a
        backbone may set `cpu_micro_batch`; the loader's batch size, which fixes the crash-safe
        part boundaries, is unaffected."""
        self.image_model.eval()
        pixels = pixels.to(self.device, non_blocking=True)
        step = self.cpu_micro_batch if self.device.type == "cpu" and self.cpu_micro_batch > 0 else len(pixels)
        tower = self.image_runtime if self.image_runtime is not None and self.device.type == "cpu" else self.image_model
        return torch.cat([tower(pixels[s : s + step]).float() for s in range(0, len(pixels), max(step, 1))])

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Raw float32 text features on CPU, in the order given.

        Texts are sorted by length and batched, so padding (and wasted compute) stays small; pooling
        is mask-aware, so grouping does not change any row beyond float rounding. `batch_size` None:
        16 on the CPU, where a batch's cost is its padded length (16 similar captions pad little:
        3.5x the captions/s of batches of 256 on roco-rad), 256 on a GPU.
        """
        self.text_model.eval()
        texts = list(texts)
        if batch_size is None:
            batch_size = CPU_TEXT_BATCH if self.device.type == "cpu" else 256
        out = torch.empty(len(texts), self.text_dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        device = self.device
        tower = self.text_runtime if self.text_runtime is not None and device.type == "cpu" else self.text_model
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            tokens = self.tokenize([texts[i] for i in idx])
            tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
            out[idx] = tower(**tokens).float().cpu()
        return out

    def image_blocks(self) -> list[nn.Module]:
        """Bottom-to-top trainable blocks of the image tower (unfreeze the last k for partial fine-tuning)."""
        return self.image_model.blocks()

    def text_blocks(self) -> list[nn.Module]:
        """Bottom-to-top trainable blocks of the text tower."""
        return self.text_model.blocks()


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Random weight init inside is reproducible, and the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
