"""The order splits are listed and processed in, whatever a dataset calls them."""
from __future__ import annotations

_RANK = {"train": 0, "valid": 1, "val": 1, "dev": 1, "validation": 1, "test": 2}


def split_key(name: str) -> tuple[int, str]:
    """Sort key: train, then valid (val, dev), then test, then any other split by name."""
    return _RANK.get(name, 9), name


def sort_splits(names) -> list[str]:
    return sorted(names, key=split_key)
