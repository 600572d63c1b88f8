"""The notebook API: a handful of calls for what the command line does, on objects instead of files.

    import medembed

    run = medembed.load_run("runs/roco")                       # any run folder or finetuned.safetensors
    txt = medembed.embed_texts(run, ["axial CT of the abdomen"])  # [1, D] unit vectors
    img = medembed.embed_images(run, ["scan.jpg"])              # [1, D]
    hits = medembed.search(run, "chest x-ray, pneumothorax", k=5)  # ranked Hit records
    metrics = medembed.evaluate_run(run, split="test")          # {column: {metric: value}}

New images and captions are encoded with the run's own backbone (its fine-tuned towers when it has
them), exactly as `cli.py search` does; the run's pool is its cache.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medembed.adapt.run import AdaptedRun
from medembed.adapt.tuning.runs import open_run, run_backbone
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.evaluate.search import Hit, Searcher, read_query_image

__all__ = ["load_run", "embed_texts", "embed_images", "search", "evaluate_run"]


def load_run(ref: str | Path) -> AdaptedRun:
    """A run folder (adapter heads, or heads + fine-tuned towers) or a finetuned.safetensors file."""
    return open_run(ref)


@torch.no_grad()
def embed_texts(run: AdaptedRun, texts: list[str]) -> torch.Tensor:
    """Captions -> unit embeddings [N, D] in the run's joint space."""
    return run.embed_texts(run_backbone(run).encode_texts(list(texts)))


@torch.no_grad()
def embed_images(run: AdaptedRun, images: list) -> torch.Tensor:
    """Image files or PIL images -> unit embeddings [N, D] in the run's joint space."""
    backbone = run_backbone(run)
    pixels = torch.stack([backbone.preprocess(read_query_image(im)) for im in images])
    return run.embed_images(backbone.encode_images(pixels).cpu())


def search(run: AdaptedRun | str | Path, query: str, k: int = 10, split: str | None = None) -> list[Hit]:
    """The k images of the run's pool that best match a caption (FAISS index when one was built)."""
    searcher = Searcher(run, split)
    return searcher.images(searcher.embed_text(query), k).hits


def evaluate_run(run: AdaptedRun | str | Path, split: str = "test", out_dir: str | Path | None = None,
             overwrite: bool = False, **options) -> dict[str, dict[str, float]]:
    """Every metric of `cli.py eval` for one run beside its baselines, also written to `out_dir`
    (default: the run's eval-SPLIT folder); `options` are `EvalOptions` fields."""
    result = run_eval([run], split=split, out_dir=out_dir, options=EvalOptions(overwrite=overwrite, **options))
    return result["columns"]
