"""The notebook API: a handful of calls for what the command line does, on objects instead of files.

    import medembed

    run = medembed.load_run("runs/roco")                       # any run folder or finetuned.safetensors
    txt = medembed.embed_texts(run, ["axial CT of the abdomen"])  # [1, D] unit vectors (a str is one text)
    img = medembed.embed_images(run, ["scan.jpg"])              # [1, D] (a path or PIL image is one image)
    hits = medembed.search(run, "chest x-ray, pneumothorax", k=5)  # ranked Hit records: .score, .cosine
    metrics = medembed.evaluate_run(run, split="test")          # {column: {metric: value}}

New images and captions are encoded with the run's own backbone (its fine-tuned towers when it has
them), exactly as `cli.py search` does; the run's pool is its cache. The loaded run object keeps
its backbone and one `Searcher` (pool projected) per split, so a notebook loop over many queries
pays for them once, as the search page does; load the run again to see a rebuilt index.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from medembed.adapt.run import AdaptedRun
from medembed.common.errors import BadOption
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.evaluate.plan import EVAL_SPLIT
from medembed.model.runs import open_run, run_backbone
from medembed.serve.search import EXACT, Hit, Searcher, SearchOptions, read_query_image

__all__ = ["load_run", "embed_texts", "embed_images", "search", "evaluate_run"]

CACHE = "api_cache"  # the attribute of a loaded run holding its backbone and Searchers (by split)


def load_run(ref: str | Path) -> AdaptedRun:
    """A run folder (adapter heads, or heads + fine-tuned towers) or a finetuned.safetensors file."""
    return open_run(ref)


def _items(values, name: str, single: tuple[type, ...]) -> list:
    """The inputs as a list: one item (a str is one text, not its characters), or the items of a list;
    an empty input is refused by name, before any model is loaded."""
    items = [values] if isinstance(values, single) else list(values)
    if not items:
        raise BadOption(f"{name}: empty; give at least one (a single one may be passed as it is)")
    return items


@torch.no_grad()
def embed_texts(run: AdaptedRun, texts: str | Iterable[str]) -> torch.Tensor:
    """Captions -> unit embeddings [N, D] in the run's joint space; one str -> [1, D]."""
    items = _items(texts, "texts", (str,))
    return run.embed_texts(_backbone(run).encode_texts(items))


@torch.no_grad()
def embed_images(run: AdaptedRun, images: str | Path | Image.Image | Iterable) -> torch.Tensor:
    """Image files or PIL images -> unit embeddings [N, D] in the run's joint space; one path or image -> [1, D]."""
    items = _items(images, "images", (str, Path, Image.Image))
    backbone = _backbone(run)
    pixels = torch.stack([backbone.preprocess(read_query_image(im)) for im in items])
    return run.embed_images(backbone.encode_images(pixels).cpu())


def _cache(run: AdaptedRun) -> dict:
    """What the API keeps on a loaded run between calls (see the module docstring)."""
    cache = getattr(run, CACHE, None)
    if cache is None:
        cache = {}
        setattr(run, CACHE, cache)
    return cache


def _backbone(run: AdaptedRun):
    cache = _cache(run)
    if "backbone" not in cache:
        cache["backbone"] = run_backbone(run)
    return cache["backbone"]


def searcher_for(run: AdaptedRun, split: str | None = None) -> Searcher:
    """The run's Searcher over `split` (None: every split), built on first use and kept on the run
    object: building one loads the backbone and projects the pool, seconds that a query does not need."""
    cache = _cache(run)
    key = ("searcher", split)
    if key not in cache:
        cache[key] = Searcher(run, split, backbone=_backbone(run))
    return cache[key]


def search(run: AdaptedRun | str | Path, query: str, k: int = SearchOptions.k, split: str | None = None) -> list[Hit]:
    """The k images of the run's pool that best match a caption, ranked as eval ranks (`Hit.score`;
    `Hit.cosine` is the plain cosine). Through the run's FAISS index when one was built; an approximate
    index that returns fewer than min(k, pool) hits is answered by an exact scan instead, with a warning.
    Pass a loaded run (`load_run`) to reuse its Searcher across calls; a path builds one per call."""
    searcher = searcher_for(run if isinstance(run, AdaptedRun) else load_run(run), split)
    embedded = searcher.embed_text(query)
    result = searcher.images(embedded, k)
    wanted = min(k, result.pool)
    if result.via != EXACT and len(result.hits) < wanted:
        warnings.warn(f"the {result.via} returned {len(result.hits)} of the {wanted} images asked for "
                      f"(approximate search stops early); scanning all {result.pool} exactly instead",
                      stacklevel=2)
        result = searcher.images(embedded, k, exact=True)
    return result.hits


def evaluate_run(run: AdaptedRun | str | Path, split: str = EVAL_SPLIT, out_dir: str | Path | None = None,
             overwrite: bool = False, **options) -> dict[str, dict[str, float]]:
    """Every metric of `cli.py eval` for one run beside its baselines, also written to `out_dir`
    (default: the run's eval-SPLIT folder); `options` are `EvalOptions` fields."""
    result = run_eval([run], split=split, out_dir=out_dir, options=EvalOptions(overwrite=overwrite, **options))
    return result["columns"]
