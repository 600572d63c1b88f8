"""Retrieval examples as pictures: the qualitative check that numbers alone cannot give.

Cached image locations are relative to the data root the extractor recorded (`attrs["data_root"]`),
so drawing needs the original images; an image that cannot be read is drawn as a placeholder
rather than failing the evaluation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medembed.cache import schema
from medembed.cache.reader import CachedSplit
from medembed.common.ranking import top_k
from medembed.extract.access import DataAccess
from medembed.extract.imaging import DecodeOptions
from medembed.model.grids import Tile, image_query_grid, text_query_grid
from medembed.model.thumbnails import load_image_thumbnail


def load_pool_image(split: CachedSplit, row: int) -> Image.Image | None:
    return load_image_thumbnail(split.image_path(row), DecodeOptions.from_provenance(split.attrs.get(schema.IMAGE_DECODING)),
                                DataAccess.of_cache(split.attrs, split.data_root))


def write_examples(
    split: CachedSplit,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    out_dir: Path,
    n_examples: int = 1,
    n_images: int = 9,
    n_captions: int = 5,
    seed: int = 0,
    run_name: str = "",
    offsets: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> list[Path]:
    """`n_examples` text queries with their top images and image queries with their top captions.

    Queries are drawn with a fixed seed, so reruns show the same examples and two runs evaluated
    on the same split can be compared picture by picture. Each grid names the run, says what the
    green marks mean, and where the right answer ranks when it is not among those shown. `offsets`
    (per image, per caption) are the run's query bank, so the grids rank as the metrics do.
    """
    image_off = torch.zeros(image_emb.shape[0]) if offsets[0] is None else offsets[0].float()
    caption_off = torch.zeros(text_emb.shape[0]) if offsets[1] is None else offsets[1].float()
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    caption_image = split.caption_image.long()
    paths: list[Path] = []
    if text_emb.shape[0] == 0 or image_emb.shape[0] == 0:
        return paths
    for i, c in enumerate(rng.choice(text_emb.shape[0], size=min(n_examples, text_emb.shape[0]), replace=False)):
        scores, rows = top_k(text_emb[int(c)][None], image_emb, n_images, offset=image_off)
        tiles = [
            Tile(load_pool_image(split, r), f"{split.image_ids[r]}  {s:.3f}", r == int(caption_image[c]))
            for s, r in zip(scores[0].tolist(), rows[0].tolist())
        ]
        own = int(caption_image[c])
        sims = image_emb @ text_emb[int(c)] + image_off
        rank = int((sims >= sims[own]).sum())
        note = (f"run {run_name} · green frame: the caption's own image"
                + ("" if any(t.correct for t in tiles) else f" (ranked {rank} of {image_emb.shape[0]}, not shown)"))
        paths.append(text_query_grid(split.captions[int(c)], tiles, out_dir / f"example_text2image_{i + 1}.png",
                                     note=note))
    with_caption = torch.unique(caption_image).numpy()
    for i, r in enumerate(rng.choice(with_caption, size=min(n_examples, len(with_caption)), replace=False)):
        r = int(r)
        scores, rows = top_k(image_emb[r][None], text_emb, n_captions, offset=caption_off)
        caps = [(split.captions[j], s, int(caption_image[j]) == r) for s, j in zip(scores[0].tolist(), rows[0].tolist())]
        own = caption_image == r
        sims = text_emb @ image_emb[r] + caption_off
        rank = int((sims >= sims[own].max()).sum())
        note = (f"run {run_name} · green: the image's own caption"
                + ("" if any(c[2] for c in caps) else f" (best ranked {rank} of {text_emb.shape[0]}, not shown)"))
        paths.append(image_query_grid(load_pool_image(split, r), f"query: {split.image_ids[r]}", caps,
                                      out_dir / f"example_image2text_{i + 1}.png", note=note))
    return paths
