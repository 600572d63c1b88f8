"""Run-folder files, written atomically (temp file + rename) so a kill never leaves half a file.

best.safetensors  image_head.* and text_head.* only: what `load_run` needs to embed.
last.safetensors  heads, loss parameters and AdamW moments, with the loop's counters as JSON in the
                  safetensors metadata: everything `--resume` needs, in one file, no pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

BEST = "best.safetensors"
LAST = "last.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: {prefix} does not match the run's config (missing {missing}, unexpected {unexpected})")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: safetensors has no checksum of its own, so a
    flipped byte in a weight would otherwise load silently."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing unreadable or altered files by name."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from e
    want = meta.get("sha256")
    if want and digest(tensors) != want:
        raise ValueError(f"{path}: checkpoint content does not match its recorded sha256 (altered or corrupt file)")
    return tensors, meta


def save_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    tensors = {**_prefixed("image_head", image_head), **_prefixed("text_head", text_head)}
    meta = {"format": "medembed-heads/1", "sha256": digest(tensors)}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved heads (the run has not finished an epoch yet)")
    tensors, _ = read_verified(path)
    _load_prefixed(image_head, tensors, "image_head", path)
    _load_prefixed(text_head, tensors, "text_head", path)


def save_training_state(path: Path, image_head: nn.Module, text_head: nn.Module, loss: nn.Module,
                        optimizer: torch.optim.Optimizer, state: dict, extra: dict[str, nn.Module] | None = None) -> None:
    """`extra`: further modules saved under their own prefix (e.g. weight averages)."""
    tensors = {**_prefixed("image_head", image_head), **_prefixed("text_head", text_head), **_prefixed("loss", loss)}
    for prefix, module in (extra or {}).items():
        tensors.update(_prefixed(prefix, module))
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars),
            "sha256": digest(tensors)}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_training_state(path: Path, image_head: nn.Module, text_head: nn.Module, loss: nn.Module,
                        optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module] | None = None) -> dict:
    """Restore everything saved by `save_training_state`; returns the loop's counters."""
    tensors, meta = read_verified(path)
    _load_prefixed(image_head, tensors, "image_head", path)
    _load_prefixed(text_head, tensors, "text_head", path)
    _load_prefixed(loss, tensors, "loss", path)
    for prefix, module in (extra or {}).items():
        # absent altogether (a state seeded by another stage): the module keeps its fresh state
        if any(k.startswith(prefix + ".") for k in tensors):
            _load_prefixed(module, tensors, prefix, path)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in json.loads(meta["scalars"]).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])
