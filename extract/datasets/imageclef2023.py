"""ImageCLEFmedical 2023 / ROCOv2: `{split}_captions.csv` (ID,Caption), optional
`{split}_concepts.csv` (ID,CUIs) and `cui_names.csv` / `cui_mapping.csv` (CUI,Canonical name)."""
from __future__ import annotations

import re
from pathlib import Path

from medembed.extract.datasets.base import (
    SPLIT_NAME,
    first_concept_names,
    imageclef_splits,
    read_header_table,
)
from medembed.extract.records import Dataset

NAME = "imageclef2023"
CAPTIONS = re.compile(rf"^(?P<split>{SPLIT_NAME})_captions\.csv$")
LOOKS_FOR = "{split}_captions.csv"


def detect(folder: Path, names: list[str]) -> bool:
    return any(CAPTIONS.match(n) for n in names)


def read_folder(root: Path, name: str) -> Dataset:
    """Every split of the folder, captions paired with their images by ID."""
    records, warnings = imageclef_splits(
        root, CAPTIONS, lambda path: read_header_table(path, ("caption", "captions"), "Caption"),
        lambda split: root / f"{split}_concepts.csv",
        lambda path: read_header_table(path, ("cuis", "cui", "concepts"), "CUIs"))
    concept_names = first_concept_names(root, ("cui_names.csv", "cui_mapping.csv"))
    return Dataset(name, str(root), "imageclef2023", records, concept_names, warnings=warnings)
