"""ImageCLEFmedical 2023 / ROCOv2: `{split}_captions.csv` (ID,Caption), optional
`{split}_concepts.csv` (ID,CUIs) and `cui_names.csv` / `cui_mapping.csv` (CUI,Canonical name)."""
from __future__ import annotations

import re
from pathlib import Path

from medembed.extract.datasets.base import (
    SPLIT_NAME,
    ImageIndex,
    imageclef_records,
    read_concept_names,
    read_header_table,
    split_files,
)
from medembed.extract.records import Dataset, Record

NAME = "imageclef2023"
CAPTIONS = re.compile(rf"^(?P<split>{SPLIT_NAME})_captions\.csv$")
LOOKS_FOR = "{split}_captions.csv"


def detect(folder: Path, names: list[str]) -> bool:
    return any(CAPTIONS.match(n) for n in names)


def read(root: Path, name: str) -> Dataset:
    """Every split of the folder, captions paired with their images by ID."""
    index = ImageIndex(root)
    records: list[Record] = []
    warnings: list[str] = []
    for split, caption_path in split_files(root, CAPTIONS).items():
        captions = read_header_table(caption_path, ("caption", "captions"), "Caption")
        concept_path = root / f"{split}_concepts.csv"
        concepts = read_header_table(concept_path, ("cuis", "cui", "concepts"), "CUIs") if concept_path.is_file() else None
        records += imageclef_records(root, split, captions, concepts, index, warnings)
    concept_names: dict[str, str] = {}
    for candidate in ("cui_names.csv", "cui_mapping.csv"):
        if (root / candidate).is_file():
            concept_names = read_concept_names(root / candidate, ",")
            break
    return Dataset(name, str(root), "imageclef2023", records, concept_names, warnings=warnings)




def read_folder(folder: Path, name: str) -> Dataset:
    return read(folder, name)
