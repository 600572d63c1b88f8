"""The closed-form baseline fitted once per cache and reused.

Every evaluation scores a regularised-CCA column beside the runs. Its fit costs eigendecompositions
of feature-sized covariance matrices and a 54-setting grid on valid: seconds to minutes, growing
with the feature width, not the pool. The result depends only on the train and valid caches and
the embedding width, so it is stored beside the cache (`FEATURES/closed-form/KEY.safetensors`, the
key a digest of both caches' provenance, their sizes, the width, the grid and the toolkit version)
and read back by every later evaluation of that cache. A read-only features folder just means the
fit is not stored.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.closed_form import CCA_GRID, fit_cca_on_valid, fit_closed_form
from medembed.adapt.heads import build_heads
from medembed.cache import schema
from medembed.cache.reader import CachedSplit
from medembed.common.version import __version__

STORE = "closed-form"
_IDENTITY = (schema.DATASET, schema.DATASET_FINGERPRINT, schema.BACKBONE, schema.WEIGHTS_SHA256, schema.SPLIT, schema.CREATED,
             schema.DTYPE)
DEFAULT_SETTING = {"reg": 0.3, "power": 1.0}  # without a valid split to choose on


@dataclass
class ClosedForm:
    image_head: nn.Module
    text_head: nn.Module
    reg: float
    power: float
    chosen_on_valid: bool
    stored: Path | None  # where the fit is kept (None: could not be stored)
    reused: bool  # read back from an earlier evaluation


def _identity(split: CachedSplit) -> dict:
    path = Path(split.path) if split.path else None
    return {**{k: str(split.attrs.get(k, "")) for k in _IDENTITY}, "n_images": split.n_images,
            "n_captions": split.n_captions, "bytes": path.stat().st_size if path and path.exists() else 0}


def store_key(train: CachedSplit, valid: CachedSplit | None, dim: int) -> str:
    record = {"train": _identity(train), "valid": _identity(valid) if valid is not None else None, "dim": dim,
              "grid": CCA_GRID, "default": DEFAULT_SETTING, "version": __version__}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def _config(train: CachedSplit, dim: int) -> dict:
    return {"head": "cca", "dim": dim, "ensemble": 1, "image_dim": int(train.image_features.shape[1]),
            "text_dim": int(train.caption_features.shape[1]), "features_dir": "", "out": ""}


def closed_form(train: CachedSplit, valid: CachedSplit | None, dim: int, progress: bool = False) -> ClosedForm:
    """The closed-form heads for this train/valid pair and width: read back when an earlier
    evaluation stored them, else fitted (ridge and weighting chosen on valid when there is one, with
    a bar on stderr when `progress`) and stored beside the train cache."""
    folder = Path(train.path).parent / STORE if train.path else None
    path = folder / f"{store_key(train, valid, dim)}.safetensors" if folder else None
    if path is not None and path.exists():
        try:
            tensors, meta = ckpt.read_verified(path)
            image_head, text_head = build_heads(_config(train, dim))
            ckpt.load_prefixed(image_head, tensors, "image_head", path)
            ckpt.load_prefixed(text_head, tensors, "text_head", path)
            return ClosedForm(image_head.eval(), text_head.eval(), float(meta["reg"]), float(meta["power"]),
                              meta.get("chosen_on_valid") == "true", path, True)
        except (ValueError, KeyError):
            try:
                path.unlink(missing_ok=True)  # damaged: fit again below (and store it again if the folder allows)
            except OSError:
                pass
    if valid is not None:
        fit = fit_cca_on_valid(train, valid, dim, progress=progress)
        heads, reg, power = (fit.image_head, fit.text_head), fit.reg, fit.power
    else:
        heads, reg, power = fit_closed_form(train, dim, **DEFAULT_SETTING), DEFAULT_SETTING["reg"], DEFAULT_SETTING["power"]
    stored = None
    if path is not None:
        try:
            folder.mkdir(exist_ok=True)
            tensors = {**ckpt.prefixed("image_head", heads[0]), **ckpt.prefixed("text_head", heads[1])}
            ckpt.save_verified(path, tensors, {"format": ckpt.HEADS_FORMAT, "reg": str(reg), "power": str(power),
                                               "chosen_on_valid": str(valid is not None).lower(),
                                               "train": json.dumps(_identity(train)),
                                               "valid": json.dumps(_identity(valid)) if valid is not None else ""})
            stored = path
        except OSError:
            stored = None  # a read-only features folder: the fit is simply not kept
    return ClosedForm(heads[0], heads[1], reg, power, valid is not None, stored, False)
