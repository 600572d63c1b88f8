"""Where computation runs: one rule for every command."""
from __future__ import annotations

import torch

from medembed.common.errors import BadOption

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when torch sees a GPU, else the CPU; 'cuda' without a GPU is an error."""
    if name not in DEVICES:
        raise BadOption(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadOption("--device cuda: torch sees no CUDA device")
    return torch.device(name)
