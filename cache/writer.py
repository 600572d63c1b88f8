"""Write a finished split file atomically: everything goes to `NAME.h5.tmp`, then one rename.

The extractor assembles a `CachedSplit` from its crash-safe batch parts (`cache.parts`) and writes
it here; shard merging, synthetic test data and tools write the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import torch

from medembed.cache import schema
from medembed.cache.faults import reached
from medembed.cache.reader import CachedSplit, CacheError, count_non_finite, open_cache, read_dataset

STR = h5py.string_dtype("utf-8")


def _rows_chunk(shape: tuple[int, ...], target_bytes: int = 1 << 20, itemsize: int = 2) -> tuple[int, ...] | None:
    """Row-block chunks of about 1 MiB: a split reads back in few, contiguous chunk reads."""
    if shape[0] == 0:
        return None
    row = int(np.prod(shape[1:])) * itemsize
    rows = max(1, min(shape[0], target_bytes // max(row, 1)))
    return (rows, *shape[1:])


def _put_float(f: h5py.File, name: str, arr, dtype: str, attrs: dict | None = None) -> None:
    with np.errstate(over="ignore"):  # an overflow to float16 becomes Inf, refused just below
        arr = np.asarray(arr.numpy() if isinstance(arr, torch.Tensor) else arr, dtype=dtype)
    bad = count_non_finite(arr)
    if bad:  # also catches values that overflow float16 when stored
        raise CacheError(f"{f.filename.removesuffix('.tmp')}: {bad} non-finite values (NaN or Inf) in "
                         f"{name} as {dtype}; the backbone produced them, nothing was written")
    ds = f.create_dataset(name, data=arr, chunks=_rows_chunk(arr.shape, itemsize=arr.itemsize), fletcher32=True)
    for k, v in (attrs or {}).items():
        ds.attrs[k] = v


def _put_str(f: h5py.File, name: str, items) -> None:
    f.create_dataset(name, data=np.array(list(items), dtype=object), dtype=STR)


def write_split(path: str | Path, split: CachedSplit, *, dtype: str = "float16",
                feature_attrs: dict | None = None) -> Path:
    """Write `split` (features as torch tensors or numpy arrays) to `path`, all or nothing.

    `split.attrs` become the file's attributes (provenance); `feature_attrs` ({"images": {...},
    "captions": {...}}) are stored on the feature datasets (which layer and pooling made them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, split, dtype)
            _write_images(f, split, dtype, feature_attrs or {})
            _write_captions(f, split, dtype, feature_attrs or {})
            _write_concepts(f, split, dtype, feature_attrs or {})
            _write_skipped(f, split.skipped)
            f.attrs[schema.COMPLETE] = True
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a file that looks like a cache
        raise
    reached("h5-tmp")
    os.replace(tmp, path)
    reached("h5-final")
    return path


def _write_attrs(f: h5py.File, split: CachedSplit, dtype: str) -> None:
    for k, v in split.attrs.items():
        if k not in (schema.FORMAT_ATTR, schema.DTYPE, schema.N_IMAGES, schema.N_CAPTIONS, schema.N_SKIPPED,
                     schema.COMPLETE):
            f.attrs[k] = v if isinstance(v, (int, float, bool, np.integer, np.floating)) else str(v)
    f.attrs[schema.FORMAT_ATTR] = schema.FORMAT
    f.attrs[schema.DTYPE] = dtype
    f.attrs[schema.N_IMAGES] = len(split.image_ids)
    f.attrs[schema.N_CAPTIONS] = len(split.captions)
    f.attrs[schema.N_SKIPPED] = len(split.skipped)


def _write_images(f: h5py.File, split: CachedSplit, dtype: str, feature_attrs: dict) -> None:
    _put_str(f, schema.IMAGE_IDS, split.image_ids)
    _put_str(f, schema.IMAGE_LOCATIONS, split.image_locations or [""] * len(split.image_ids))
    _put_float(f, schema.IMAGE_FEATURES, split.image_features, dtype, feature_attrs.get("images"))
    if split.view_features is not None:
        _put_float(f, schema.VIEW_FEATURES, split.view_features, dtype, feature_attrs.get("images"))


def _write_captions(f: h5py.File, split: CachedSplit, dtype: str, feature_attrs: dict) -> None:
    _put_str(f, schema.CAPTION_TEXT, split.captions)
    f.create_dataset(schema.CAPTION_IMAGE_ROW, data=np.asarray(split.caption_image, dtype=np.int64), fletcher32=True)
    _put_float(f, schema.CAPTION_FEATURES, split.caption_features, dtype, feature_attrs.get("captions"))


def _write_concepts(f: h5py.File, split: CachedSplit, dtype: str, feature_attrs: dict) -> None:
    _put_str(f, schema.CONCEPT_IDS, split.concept_ids)
    _put_str(f, schema.CONCEPT_NAMES, split.concept_names)
    labels = split.concepts if split.concepts is not None else sp.csr_matrix((len(split.image_ids), 0))
    f.create_dataset(schema.CONCEPT_INDPTR, data=np.asarray(labels.indptr, np.int64), fletcher32=True)
    f.create_dataset(schema.CONCEPT_INDICES, data=np.asarray(labels.indices, np.int32), fletcher32=True)
    if split.concept_text_features is not None:
        _put_str(f, schema.CONCEPT_TEMPLATES, split.templates)
        _put_float(f, schema.CONCEPT_TEXT_FEATURES, split.concept_text_features, dtype, feature_attrs.get("captions"))


def _write_skipped(f: h5py.File, skipped) -> None:
    sk = list(skipped)
    _put_str(f, schema.SKIPPED_IDS, [s[0] for s in sk])
    _put_str(f, schema.SKIPPED_LOCATIONS, [s[1] for s in sk])
    _put_str(f, schema.SKIPPED_REASONS, [s[2] for s in sk])


# datasets of a joined split that stay in the shard files (the bulk of a cache), read through
# HDF5 virtual datasets; everything else is small and copied (rows re-based)
VIRTUAL_DATASETS = (schema.IMAGE_FEATURES, schema.VIEW_FEATURES, schema.CAPTION_FEATURES)


def write_joined(path: str | Path, shards: list[Path], attrs: dict) -> Path:
    """One split file over consecutive shard files, all or nothing, without copying their features:
    image, view and caption features are HDF5 virtual datasets that read the shard files in place
    (named relative to this file, so the folder can move); ids, locations, captions, caption rows,
    concept rows and skips are appended shard by shard (row numbers re-based), so the join holds one
    shard's strings at a time and never a feature. The shard files must stay beside it: a missing one
    is refused when the file is opened (`reader.open_cache`), never read as zeros."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as out:
            _join(out, path.parent, shards)
            for k, v in attrs.items():
                if k not in (schema.FORMAT_ATTR, schema.N_IMAGES, schema.N_CAPTIONS, schema.N_SKIPPED, schema.COMPLETE):
                    out.attrs[k] = v if isinstance(v, (int, float, bool, np.integer, np.floating)) else str(v)
            out.attrs[schema.FORMAT_ATTR] = schema.FORMAT
            out.attrs[schema.N_IMAGES] = out[schema.IMAGE_IDS].shape[0]
            out.attrs[schema.N_CAPTIONS] = out[schema.CAPTION_TEXT].shape[0]
            out.attrs[schema.N_SKIPPED] = out[schema.SKIPPED_IDS].shape[0]
            out.attrs[schema.FEATURES_IN_SHARDS] = True
            out.attrs[schema.COMPLETE] = True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    reached("h5-tmp")
    os.replace(tmp, path)
    reached("h5-final")
    return path


def _appendable(out: h5py.File, name: str, like: h5py.Dataset) -> h5py.Dataset:
    if name in out:
        return out[name]
    kw = {"fletcher32": True} if like.dtype.kind != "O" else {}
    return out.create_dataset(name, shape=(0, *like.shape[1:]), maxshape=(None, *like.shape[1:]), dtype=like.dtype,
                              chunks=(16384, *like.shape[1:]), **kw)


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    if len(values):
        ds[n:] = values


def _join(out: h5py.File, folder: Path, shards: list[Path]) -> None:
    layouts: dict[str, list[tuple[str, tuple, np.dtype]]] = {name: [] for name in VIRTUAL_DATASETS}
    feature_attrs: dict[str, dict] = {}
    image_base = nnz_base = 0
    for i, shard in enumerate(shards):
        with open_cache(shard) as f:
            for name in VIRTUAL_DATASETS:
                if name in f:
                    layouts[name].append((os.path.relpath(shard, folder), f[name].shape, f[name].dtype))
                    feature_attrs.setdefault(name, dict(f[name].attrs))
            for name in (schema.IMAGE_IDS, schema.IMAGE_LOCATIONS, schema.CAPTION_TEXT, schema.SKIPPED_IDS,
                         schema.SKIPPED_LOCATIONS, schema.SKIPPED_REASONS, schema.CONCEPT_INDICES):
                _append(_appendable(out, name, f[name]), read_dataset(f, name))
            _append(_appendable(out, schema.CAPTION_IMAGE_ROW, f[schema.CAPTION_IMAGE_ROW]),
                    read_dataset(f, schema.CAPTION_IMAGE_ROW) + image_base)
            indptr = read_dataset(f, schema.CONCEPT_INDPTR)
            _append(_appendable(out, schema.CONCEPT_INDPTR, f[schema.CONCEPT_INDPTR]),
                    (indptr if i == 0 else indptr[1:]) + nnz_base)
            if i == 0:  # the vocabulary and its prompt features are the dataset's, the same in every shard
                for name in (schema.CONCEPT_IDS, schema.CONCEPT_NAMES, schema.CONCEPT_TEMPLATES, schema.CONCEPT_TEXT_FEATURES):
                    if name in f:
                        f.copy(f[name], out, name=name)
            image_base += f[schema.IMAGE_FEATURES].shape[0]
            nnz_base += int(indptr[-1])
    for name, sources in layouts.items():
        if not sources:
            continue
        rows = sum(shape[0] for _, shape, _ in sources)
        if rows == 0:  # nothing to point at (e.g. an image-only collection's captions)
            out.create_dataset(name, shape=(0, *sources[0][1][1:]), dtype=sources[0][2])
        else:
            layout = h5py.VirtualLayout(shape=(rows, *sources[0][1][1:]), dtype=sources[0][2])
            at = 0
            for file_name, shape, _ in sources:
                if shape[0]:
                    layout[at : at + shape[0]] = h5py.VirtualSource(file_name, name, shape=shape)
                at += shape[0]
            out.create_virtual_dataset(name, layout, fillvalue=np.nan)  # a source HDF5 cannot open reads as NaN: refused
        for k, v in feature_attrs[name].items():
            out[name].attrs[k] = v
