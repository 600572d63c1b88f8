"""Read a data folder in any supported layout into one `Dataset`.

People point the toolkit at whatever they downloaded, so the layout is recognised from file names
rather than configured: a wrong guess would silently mis-pair images and captions, hence every problem
with the annotations stops with the file and line to fix, and only harmless gaps are tolerated (empty
captions dropped and counted in `Dataset.warnings`; images missing on disk kept, so the extractor can
report them next to unreadable ones).

One module per layout (`imageclef2023`, `imageclef2022`, `rocov2_parquet`, `mimic_cxr`, `openi`,
`webdataset_shards`, `generic`), each with `NAME`, `LOOKS_FOR` (what its detection looks for, for the
error when nothing matches), `detect(folder, file_names)` and `read_folder(folder, dataset_name)`.
`LAYOUTS` lists them in the order they are tried: adding a layout is one module and one line there.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from medembed.extract.datasets import (
    generic,
    image_folder,
    imageclef2022,
    imageclef2023,
    mimic_cxr,
    openi,
    rocov2_parquet,
    webdataset_shards,
)
from medembed.extract.datasets.base import ANNOTATION_EXTENSIONS, SYNTHETIC_MARKER, DatasetError
from medembed.extract.datasets.identity import identify
from medembed.extract.records import Dataset

# an annotations file the user wrote (generic) wins over a stray .tar, .xml or parquet file beside it
LAYOUTS: tuple[ModuleType, ...] = (imageclef2023, imageclef2022, generic, rocov2_parquet, mimic_cxr, openi,
                                   webdataset_shards, image_folder)

__all__ = ["LAYOUTS", "SYNTHETIC_MARKER", "DatasetError", "detect_layout", "load_dataset"]


REPORT_LAYOUTS = (mimic_cxr, openi)  # layouts whose captions are sections of free-text reports
# layouts that list what they read (folder trees, tar shards) and so are told whether to follow links out
# of the folder; every other layout's images are checked as they are read (`Dataset.access`)
WALKING_LAYOUTS = (image_folder, webdataset_shards)


def load_dataset(path: str | Path, name: str | None = None, report_sections: str | None = None,
                 follow_links: bool = False, readable_paths: bool = False) -> Dataset:
    """Read a data folder (or one annotations file) of any supported layout, all splits at once.
    `report_sections` chooses the report sections that become captions (MIMIC-CXR and OpenI only:
    findings, impression, findings+impression (their default) or all). What may be read keeps to the
    folder (`extract.access`) unless `follow_links`; records whose paths may identify patients are
    named by a keyed hash of their path unless `readable_paths` (`datasets.identity`)."""
    path = Path(os.path.normpath(Path(path).expanduser().absolute()))
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    try:
        dataset = _load(path, name, report_sections, follow_links)
        dataset.follow_links = follow_links
        return identify(dataset, readable_paths)
    except OSError as e:  # an unreadable folder or a damaged file: one line naming it, not a traceback
        where = e.filename or path
        raise DatasetError(f"{where}: cannot read ({e.strerror or str(e).splitlines()[0]})") from None


def _load(path: Path, name: str | None, report_sections: str | None, follow_links: bool) -> Dataset:
    layout = _layout(detect_layout(path))
    folder = path if path.is_dir() else path.parent
    dataset_name = name or folder.name
    extra = {}
    if report_sections is not None:
        if layout not in REPORT_LAYOUTS or path.is_file():
            raise DatasetError(f"{path}: --report-sections applies to report layouts "
                               f"({', '.join(m.NAME for m in REPORT_LAYOUTS)}), not to the {layout.NAME} layout")
        extra["report_sections"] = mimic_cxr.check_sections(report_sections)
    if layout in WALKING_LAYOUTS:
        extra["follow_links"] = follow_links
    dataset = generic.read(path, dataset_name) if path.is_file() else layout.read_folder(folder, dataset_name, **extra)
    dataset.synthetic = (folder / SYNTHETIC_MARKER).is_file()
    return dataset


def _layout(name: str) -> ModuleType:
    return next(m for m in LAYOUTS if m.NAME == name)


def detect_layout(path: str | Path) -> str:
    """The name of the first layout in `LAYOUTS` that recognises the folder (an annotations file is
    the generic layout); DatasetError listing what was looked for when none does."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in ANNOTATION_EXTENSIONS:
            return generic.NAME
        raise DatasetError(f"{path}: not an annotations file (expected one of {', '.join(ANNOTATION_EXTENSIONS)})")
    names = [p.name for p in path.iterdir() if p.is_file()]
    for layout in LAYOUTS:
        if layout.detect(path, names):
            return layout.NAME
    candidates, _ = generic.annotation_files(path)
    looked = "; ".join(f"{m.LOOKS_FOR} ({m.NAME})" for m in LAYOUTS)
    found = f"; found {', '.join(p.name for p in candidates)} without those columns" if candidates else ""
    raise DatasetError(f"{path}: no dataset layout recognised. Looked for: {looked}{found}")
