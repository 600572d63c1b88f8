"""Run-folder files, written atomically (temp file + rename) so a kill never leaves half a file.

best.safetensors  image_head.* and text_head.* only: what `load_run` needs to embed.
last.safetensors  heads, loss parameters, weight averages and AdamW moments, with the loop's
                  counters as JSON in the safetensors metadata: everything `--resume` needs, in
                  one file, no pickle.

These files exist for resuming and for loading a finished run; a run never reads them back to
hand its state from one stage to the next (that state stays in memory, `adapt.state.TrainState`).
safetensors has no checksum of its own, so every file carries the sha256 of its tensors and a
flipped byte is refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from medembed.adapt.run_files import BEST, CONFIG, LAST, METRICS, SELECTION, SUMMARY  # re-exported: run-folder names
from medembed.adapt.state import TrainState
from medembed.adapt.valid_heads import VALID_HEADS, VALID_HELD_OUT, VALID_WHY
from medembed.common.errors import BadInput, BadRun, NotFound
from medembed.common.files import atomic_write, read_json, write_json
from medembed.common.hashing import digests_of, tensor_digest

HEADS_FORMAT = "medembed-heads/1"

__all__ = ["BEST", "LAST", "CONFIG", "METRICS", "SUMMARY", "load_heads", "load_prefixed", "load_training_state",
           "prefixed", "read_verified", "save_heads", "save_training_state", "save_verified", "write_derived_summary",
           "write_json"]


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict under `prefix.`, as contiguous CPU copies (what safetensors stores)."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Load the `prefix.` tensors into `module`, refusing a file whose names or shapes do not fit."""
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise BadRun(f"{path}: {prefix} does not match the run's config (missing {missing}, unexpected {unexpected})")


def save_verified(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A safetensors file whose metadata records the sha256 of its tensors."""
    meta = {**metadata, "sha256": tensor_digest(tensors)}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing unreadable or altered files by name."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise BadInput(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from e
    want = meta.get("sha256")
    if want and want not in digests_of(tensors):
        raise BadInput(f"{path}: checkpoint content does not match its recorded sha256 (altered or corrupt file)")
    return tensors, meta


def write_derived_summary(source_dir: Path, folder: Path, replaced: tuple[str, ...], fields: dict,
                          querybank: dict | None) -> None:
    """summary.json of a run made from another (compact, distilled): the source's summary less what
    no longer describes the new run (`replaced`, and its valid recall with where it came from, bank
    and memory; its refit record unless the selection heads it names came along into `folder`), plus
    `fields` and the new run's own query-bank record when it has one."""
    path = Path(source_dir) / SUMMARY
    source = read_json(path) if path.exists() else {}
    drop = {"valid", VALID_HEADS, VALID_HELD_OUT, VALID_WHY, "querybank", "memory", "refit_skipped", *replaced}
    if not (Path(folder) / SELECTION).exists():
        drop.add("refit")
    summary = {**{k: v for k, v in source.items() if k not in drop}, **fields}
    if querybank is not None:
        summary["querybank"] = querybank
    write_json(Path(folder) / SUMMARY, summary)


def save_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    save_verified(path, {**prefixed("image_head", image_head), **prefixed("text_head", text_head)},
                  {"format": HEADS_FORMAT})


def load_heads(path: Path, image_head: nn.Module, text_head: nn.Module) -> None:
    if not path.exists():
        raise NotFound(f"{path}: no saved heads (the run has not finished an epoch yet)")
    tensors, _ = read_verified(path)
    load_prefixed(image_head, tensors, "image_head", path)
    load_prefixed(text_head, tensors, "text_head", path)


def _extras(state: TrainState) -> dict[str, nn.Module]:
    """Modules besides heads and losses whose weights a resume needs: weight averages, concept supervision."""
    out = dict(state.ema or {})
    if state.supervision is not None:
        out["supervision"] = state.supervision
    return out


def save_training_state(path: Path, state: TrainState) -> None:
    """Everything `load_training_state` needs to continue `state` exactly where it is."""
    tensors = {**prefixed("image_head", state.image_head), **prefixed("text_head", state.text_head),
               **prefixed("loss", state.losses)}
    for prefix, module in _extras(state).items():
        tensors.update(prefixed(prefix, module))
    opt = state.optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"state": json.dumps(state.counters()), "param_groups": json.dumps(opt["param_groups"]),
            "scalars": json.dumps(scalars)}
    save_verified(path, tensors, meta)


def load_training_state(path: Path, state: TrainState) -> None:
    """Restore into `state` everything `save_training_state` wrote: weights, moments, counters."""
    tensors, meta = read_verified(path)
    load_prefixed(state.image_head, tensors, "image_head", path)
    load_prefixed(state.text_head, tensors, "text_head", path)
    load_prefixed(state.losses, tensors, "loss", path)
    for prefix, module in _extras(state).items():
        load_prefixed(module, tensors, prefix, path)
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            moments.setdefault(int(idx), {})[name] = value
    for idx, entry in json.loads(meta["scalars"]).items():
        moments.setdefault(int(idx), {}).update(entry)
    state.optimizer.load_state_dict({"state": moments, "param_groups": json.loads(meta["param_groups"])})
    for key, value in json.loads(meta["state"]).items():
        setattr(state, key, value)
