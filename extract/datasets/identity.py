"""How records are identified: by their path, or, where paths may identify patients, by a keyed hash.

PACS and archive exports name folders by patient name or ID (`Doe_Jane/img000.dcm`), so a record
identified by its path would carry the name into every cache, index, export and page. The safe
choice must not depend on the user reading the README: image-only collections (what an archive
export is read as) and any dataset whose images are DICOM are identified by an HMAC of the image's
path below the data folder (`path_key`), and the cache keeps only that id as the location (found
again by hashing the folder's paths, see `imaging.locations`). `--readable-paths` keeps the paths,
for collections whose paths are known to name no one.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from medembed.cache import schema
from medembed.cache.provenance import ProvenanceMismatch
from medembed.cache.reader import open_cache, string_chunks
from medembed.cache.schema import ZIP_SEP
from medembed.extract.access import name_problem
from medembed.extract.datasets.image_folder import NAME as IMAGES
from medembed.extract.datasets.image_folder import dicom_marker
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
from medembed.extract.imaging.locations import relative_location
from medembed.extract.imaging.nifti import NIFTI_SUFFIXES
from medembed.extract.imaging.raster import RASTER_SUFFIXES
from medembed.extract.path_key import KEY_ENV, load_path_key
from medembed.extract.records import Dataset

OTHER_SUFFIXES = RASTER_SUFFIXES + NIFTI_SUFFIXES
MARKER_PROBES = 256  # files without an image suffix read for the DICOM marker, at most, per load


def identify(dataset: Dataset, readable_paths: bool = False) -> Dataset:
    """The dataset with its records named by a keyed hash of their path when the paths may identify
    patients (unless `readable_paths`); a dataset its reader already keyed (MIMIC-CXR) is kept."""
    if dataset.id_key:
        return dataset
    why = _why_private(dataset)
    if why is None:
        return dataset
    if readable_paths:
        if dataset.private_paths:
            dataset.warnings.append(f"{dataset.root}: paths hold DICOM UIDs, which identify studies; kept readable "
                                    "because of --readable-paths")
        return replace(dataset, private_paths=False)
    key, root = load_path_key(create=True), dataset.root
    records = dataset.records.replace_column(
        "image_id", lambda _, image: key.image_id(relative_location(image, root)), using="image")
    dataset.refused.hide_names = True
    warning = (f"{root}: {why}, whose paths may name patients: records are named by a keyed hash of their path and "
               "caches keep no path (--readable-paths keeps them)")
    return replace(dataset, records=records, private_paths=True, id_key=key.key_id,
                   warnings=[*dataset.warnings, warning])


def _why_private(dataset: Dataset) -> str | None:
    if dataset.layout == IMAGES:
        return "an image-only collection"
    if dataset.private_paths:
        return "paths that hold DICOM UIDs"
    if holds_dicom(dataset):
        return "DICOM images"
    return None


def holds_dicom(dataset: Dataset) -> bool:
    """Whether any image is DICOM: by its suffix, looked at first for every image (no file opened),
    else by the "DICM" marker of files with no image suffix. Runs on every load of a dataset, so those
    are probed at most MARKER_PROBES times, spread evenly over them (read only from files the data
    folder's rule lets be read): an export of extensionless DICOM files is found by its first probe,
    and a million extensionless files of another kind cost a few hundred reads, not a million."""
    unsuffixed = 0
    for path, member in _locations(dataset):
        name = (member or path).lower()
        if name.endswith(DICOM_SUFFIXES):
            return True
        unsuffixed += not member and not name.endswith(OTHER_SUFFIXES)
    if not unsuffixed:
        return False
    step, seen, access = -(-unsuffixed // MARKER_PROBES), 0, dataset.access
    for path, member in _locations(dataset):
        if member or path.lower().endswith(OTHER_SUFFIXES):
            continue
        if seen % step == 0 and access.refusal(path) is None and dicom_marker(path):
            return True
        seen += 1
    return False


def _locations(dataset: Dataset) -> Iterator[tuple[str, str]]:
    """(file or container, member or "") of every record's image, a batch at a time."""
    for batch in dataset.records.column_batches("image"):
        for location in batch.to_pylist():
            path, _, member = location.partition(ZIP_SEP)
            yield path, member


class RecordNamingMismatch(ProvenanceMismatch):
    """A cache whose records are named another way than this run names them (readable paths, keyed
    hashes, another key, or the ids of an older version): refused in one line that says how to read
    it as before, instead of a list of provenance differences that only says to use another folder."""

    def __init__(self, path, diffs: list[str], message: str) -> None:
        self.path, self.diffs = str(path), diffs
        ValueError.__init__(self, message)


ANOTHER_OUT = "or extract it anew into another --out (--features-root for commands given --data), or delete it to rebuild it"
_NAMING_KEYS = {schema.IMAGE_ID_SCHEME, schema.DATASET_FINGERPRINT}


def naming_mismatch(path, existing: dict, wanted: dict, diffs: list[str]) -> RecordNamingMismatch | None:
    """The refusal for the cache file at `path` when its provenance (`existing`) differs from this
    run's (`wanted`) only in how records are named: `image_ids`, and the fingerprint the ids enter
    (alone when the cache holds ids this version no longer makes). None for any other difference."""
    if not diffs or not {d.split(":", 1)[0] for d in diffs} <= _NAMING_KEYS:
        return None
    old, new = _key_of(existing.get(schema.IMAGE_ID_SCHEME)), _key_of(wanted.get(schema.IMAGE_ID_SCHEME))
    if old == new:  # the fingerprint alone: ids written in the annotations that are now named below the folder
        if not _holds_unsafe_ids(path):
            return None
        why = ("its records are named by the absolute paths (or paths leaving the data folder) its annotations give, "
               "this version names them by their paths below the data folder")
        fix = ANOTHER_OUT.removeprefix("or ")
    elif old and new:
        why = f"its records are named by keyed hashes of their paths made with path key {old}, this machine's key is {new}"
        fix = f"point {KEY_ENV} at the key file of the machine that extracted it, {ANOTHER_OUT}"
    elif old:
        why = f"its records are named by keyed hashes of their paths (path key {old}), this run names them by their paths"
        fix = f"read it without --readable-paths, {ANOTHER_OUT}"
    elif _holds_private_locations(path):
        why = ("its records are named by unkeyed hashes of their paths (made before ids were keyed), this run names "
               f"them by keyed hashes (path key {new})")
        fix = ANOTHER_OUT.removeprefix("or ")
    else:
        why = (f"its records are named by their readable paths, this run names them by keyed hashes of their paths "
               f"(path key {new}), as it does wherever paths may name patients")
        fix = f"pass --readable-paths to read it as before, {ANOTHER_OUT}"
    return RecordNamingMismatch(path, diffs, f"{path}: made with another way of naming records: {why}; {fix}")


def _key_of(image_ids) -> str:
    """The key id a cache's `image_ids` attribute names ("" when records are not keyed)."""
    return str(image_ids).rpartition(" ")[2] if image_ids else ""


def _holds_private_locations(path) -> bool:
    """Whether a cache stored private locations (all or none are: see `extraction._stored_location`)."""
    with open_cache(path) as f:
        if schema.IMAGE_LOCATIONS not in f:
            return False
    first = next(string_chunks(path, schema.IMAGE_LOCATIONS), [])
    return any(location.startswith(schema.PRIVATE_LOCATION) for location in first)


def _holds_unsafe_ids(path) -> bool:
    """Whether any id of a cache is one no reader makes any more: absolute, or holding a `..` part."""
    return any(name_problem(i) is not None for chunk in string_chunks(path, schema.IMAGE_IDS) for i in chunk)
