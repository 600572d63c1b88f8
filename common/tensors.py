"""Tensor helpers every phase uses the same way."""
from __future__ import annotations

from collections.abc import Callable

import torch

# rows per call into a head or tower: bounds the activations it allocates for 100k+ pools
EMBED_CHUNK = 8192


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero (no NaN)."""
    x = torch.as_tensor(x).float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def embed_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], raw: torch.Tensor, chunk: int = EMBED_CHUNK,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """`unit(fn(rows))` over `raw` [N, D] in chunks of `chunk` rows, widened to float32 one chunk at a
    time and moved to `device` (default: left where `raw` is); the result is float32 on the CPU.
    For N = 0 the output still has fn's width, learned from one zero row."""
    raw = torch.as_tensor(raw)
    if raw.shape[0] == 0:
        probe = torch.zeros(1, *raw.shape[1:], device=device)
        return unit(fn(probe)).cpu()[:0]
    out = None  # filled in place: no second copy of a 100k-row result
    for s in range(0, raw.shape[0], chunk):
        x = raw[s : s + chunk].float()
        part = unit(fn(x if device is None else x.to(device))).float().cpu()
        if out is None:
            out = torch.empty(raw.shape[0], *part.shape[1:])
        out[s : s + part.shape[0]] = part
    return out


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights (or, for weightless maps, its buffers) live; the CPU if it has neither."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
