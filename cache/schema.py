"""What a cache file is: its format version and the datasets that hold numbers.

Format 2 stores every numeric dataset with HDF5's Fletcher-32 checksum filter (HDF5 checks each
chunk on read, so a flipped byte is refused instead of trained on) and never holds a non-finite
feature. Format 1 files (no checksums) are still read; a newer format than this toolkit knows is
refused with what to do.
"""
from __future__ import annotations

FORMAT = "medembed-cache/2"
READABLE_FORMATS = ("medembed-cache/1", FORMAT)

# float datasets: checked for NaN/Inf when written and when read
FEATURE_DATASETS = ("images/features", "images/view_features", "captions/features", "concepts/text_features")
REBUILD = "delete it and run `cli.py extract` again to rebuild it"
