"""ImageCLEF 2022: tab-separated `caption_prediction_{split}.csv` / `concept_detection_{split}.csv`
(header row optional) and `concepts.txt` (CUI<TAB>name); images in a folder or read out of a zip."""
from __future__ import annotations

import re
from pathlib import Path

from medembed.extract.datasets.base import (
    SPLIT_NAME,
    ImageIndex,
    delimiter_of,
    imageclef_records,
    read_concept_names,
    read_positional_table,
    split_files,
)
from medembed.extract.records import Dataset, Record

NAME = "imageclef2022"
CAPTIONS = re.compile(rf"^caption_prediction_(?P<split>{SPLIT_NAME})\.csv$")
LOOKS_FOR = "caption_prediction_{split}.csv"


def detect(folder: Path, names: list[str]) -> bool:
    return any(CAPTIONS.match(n) for n in names)


def read(root: Path, name: str) -> Dataset:
    """Every split of the folder, captions paired with their images by ID."""
    index = ImageIndex(root)
    records: list[Record] = []
    warnings: list[str] = []
    for split, caption_path in split_files(root, CAPTIONS).items():
        captions = read_positional_table(caption_path, delimiter_of(caption_path))
        concept_path = root / f"concept_detection_{split}.csv"
        concepts = read_positional_table(concept_path, delimiter_of(concept_path)) if concept_path.is_file() else None
        records += imageclef_records(root, split, captions, concepts, index, warnings)
    names_path = root / "concepts.txt"
    concept_names = read_concept_names(names_path, delimiter_of(names_path)) if names_path.is_file() else {}
    return Dataset(name, str(root), "imageclef2022", records, concept_names, warnings=warnings)




def read_folder(folder: Path, name: str) -> Dataset:
    return read(folder, name)
