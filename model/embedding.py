"""Anything that turns raw cached features into unit embeddings: what evaluation compares and
what search, the page and export rank with.

A trained run, the closed-form baseline and test stand-ins all reduce to two functions
(raw image features -> embedding, raw text features -> embedding) and the run's query-bank offsets,
so every metric runs the same code on each column of the report, a baseline can never be scored
differently from a run, and a search ranks a run exactly as its evaluation did.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medembed.common.tensors import embed_in_chunks, module_device, unit

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EmbeddingModel:
    """One column of the report: a name and the two raw-feature -> embedding maps."""

    name: str
    embed_image_features: Embed
    embed_text_features: Embed
    # (gallery image embeddings, gallery caption embeddings) -> what the run's query bank adds to each
    # one's cosines (None: plain cosine); see common.querybank
    gallery_offsets: Callable[[torch.Tensor | None, torch.Tensor | None],
                              tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
    ranking: str = "plain cosine"
    # what makes the embeddings that choose a section's settings on valid, where valid trained this model
    # (a refit run: its heads as valid chose them), loaded when a section first asks; None: this model's own
    make_chooser: Callable[[], EmbeddingModel | None] | None = None
    _chooser: list = field(default_factory=list, init=False, repr=False)

    @property
    def chooser(self) -> EmbeddingModel | None:
        """The model whose valid (and train) embeddings choose settings in place of this one's, or None."""
        if self.make_chooser is None:
            return None
        if not self._chooser:
            self._chooser.append(self.make_chooser())
        return self._chooser[0]

    @property
    def tuner(self) -> EmbeddingModel:
        """The model whose valid (and train) embeddings choose settings: `chooser`, else this one."""
        return self.chooser or self

    def offsets(self, images: torch.Tensor | None, captions: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What ranking adds to the cosines of these gallery images and captions: (None, None) for
        plain cosine."""
        return (None, None) if self.gallery_offsets is None else self.gallery_offsets(images, captions)

    @torch.no_grad()
    def images(self, raw: torch.Tensor) -> torch.Tensor:
        return embed_in_chunks(self.embed_image_features, raw)

    @torch.no_grad()
    def texts(self, raw: torch.Tensor) -> torch.Tensor:
        return embed_in_chunks(self.embed_text_features, raw)

    @torch.no_grad()
    def concept_prompts(self, concept_text_features: torch.Tensor) -> torch.Tensor:
        """[C, T, Dt] raw prompt features -> [C, D] prompt-ensemble embeddings.

        Each template is embedded and normalised first, then averaged and renormalised, so no
        single template dominates the ensemble by having a larger norm (CLIP's recipe).
        """
        c, t, d = concept_text_features.shape
        flat = self.texts(concept_text_features.reshape(c * t, d))
        return unit(flat.reshape(c, t, -1).mean(1))


def model_from_run(run, name: str | None = None) -> EmbeddingModel:
    """Wrap a loaded run (anything with `embed_images` / `embed_texts` on raw features)."""
    label = name or Path(getattr(run, "run_dir", "") or "run").name
    from medembed.adapt.run_querybank import bank_for, ranks_foreign_pool

    offsets, ranking = bank_for(run)
    make_chooser = None
    # a refit run scored on its own data (another dataset's valid was never trained on): its selection
    # heads (`AdaptedRun.selection`, None for other runs), loaded only when a section chooses settings on
    # valid (search and the page never do)
    if hasattr(run, "selection") and not ranks_foreign_pool(run):
        def make_chooser() -> EmbeddingModel | None:
            selection = run.selection()
            if selection is None:
                return None
            return EmbeddingModel(f"{label} (selection heads)", selection.embed_images, selection.embed_texts)
    return EmbeddingModel(label, run.embed_images, run.embed_texts, offsets, ranking, make_chooser)


def _on_device(head: nn.Module) -> Embed:
    head.eval()
    device = module_device(head)
    return lambda x: head(x.to(device))


def model_from_heads(name: str, image_head: nn.Module, text_head: nn.Module) -> EmbeddingModel:
    """Wrap a pair of heads (modules on raw features), e.g. the closed-form baseline's."""
    return EmbeddingModel(name, _on_device(image_head), _on_device(text_head))
