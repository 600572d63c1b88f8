"""Run-folder files, written atomically (temp file + rename) so a kill never leaves half a file.

best.safetensors  image_head.* and text_head.* only: what `load_run` needs to embed.
last.safetensors  heads, loss parameters and AdamW moments, with the loop's counters as JSON in the
                  safetensors metadata: everything `--resume` needs, in one file, no pickle.
"""
from __future__ import annotations

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


def save_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    tensors = {**_prefixed("image_head", image_head), **_prefixed("text_head", text_head)}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata={"format": "medembed-heads/1"}))


def load_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved heads (the run has not finished an epoch yet)")
    tensors = load_file(str(path))
    _load_prefixed(image_head, tensors, "image_head", path)
    _load_prefixed(text_head, tensors, "text_head", path)


def save_training_state(path: Path, image_head: nn.Module, text_head: nn.Module, loss: nn.Module,
                        optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {**_prefixed("image_head", image_head), **_prefixed("text_head", text_head), **_prefixed("loss", loss)}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars)}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_training_state(path: Path, image_head: nn.Module, text_head: nn.Module, loss: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """Restore everything saved by `save_training_state`; returns the loop's counters."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    _load_prefixed(image_head, tensors, "image_head", path)
    _load_prefixed(text_head, tensors, "text_head", path)
    _load_prefixed(loss, tensors, "loss", path)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in json.loads(meta["scalars"]).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])
