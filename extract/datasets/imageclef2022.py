"""ImageCLEF 2022: tab-separated `caption_prediction_{split}.csv` / `concept_detection_{split}.csv`
(header row optional) and `concepts.txt` (CUI<TAB>name); images in a folder or read out of a zip."""
from __future__ import annotations

import re
from pathlib import Path

from medembed.extract.datasets.base import (
    SPLIT_NAME,
    delimiter_of,
    imageclef_splits,
    read_concept_names,
    read_positional_table,
)
from medembed.extract.records import Dataset

NAME = "imageclef2022"
CAPTIONS = re.compile(rf"^caption_prediction_(?P<split>{SPLIT_NAME})\.csv$")
LOOKS_FOR = "caption_prediction_{split}.csv"


def detect(folder: Path, names: list[str]) -> bool:
    return any(CAPTIONS.match(n) for n in names)


def read_folder(root: Path, name: str) -> Dataset:
    """Every split of the folder, captions paired with their images by ID."""
    positional = lambda path: read_positional_table(path, delimiter_of(path))  # noqa: E731
    records, warnings = imageclef_splits(root, CAPTIONS, positional, lambda split: root / f"concept_detection_{split}.csv",
                                         positional)
    names_path = root / "concepts.txt"
    concept_names = read_concept_names(names_path, delimiter_of(names_path)) if names_path.is_file() else {}
    return Dataset(name, str(root), "imageclef2022", records, concept_names, warnings=warnings)
