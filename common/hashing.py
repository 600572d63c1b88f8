"""Content digests: of files (weights shipped as files) and of tensors (weights made or changed in
memory: random initialisation, fine-tuning, checkpoints).

One tensor digest serves both backbone identity and checkpoint integrity, so the same weights
always have the same name. Checkpoints written before the two were merged used other separators;
`digests_of` also gives those older forms, and verification accepts any of them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

# separators: between a tensor's name, dtype and shape, and after its header
_CURRENT = ("|", "|")
_LEGACY = (("\x1f", "\x1e"),)


def _digest(tensors: dict[str, torch.Tensor], field_sep: str, end: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{field_sep}{t.dtype}{field_sep}{tuple(t.shape)}{end}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal exactly when the weights are."""
    return _digest(tensors, *_CURRENT)


def digests_of(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The current digest and the ones earlier versions recorded for the same tensors."""
    return {tensor_digest(tensors), *(_digest(tensors, *seps) for seps in _LEGACY)}


def sha256_files(paths: Iterable[str | Path], chunk: int = 1 << 20) -> tuple[str, list[str]]:
    """Digest over the bytes of all files in order (equals `sha256sum` for one file), plus each file's own.

    One read serves both, so multi-file backbones do not pay twice for hashing.
    """
    combined = hashlib.sha256()
    each = []
    for path in paths:
        own = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                combined.update(block)
                own.update(block)
        each.append(own.hexdigest())
    return combined.hexdigest(), each


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])[1][0]
