"""`cli.py search`: a new caption or image against the cached pool, through a run's heads.

The query is encoded on the fly with the run's own backbone (the one its cache was extracted
with; for a fine-tuned checkpoint, the checkpoint's towers), so it lands in the same raw feature
space the heads were trained on; the pool is never re-encoded, only projected from the cache. With
`data`, the pool is a dataset of new raw images and captions, encoded once by that same backbone.
A text query ranks images; an image query ranks captions (the two directions of the retrieval
metrics).
"""
from __future__ import annotations

from pathlib import Path

import torch

from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.evaluate.examples import first_captions, image_path, load_pool_image
from medembed.evaluate.models import EmbeddingModel, model_from_run
from medembed.evaluate.plots import Tile, image_query_grid, text_query_grid
from medembed.evaluate.retrieval import top_k
from medembed.extract.records import open_image


def encode_query(backbone, text: str | None = None, image: str | Path | None = None) -> torch.Tensor:
    """Raw backbone features [1, D] of one caption or one image file."""
    if text is not None:
        return backbone.encode_texts([text]).float().cpu()
    try:
        pil = open_image(str(image))
    except (OSError, ValueError) as e:
        raise ValueError(f"{image}: cannot read the query image ({e})") from e
    return backbone.encode_images(backbone.preprocess(pil)[None]).float().cpu()


def rank_pool(
    model: EmbeddingModel, query_raw: torch.Tensor, splits: list[CachedSplit], target: str, k: int
) -> list[dict]:
    """Top-k pool items over all `splits` for one raw query; target "images" or "captions"."""
    query = model.texts(query_raw) if target == "images" else model.images(query_raw)
    hits: list[tuple[float, CachedSplit, int]] = []
    for split in splits:
        pool = model.images(split.image_features) if target == "images" else model.texts(split.caption_features)
        if pool.shape[0] == 0:
            continue
        scores, rows = top_k(query, pool, k)
        hits += [(s, split, r) for s, r in zip(scores[0].tolist(), rows[0].tolist())]
    hits.sort(key=lambda h: -h[0])
    firsts: dict[str, dict[int, str]] = {}
    results = []
    for rank, (score, split, row) in enumerate(hits[:k], 1):
        if target == "images":
            caption = firsts.setdefault(split.split, first_captions(split)).get(row, "")
            results.append(_result(rank, score, split, row, caption, "exact scan"))
        else:
            results.append(_result(rank, score, split, int(split.caption_image[row]), split.captions[row], "exact scan"))
    return results


def _load_image_index(run_dir: str | Path, split: str | None):
    from medembed.evaluate.index import load_index

    return load_index(run_dir, split)


def _result(rank: int, score: float, split: CachedSplit, image_row: int, caption: str, via: str) -> dict:
    return {
        "rank": rank,
        "score": float(score),
        "image_id": split.image_ids[image_row],
        "caption": caption,
        "split": split.split,
        "image_row": image_row,
        "location": image_path(split, image_row),
        "via": via,
    }


def rank_index(model: EmbeddingModel, query_raw: torch.Tensor, splits: list[CachedSplit], index, meta, k: int) -> list[dict]:
    """Top-k images for a raw caption query through a FAISS index built over `splits`' images."""
    from medembed.evaluate.index import search_index

    by_name = {s.split: s for s in splits}
    scores, rows = search_index(index, model.texts(query_raw), k)
    firsts: dict[str, dict[int, str]] = {}
    results = []
    for score, row in zip(scores[0].tolist(), rows[0].tolist()):
        if row < 0:  # approximate kinds pad missing hits
            continue
        name, image_row = meta.locate(row)
        split = by_name[name]
        caption = firsts.setdefault(name, first_captions(split)).get(image_row, "")
        results.append(_result(len(results) + 1, score, split, image_row, caption, f"{meta.kind} index"))
    return results


def search(
    run_dir: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 9,
    out: str | Path | None = None,
    split: str | None = None,
    backbone=None,
    use_index: bool = True,
    data: str | Path | None = None,
    features_root: str | Path = "features",
) -> list[dict]:
    """Top-k for a caption (-> images) or an image file (-> captions) over the run's cached pool.

    The pool is every split of the run's features folder, or only `split`. A caption query goes
    through the run's FAISS index over that pool when `cli.py index` built one (a stale index is
    an error saying how to rebuild it), else through an exact chunked scan. `out` draws the result
    as a grid PNG. `backbone` may be passed in to reuse a loaded one (tests, notebooks).
    `run_dir` may also be an unfreezing run folder or its `finetuned.safetensors`; `data` searches
    that dataset's raw images and captions (encoded by the run's backbone, cached under
    `features_root`) instead of the run's own cache.
    Each result: rank, score, image_id, caption, split, image_row, location, via.
    """
    from medembed.evaluate.sources import open_runs

    if (text is None) == (image is None):
        raise ValueError("give exactly one of --text or --image")
    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    (run,) = open_runs([run_dir], data, [split] if split else None, features_root)
    files = find_splits(run.features_dir)
    if split is not None and split not in files:
        raise FileNotFoundError(f"{run.features_dir}: no {split}.h5 (found: {', '.join(files)})")
    splits = [load_split(p, with_views=False) for name, p in files.items() if split is None or name == split]
    backbone = backbone or run.load_backbone()
    query_raw = encode_query(backbone, text=text, image=image)
    model = model_from_run(run)
    target = "images" if text is not None else "captions"
    # an index covers the run's own cache and heads file: not a newly encoded pool, not a checkpoint
    use_index = use_index and data is None and run.checkpoint is None
    indexed = _load_image_index(run.run_dir, split) if target == "images" and use_index else None
    if indexed is not None:
        results = rank_index(model, query_raw, splits, *indexed, k)
    else:
        results = rank_pool(model, query_raw, splits, target, k)
    if out is not None:
        draw(results, splits, out, text=text, image=image)
    return results


def draw(results: list[dict], splits: list[CachedSplit], out: str | Path, text: str | None = None,
         image: str | Path | None = None) -> Path:
    by_name = {s.split: s for s in splits}
    if text is not None:
        tiles = [Tile(load_pool_image(by_name[r["split"]], r["image_row"]), f"{r['image_id']}  {r['score']:.3f}")
                 for r in results]
        return text_query_grid(text, tiles, Path(out))
    try:
        query_img = open_image(str(image))
        query_img.thumbnail((384, 384))
    except (OSError, ValueError):
        query_img = None
    caps = [(f"[{r['image_id']}] {r['caption']}", r["score"], False) for r in results]
    return image_query_grid(query_img, f"query: {Path(image).name}", caps, Path(out))


def format_results(results: list[dict]) -> str:
    """One line per hit: rank, score, image id, caption (after a line saying how the pool was searched)."""
    if not results:
        return "no results"
    lines = [f"rank  score   image  caption   ({results[0]['via']}, cosine)"]
    for r in results:
        caption = r["caption"] if len(r["caption"]) <= 100 else r["caption"][:97] + "..."
        lines.append(f"{r['rank']:>3}  {r['score']:.4f}  {r['image_id']}  {caption}")
    return "\n".join(lines)
