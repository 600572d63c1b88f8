"""Write a finished split file atomically: everything goes to `NAME.h5.tmp`, then one rename.

`cache.resumable` feeds this from its batch parts; tests and tools can call `write_split` with
in-memory arrays directly.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from medembed.cache.faults import reached

FORMAT = "medembed-cache/1"
STR = h5py.string_dtype("utf-8")


def _rows_chunk(shape: tuple[int, ...], target_bytes: int = 1 << 20, itemsize: int = 2) -> tuple[int, ...] | None:
    """Row-block chunks of about 1 MiB: a split reads back in few, contiguous chunk reads."""
    if shape[0] == 0:
        return None
    row = int(np.prod(shape[1:])) * itemsize
    rows = max(1, min(shape[0], target_bytes // max(row, 1)))
    return (rows, *shape[1:])


def _put_float(g: h5py.Group, name: str, arr: np.ndarray, dtype: str, attrs: dict | None = None) -> None:
    arr = np.asarray(arr, dtype=dtype)
    ds = g.create_dataset(name, data=arr, chunks=_rows_chunk(arr.shape, itemsize=arr.itemsize))
    for k, v in (attrs or {}).items():
        ds.attrs[k] = v


def _put_str(g: h5py.Group, name: str, items) -> None:
    g.create_dataset(name, data=np.array(list(items), dtype=object), dtype=STR)


def write_split(
    path: str | Path,
    *,
    attrs: dict,
    image_ids,
    image_locations,
    image_features: np.ndarray,
    captions,
    caption_image: np.ndarray,
    caption_features: np.ndarray,
    concept_ids=(),
    concept_names=(),
    concept_indptr: np.ndarray | None = None,
    concept_indices: np.ndarray | None = None,
    templates=(),
    concept_text_features: np.ndarray | None = None,
    view_features: np.ndarray | None = None,
    skipped=(),
    dtype: str = "float16",
    feature_attrs: dict | None = None,
) -> Path:
    """`skipped`: (id, location, reason) triples. `feature_attrs`: {"images": {...}, "captions": {...}}
    stored on the feature datasets (which layer and pooling produced them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    feature_attrs = feature_attrs or {}
    n = len(image_ids)
    try:
        _write_file(tmp, n, attrs, image_ids, image_locations, image_features, captions, caption_image,
                    caption_features, concept_ids, concept_names, concept_indptr, concept_indices, templates,
                    concept_text_features, view_features, skipped, dtype, feature_attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a file that looks like a cache
        raise
    reached("h5-tmp")
    os.replace(tmp, path)
    reached("h5-final")
    return path


def _write_file(tmp, n, attrs, image_ids, image_locations, image_features, captions, caption_image, caption_features,
                concept_ids, concept_names, concept_indptr, concept_indices, templates, concept_text_features,
                view_features, skipped, dtype, feature_attrs) -> None:
    with h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, (int, float, bool, np.integer, np.floating)) else str(v)
        f.attrs["format"] = FORMAT
        f.attrs["dtype"] = dtype
        f.attrs["n_images"] = n
        f.attrs["n_captions"] = len(captions)
        f.attrs["n_skipped"] = len(skipped)
        g = f.create_group("images")
        _put_str(g, "ids", image_ids)
        _put_str(g, "locations", image_locations)
        _put_float(g, "features", image_features, dtype, feature_attrs.get("images"))
        if view_features is not None:
            _put_float(g, "view_features", view_features, dtype, feature_attrs.get("images"))
        g = f.create_group("captions")
        _put_str(g, "text", captions)
        g.create_dataset("image_row", data=np.asarray(caption_image, dtype=np.int64))
        _put_float(g, "features", caption_features, dtype, feature_attrs.get("captions"))
        g = f.create_group("concepts")
        _put_str(g, "ids", concept_ids)
        _put_str(g, "names", concept_names)
        indptr = np.zeros(n + 1, np.int64) if concept_indptr is None else np.asarray(concept_indptr, np.int64)
        indices = np.zeros(0, np.int32) if concept_indices is None else np.asarray(concept_indices, np.int32)
        g.create_dataset("indptr", data=indptr)
        g.create_dataset("indices", data=indices)
        if concept_text_features is not None:
            _put_str(g, "templates", templates)
            _put_float(g, "text_features", concept_text_features, dtype, feature_attrs.get("captions"))
        g = f.create_group("skipped")
        sk = list(skipped)
        _put_str(g, "ids", [s[0] for s in sk])
        _put_str(g, "locations", [s[1] for s in sk])
        _put_str(g, "reasons", [s[2] for s in sk])
        f.attrs["complete"] = True
