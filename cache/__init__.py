"""Phase 2: the HDF5 feature cache (one file per dataset x split x backbone)."""
from medembed.cache.reader import CachedSplit, find_splits, load_split, read_attrs

__all__ = ["CachedSplit", "find_splits", "load_split", "read_attrs"]
