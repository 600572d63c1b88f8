"""Synthetic paired features with a known shared structure, for tests and the throughput benchmark.

Each image has a latent vector z; its features are z through one random linear map plus noise,
its captions are z through another plus independent noise. Retrieval is therefore learnable and
its difficulty is set by `noise`: a head that works must beat chance by a wide margin, one that
is broken cannot.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from medembed.cache.reader import CachedSplit
from medembed.cache.schema import split_file
from medembed.cache.writer import write_split


def correlated_split(
    n_images: int = 200,
    image_dim: int = 48,
    text_dim: int = 32,
    *,
    captions_per_image: int = 1,
    latent: int = 16,
    noise: float = 0.5,
    n_concepts: int = 0,
    templates: int = 2,
    views: int = 0,
    seed: int = 0,
    split: str = "train",
    world_seed: int = 1234,
    dtype: torch.dtype = torch.float32,
    concept_rate: float | tuple[float, float] | None = None,
) -> CachedSplit:
    """`world_seed` fixes the maps (shared by train/valid/test of one synthetic dataset); `seed`
    draws this split's images. Concepts are latent directions: an image has concept c when its
    z leans along c's direction, and c's text features sit near that direction's text image."""
    world = np.random.default_rng(world_seed)
    a = world.standard_normal((latent, image_dim)) / np.sqrt(latent)
    b = world.standard_normal((latent, text_dim)) / np.sqrt(latent)
    concept_dirs = world.standard_normal((n_concepts, latent))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_images, latent))
    img = z @ a + noise * rng.standard_normal((n_images, image_dim)) + 1.5  # offset: heads must centre
    rows = np.repeat(np.arange(n_images), captions_per_image)
    cap = z[rows] @ b + noise * rng.standard_normal((rows.size, text_dim))
    view_feats = None
    if views:
        view_feats = img[:, None, :] + 0.3 * noise * rng.standard_normal((n_images, views, image_dim))
    concepts = ctf = None
    names: list[str] = []
    if n_concepts:
        concepts = _concept_labels(z, concept_dirs, concept_rate)
        ctf_np = concept_dirs[:, None, :] @ b + 0.1 * noise * rng.standard_normal((n_concepts, templates, text_dim))
        ctf = torch.from_numpy(ctf_np.astype(np.float32))
        names = [f"finding {c}" for c in range(n_concepts)]
    as_t = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dtype)  # noqa: E731
    return CachedSplit(
        split=split,
        image_ids=[f"{split}_{i:06d}" for i in range(n_images)],
        image_features=as_t(img),
        caption_features=as_t(cap),
        caption_image=torch.from_numpy(rows.astype(np.int64)),
        captions=[f"caption {k} of image {i}" for k, i in enumerate(rows)],
        concept_ids=[f"C{c:07d}" for c in range(n_concepts)],
        concept_names=names,
        concepts=concepts,
        concept_text_features=ctf,
        templates=[f"template {t} {{name}}" for t in range(templates)] if n_concepts else [],
        view_features=as_t(view_feats) if view_feats is not None else None,
        attrs={"backbone": "synthetic", "dataset": "synthetic", "split": split, "synthetic": True},
    )


def _concept_labels(z: np.ndarray, dirs: np.ndarray, rate, chunk: int = 8192) -> sp.csr_matrix:
    """Image i has concept c when z_i leans along c's direction: above 1.0, or (with `rate`) above
    the level a share `rate` of images reaches (z ~ N(0, I), so z . c ~ N(0, |c|^2)); a (low, high)
    rate spreads the concepts' frequencies log-uniformly between the two, as real concept
    vocabularies have a few common and many rare concepts. Built in row chunks, so 100k images x
    2,000 concepts never exist as one dense matrix."""
    from scipy.stats import norm

    if isinstance(rate, tuple):
        rate = np.exp(np.linspace(np.log(rate[1]), np.log(rate[0]), len(dirs)))
    level = 1.0 if rate is None else norm.ppf(1.0 - np.asarray(rate)) * np.linalg.norm(dirs, axis=1)
    parts = [sp.csr_matrix(z[s : s + chunk] @ dirs.T > level, dtype=np.float32) for s in range(0, len(z), chunk)]
    return sp.vstack(parts, format="csr")


def write_cache(split: CachedSplit, path: str | Path, dtype: str = "float32") -> Path:
    """Write a CachedSplit through the real cache writer (so tests exercise the real reader)."""
    locations = split.image_locations or [f"images/{i}.jpg" for i in split.image_ids]
    return write_split(path, replace(split, image_locations=locations), dtype=dtype)


def write_synthetic_features(features_dir: str | Path, n_train: int = 200, n_eval: int = 100,
                             store_dtype: str = "float32", **kw) -> Path:
    """train/valid/test files of one synthetic dataset in `features_dir` (features stored as
    `store_dtype`; "float16" is what `extract` writes)."""
    d = Path(features_dir)
    for i, (name, n) in enumerate((("train", n_train), ("valid", n_eval), ("test", n_eval))):
        write_cache(correlated_split(n, seed=i, split=name, **kw), d / split_file(name), dtype=store_dtype)
    return d
