"""What evaluation compares: anything that turns raw cached features into unit embeddings.

A trained run, the closed-form baseline and test stand-ins all reduce to two functions
(raw image features -> embedding, raw text features -> embedding), so every metric runs the same
code on each column of the report and a baseline can never be scored differently from a run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

Embed = Callable[[torch.Tensor], torch.Tensor]

# rows per call into a head: bounds the activations a head allocates for 100k+ pools
EMBED_CHUNK = 8192


def as_unit(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class EmbeddingModel:
    """One column of the report: a name and the two raw-feature -> embedding maps."""

    name: str
    embed_image_features: Embed
    embed_text_features: Embed
    kind: str = "run"  # "run" | "baseline"

    @torch.no_grad()
    def images(self, raw: torch.Tensor) -> torch.Tensor:
        return _in_chunks(self.embed_image_features, raw)

    @torch.no_grad()
    def texts(self, raw: torch.Tensor) -> torch.Tensor:
        return _in_chunks(self.embed_text_features, raw)

    @torch.no_grad()
    def concept_prompts(self, concept_text_features: torch.Tensor) -> torch.Tensor:
        """[C, T, Dt] raw prompt features -> [C, D] prompt-ensemble embeddings.

        Each template is embedded and normalised first, then averaged and renormalised, so no
        single template dominates the ensemble by having a larger norm (CLIP's recipe).
        """
        c, t, d = concept_text_features.shape
        flat = self.texts(concept_text_features.reshape(c * t, d))
        return as_unit(flat.reshape(c, t, -1).mean(1))


def _in_chunks(fn: Embed, raw: torch.Tensor) -> torch.Tensor:
    raw = torch.as_tensor(raw).float()
    if raw.shape[0] == 0:
        probe = as_unit(torch.as_tensor(fn(torch.zeros(1, raw.shape[1]))))
        return probe[:0]
    parts = [as_unit(torch.as_tensor(fn(raw[s : s + EMBED_CHUNK]))) for s in range(0, raw.shape[0], EMBED_CHUNK)]
    return torch.cat(parts)


def model_from_run(run, name: str | None = None) -> EmbeddingModel:
    """Wrap a loaded run (anything with `embed_images` / `embed_texts` on raw features)."""
    label = name or Path(getattr(run, "run_dir", "") or "run").name
    return EmbeddingModel(label, run.embed_images, run.embed_texts, kind="run")


def model_from_heads(name: str, image_head, text_head) -> EmbeddingModel:
    """Wrap a pair of heads (callables on raw features), e.g. the closed-form baseline's."""

    def call(head):
        if hasattr(head, "eval"):
            head.eval()

        def fn(x: torch.Tensor) -> torch.Tensor:
            out = head(x)
            return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out

        return fn

    return EmbeddingModel(name, call(image_head), call(text_head), kind="baseline")


def embedding_dim(model: EmbeddingModel, image_feature_dim: int) -> int:
    return int(model.images(torch.zeros(1, image_feature_dim)).shape[1])
