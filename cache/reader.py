"""Read cache files: every other layer opens them through this module (`open_cache`,
`read_dataset`, `load_split`, `feature_chunks`, ...), so a damaged, truncated or foreign file is
refused the same way everywhere. The file's layout (dataset names, format version) is
`cache.schema`.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import torch

from medembed.cache import schema
from medembed.cache.schema import FEATURE_DATASETS, READABLE_FORMATS, REBUILD
from medembed.common.errors import BadInput, NotFound
from medembed.common.files import resolve_recorded
from medembed.common.splits import sort_splits


class CacheError(BadInput):
    """A cache file that cannot be trusted: unreadable, truncated, of an unknown format, failing its
    checksum, or holding non-finite features. Every command stops with this one line."""


def _open_checked(path: Path) -> h5py.File:
    """An open cache file whose format and shard sources were checked (see `open_cache`)."""
    if not path.exists():
        raise NotFound(f"{path}: no such cache file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 cache ({_reason(e)}); {REBUILD}") from None
    try:
        try:
            fmt = f.attrs.get(schema.FORMAT_ATTR)
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: damaged cache attributes ({_reason(e)}); {REBUILD}") from None
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt is not None and fmt not in READABLE_FORMATS:
            raise CacheError(f"{path}: cache format {fmt!r} is not one this version of medembed reads "
                             f"({', '.join(READABLE_FORMATS)}); upgrade medembed or {REBUILD}")
        if f.attrs.get(schema.FEATURES_IN_SHARDS):
            _check_shard_sources(f, path)
    except BaseException:
        f.close()
        raise
    return f


@contextmanager
def open_cache(path: str | Path) -> Iterator[h5py.File]:
    """The one way every layer opens a cache file: a missing file is FileNotFoundError, anything
    unreadable (not HDF5, truncated, an unknown format, a chunk failing its checksum while the block
    reads) a `CacheError` naming the file and saying how to rebuild it."""
    path = Path(path)
    with _open_checked(path) as f:
        try:
            yield f
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: damaged cache ({_reason(e)}); {REBUILD}") from None


class OpenCaches:
    """Cache files kept open for many small reads (a search pool's rows for every query), opened and
    checked once as `open_cache` does instead of once per read: at 10M images, opening the file (and
    checking its ten shard files) was a sixth of an indexed query. h5py serialises its calls, so one
    handle serves every thread of the page. Not carried across processes (pickled empty)."""

    def __init__(self) -> None:
        self._files: dict[str, h5py.File] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> h5py.File:
        key = os.path.abspath(path)
        with self._lock:
            if key not in self._files:
                self._files[key] = _open_checked(Path(path))
            return self._files[key]

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _check_shard_sources(f: h5py.File, path: Path) -> None:
    """A split joined from shards reads its features from the shard files beside it; HDF5 would read
    a missing one as fill values, so each is looked for before anything is read."""
    for name in FEATURE_DATASETS:
        if name in f and f[name].is_virtual:
            for src in {s.file_name for s in f[name].virtual_sources()}:
                if not (path.parent / src).is_file():
                    raise CacheError(f"{path}: its features are read from the shard file {path.parent / src}, which is "
                                     "missing; put it back beside it, or delete this file and extract that shard "
                                     "again (`cli.py extract --shard I/N`, I and N as in its name; or the whole "
                                     "split) before `cli.py cache merge`")


def _reason(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_dataset(f: h5py.File, name: str, sel=()) -> np.ndarray:
    """`f[name][sel]`, verified: a chunk failing its Fletcher-32 checksum, or NaN/Inf in a feature
    dataset, is a `CacheError` naming the file and the dataset."""
    try:
        arr = f[name][sel]
    except (OSError, KeyError) as e:
        reason = _reason(e)
        if "filter" in reason and name in f and f[name].fletcher32:
            reason = "its Fletcher-32 checksum does not match: the bytes changed after it was written"
        raise CacheError(f"{f.filename}: dataset {name} is damaged ({reason}); {REBUILD}") from None
    if name in FEATURE_DATASETS:
        check_finite(arr, f.filename, name)
    return arr


def count_non_finite(arr: np.ndarray) -> int:
    """How many NaN/Inf values a float array holds (one pass; 0 for other dtypes)."""
    return arr.size - int(np.isfinite(arr).sum()) if arr.dtype.kind == "f" and arr.size else 0


def check_finite(arr: np.ndarray, path: str | Path, name: str) -> None:
    """Refuse NaN/Inf features by name: they would rank as silently wrong numbers, not fail."""
    bad = count_non_finite(arr)
    if bad:
        raise CacheError(f"{path}: dataset {name} holds {bad} non-finite values (NaN or Inf); {REBUILD}")


def strings(ds: h5py.Dataset, sel=()) -> list[str]:
    """A string dataset (or the rows `sel` of it) as Python strings (h5py decodes the UTF-8)."""
    return ds.asstr()[sel].tolist()


def _attrs(f: h5py.File) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


@dataclass
class CachedSplit:
    split: str
    image_ids: list[str]
    image_features: torch.Tensor  # [N, Di] float32
    caption_features: torch.Tensor  # [M, Dt] float32
    caption_image: torch.Tensor  # [M] int64
    captions: list[str]
    concept_ids: list[str] = field(default_factory=list)
    concept_names: list[str] = field(default_factory=list)
    concepts: sp.csr_matrix | None = None  # [N, C] multi-hot
    concept_text_features: torch.Tensor | None = None  # [C, T, Dt] float32
    templates: list[str] = field(default_factory=list)
    view_features: torch.Tensor | None = None  # [N, V, Di] float32
    image_locations: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    path: str = ""
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, location, reason) of unreadable images
    first_image: int = 0  # a slice of a file (`load_split_rows`): the file's row of this split's image 0
    first_caption: int = 0  # ... and of its caption 0

    @property
    def n_images(self) -> int:
        return self.image_features.shape[0]

    @property
    def n_captions(self) -> int:
        return self.caption_features.shape[0]

    @property
    def data_root(self) -> str:
        """The dataset folder the image locations are relative to: found through the path recorded
        relative to this cache file when data and features moved together, else the absolute one."""
        return recorded_data_root(self.attrs, self.path)

    def image_path(self, row: int, root: str | Path | None = None) -> str:
        """Where image `row` lives: its recorded location joined onto the data root (or `root`, a
        dataset folder given by hand; "" when unknown); an archive member keeps its
        `ARCHIVE.zip::member` form, a private location its `ROOT::private:ID` form."""
        loc = self.image_locations[row] if row < len(self.image_locations) else ""
        if not loc:
            return ""
        return location_path(loc, str(root) if root is not None else self.data_root)

    def first_captions(self) -> dict[int, str]:
        """The first caption of every image that has one (labels for image tiles and exports)."""
        out: dict[int, str] = {}
        for text, row in zip(self.captions, self.caption_image.tolist()):
            out.setdefault(int(row), text)
        return out

    def concept_dense(self) -> np.ndarray:
        """[N, C] bool; fine for the small splits tests and few-shot use."""
        if self.concepts is None:
            return np.zeros((self.n_images, 0), dtype=bool)
        return self.concepts.toarray().astype(bool)


def location_path(loc: str, root: str) -> str:
    """A recorded image location joined onto the dataset folder it is relative to (see
    `CachedSplit.image_path`); "" for an unknown location."""
    if not loc:
        return ""
    if loc.startswith(schema.PRIVATE_LOCATION):  # resolved by reading the data folder again
        return f"{root}{schema.ZIP_SEP}{loc}"
    archive, sep, member = loc.partition(schema.ZIP_SEP)
    if root and not os.path.isabs(archive):
        archive = os.path.join(root, archive)
    return archive + sep + member


def recorded_data_root(attrs: dict, cache_path: str | Path) -> str:
    """`data_root` of a cache file's attributes, resolved as `CachedSplit.data_root` explains."""
    absolute = str(attrs.get(schema.DATA_ROOT, "") or "")
    if not absolute:
        return ""
    base = Path(cache_path).parent if cache_path else Path(".")
    return str(resolve_recorded(absolute, attrs.get(schema.DATA_ROOT_RELATIVE) or None, base))


def _read_float(f: h5py.File, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """One verified read of the whole dataset (chunks are row blocks), widened to `dtype`
    (None: the stored dtype)."""
    out = torch.from_numpy(np.ascontiguousarray(read_dataset(f, name)))
    return out if dtype is None else out.to(dtype)


def read_attrs(path: str | Path) -> dict:
    with open_cache(path) as f:
        return _attrs(f)


def feature_widths(path: str | Path) -> tuple[int, int]:
    """(image feature width, caption feature width) of a cache file, without reading features."""
    with open_cache(path) as f:
        return int(f[schema.IMAGE_FEATURES].shape[1]), int(f[schema.CAPTION_FEATURES].shape[1])


def _skipped(f: h5py.File) -> list[tuple[str, str, str]]:
    if schema.SKIPPED_IDS not in f:
        return []
    return list(zip(strings(f[schema.SKIPPED_IDS]), strings(f[schema.SKIPPED_LOCATIONS]), strings(f[schema.SKIPPED_REASONS])))


def read_skipped(path: str | Path) -> list[tuple[str, str, str]]:
    """(id, location, reason) of every image the extraction could not read."""
    with open_cache(path) as f:
        return _skipped(f)


def read_strings(path: str | Path, name: str) -> list[str]:
    """One string dataset of a cache file (e.g. `schema.IMAGE_IDS`, `schema.CAPTION_TEXT`) without its features."""
    with open_cache(path) as f:
        return strings(f[name])


def feature_rows(path: str | Path) -> int:
    """How many images a cache file holds (its header only)."""
    with open_cache(path) as f:
        return int(f[schema.IMAGE_FEATURES].shape[0])


def feature_chunks(path: str | Path, name: str = schema.IMAGE_FEATURES, rows: int = 65536) -> Iterator[np.ndarray]:
    """A feature dataset of a cache file, `rows` at a time as stored (never the whole file in memory)."""
    with open_cache(path) as f:
        for s in range(0, f[name].shape[0], rows):
            yield read_dataset(f, name, np.s_[s : s + rows])


def verify_cache(path: str | Path, block_bytes: int = 64 * 2**20) -> None:
    """Read every numeric dataset of a cache file once, a block of rows at a time, through its
    Fletcher-32 checksums and (features) the NaN/Inf check: a `CacheError` naming the file and the
    first damaged dataset, else nothing. For what accepts a cache without reading all of it
    (`relink`), or must tell a damaged cache from a stale index; O(file), in `block_bytes` of memory."""
    with open_cache(path) as f:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.dtype.kind in "fiub" and obj.ndim else None)
        for name in names:
            ds = f[name]
            row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
            step = max(1, block_bytes // row_bytes)
            for s in range(0, ds.shape[0], step):
                read_dataset(f, name, np.s_[s : s + step])


def string_chunks(path: str | Path, name: str, rows: int = 262144) -> Iterator[list[str]]:
    """A string dataset of a cache file (e.g. `schema.IMAGE_IDS`), `rows` at a time."""
    with open_cache(path) as f:
        for s in range(0, f[name].shape[0], rows):
            yield strings(f[name], np.s_[s : s + rows])


def load_split(path: str | Path, with_views: bool = True, dtype: torch.dtype | None = torch.float32,
               with_captions: bool = True) -> CachedSplit:
    """A whole cache file in memory; features as `dtype` (None: as stored, float16 by default).
    `with_captions=False` leaves the captions out (no rows), for uses that need only images and labels."""
    path = Path(path)
    with open_cache(path) as f:
        if schema.IMAGE_FEATURES not in f:
            raise BadInput(f"{path}: not a feature cache (no images/features dataset)")
        attrs = _attrs(f)
        n = f[schema.IMAGE_FEATURES].shape[0]
        concepts = None
        concept_ids: list[str] = []
        concept_names: list[str] = []
        ctf = None
        templates: list[str] = []
        if schema.CONCEPT_IDS in f:
            concept_ids = strings(f[schema.CONCEPT_IDS])
            concept_names = strings(f[schema.CONCEPT_NAMES])
            indptr = read_dataset(f, schema.CONCEPT_INDPTR).astype(np.int64)
            indices = read_dataset(f, schema.CONCEPT_INDICES).astype(np.int64)
            concepts = sp.csr_matrix(
                (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n, len(concept_ids))
            )
            if schema.CONCEPT_TEXT_FEATURES in f:
                ctf = _read_float(f, schema.CONCEPT_TEXT_FEATURES, dtype)
                templates = strings(f[schema.CONCEPT_TEMPLATES])
        views = _read_float(f, schema.VIEW_FEATURES, dtype) if with_views and schema.VIEW_FEATURES in f else None
        return CachedSplit(
            split=attrs.get(schema.SPLIT, path.stem),
            image_ids=strings(f[schema.IMAGE_IDS]),
            image_features=_read_float(f, schema.IMAGE_FEATURES, dtype),
            caption_features=_read_float(f, schema.CAPTION_FEATURES, dtype) if with_captions else
            torch.zeros(0, f[schema.CAPTION_FEATURES].shape[1]),
            caption_image=torch.from_numpy(read_dataset(f, schema.CAPTION_IMAGE_ROW).astype(np.int64)) if with_captions else
            torch.zeros(0, dtype=torch.long),
            captions=strings(f[schema.CAPTION_TEXT]) if with_captions else [],
            concept_ids=concept_ids,
            concept_names=concept_names,
            concepts=concepts,
            concept_text_features=ctf,
            templates=templates,
            view_features=views,
            image_locations=strings(f[schema.IMAGE_LOCATIONS]) if schema.IMAGE_LOCATIONS in f else [],
            attrs=attrs,
            path=str(path),
            skipped=_skipped(f),
        )


def check_caption_order(caption_image: np.ndarray, path: str | Path) -> np.ndarray:
    """`caption_image` itself, after checking that captions are stored image by image (the writer and
    the shard join keep that order; slices of images rely on it)."""
    if caption_image.size and np.any(caption_image[1:] < caption_image[:-1]):
        raise CacheError(f"{path}: captions are not stored image by image; {REBUILD}")
    return caption_image


def caption_rows_of(caption_image: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """[first, end) of the captions of images [lo, hi): one range, since captions are stored image by
    image (the writer and the shard join keep that order)."""
    return int(np.searchsorted(caption_image, lo, "left")), int(np.searchsorted(caption_image, hi, "left"))


def load_split_rows(path: str | Path, lo: int, hi: int, caption_image: np.ndarray | None = None,
                    dtype: torch.dtype | None = torch.float32) -> CachedSplit:
    """Images [lo, hi) of a cache file and their captions, as a split of their own (rows re-based;
    `first_image` / `first_caption` say where it starts in the file), read without the rest of the
    file: for passes over a split too large to hold. `caption_image` (the file's caption -> image rows,
    8 bytes a caption) saves reading it again for every slice; the caller then checks its order once
    (`check_caption_order`)."""
    path = Path(path)
    with open_cache(path) as f:
        if caption_image is None:
            caption_image = check_caption_order(read_dataset(f, schema.CAPTION_IMAGE_ROW).astype(np.int64), path)
        n = int(f[schema.IMAGE_FEATURES].shape[0])
        lo, hi = max(0, lo), min(n, hi)
        c0, c1 = caption_rows_of(caption_image, lo, hi)
        concepts, concept_ids, concept_names = None, [], []
        if schema.CONCEPT_IDS in f:
            concept_ids, concept_names = strings(f[schema.CONCEPT_IDS]), strings(f[schema.CONCEPT_NAMES])
            ptr = read_dataset(f, schema.CONCEPT_INDPTR, np.s_[lo : hi + 1]).astype(np.int64)
            idx = read_dataset(f, schema.CONCEPT_INDICES, np.s_[ptr[0] : ptr[-1]]).astype(np.int64)
            concepts = sp.csr_matrix((np.ones(len(idx), np.float32), idx, ptr - ptr[0]),
                                     shape=(hi - lo, len(concept_ids)))
        img = read_dataset(f, schema.IMAGE_FEATURES, np.s_[lo:hi])
        cap = read_dataset(f, schema.CAPTION_FEATURES, np.s_[c0:c1])
        as_t = (lambda x: torch.from_numpy(np.ascontiguousarray(x))) if dtype is None else \
            (lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dtype))
        return CachedSplit(
            split=_attrs(f).get(schema.SPLIT, path.stem),
            image_ids=strings(f[schema.IMAGE_IDS], np.s_[lo:hi]),
            image_features=as_t(img),
            caption_features=as_t(cap),
            caption_image=torch.from_numpy(caption_image[c0:c1] - lo),
            captions=strings(f[schema.CAPTION_TEXT], np.s_[c0:c1]),
            concept_ids=concept_ids,
            concept_names=concept_names,
            concepts=concepts,
            image_locations=strings(f[schema.IMAGE_LOCATIONS], np.s_[lo:hi]) if schema.IMAGE_LOCATIONS in f else [],
            attrs=_attrs(f),
            path=str(path),
            first_image=lo,
            first_caption=c0,
        )


@dataclass
class SplitHeader:
    """What a pass over a cache file too large to hold keeps in memory: its sizes and widths, the
    caption -> image rows (8 bytes a caption), the concept labels (sparse) and the attributes. Ids,
    captions, locations and features are read from the file a few rows (`read_rows`) or a slice
    (`load_split_rows`) at a time."""

    split: str
    path: Path
    n_images: int
    n_captions: int
    image_dim: int
    text_dim: int
    itemsize: int
    caption_image: np.ndarray  # [M] int64, image by image
    attrs: dict
    concept_ids: list[str] = field(default_factory=list)
    concept_names: list[str] = field(default_factory=list)
    concepts: sp.csr_matrix | None = None  # [N, C] multi-hot
    has_locations: bool = False  # does the file record where each image lives

    @property
    def data_root(self) -> str:
        return recorded_data_root(self.attrs, self.path)

    def first_caption_rows(self, rows: np.ndarray) -> np.ndarray:
        """The file row of each image's first caption, -1 for an image without one."""
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self.caption_image, rows, "left")
        found = at < self.n_captions
        found[found] = self.caption_image[at[found]] == rows[found]
        return np.where(found, at, -1)


def read_header(path: str | Path) -> SplitHeader:
    """A cache file's `SplitHeader`: everything but its ids, captions, locations and features."""
    path = Path(path)
    with open_cache(path) as f:
        if schema.IMAGE_FEATURES not in f:
            raise BadInput(f"{path}: not a feature cache (no images/features dataset)")
        img, cap = f[schema.IMAGE_FEATURES], f[schema.CAPTION_FEATURES]
        n = int(img.shape[0])
        attrs = _attrs(f)
        caption_image = check_caption_order(read_dataset(f, schema.CAPTION_IMAGE_ROW).astype(np.int64), path)
        concepts, concept_ids, concept_names = None, [], []
        if schema.CONCEPT_IDS in f:
            concept_ids, concept_names = strings(f[schema.CONCEPT_IDS]), strings(f[schema.CONCEPT_NAMES])
            ptr = read_dataset(f, schema.CONCEPT_INDPTR).astype(np.int64)
            idx = read_dataset(f, schema.CONCEPT_INDICES).astype(np.int64)
            concepts = sp.csr_matrix((np.ones(len(idx), np.float32), idx, ptr), shape=(n, len(concept_ids)))
        return SplitHeader(attrs.get(schema.SPLIT, path.stem), path, n, int(cap.shape[0]), int(img.shape[1]),
                           int(cap.shape[1]), int(img.dtype.itemsize), caption_image, attrs, concept_ids,
                           concept_names, concepts, schema.IMAGE_LOCATIONS in f)


def read_rows(path: str | Path, name: str, rows, files: OpenCaches | None = None) -> np.ndarray | list[str]:
    """Rows `rows` (any order, repeats allowed) of one dataset of a cache file: a string dataset as a
    list of str, a feature dataset as a verified array. Only those rows are read; through `files`'
    open handle when given, else the file is opened for this read."""
    if files is None:
        with open_cache(path) as f:
            return _rows_of(f, name, rows)
    f = files.get(path)
    try:
        return _rows_of(f, name, rows)
    except (OSError, KeyError) as e:
        raise CacheError(f"{path}: damaged cache ({_reason(e)}); {REBUILD}") from None


def _rows_of(f: h5py.File, name: str, rows) -> np.ndarray | list[str]:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    unique, back = np.unique(rows, return_inverse=True)
    ds = f[name]
    if h5py.check_string_dtype(ds.dtype) is not None:
        got = np.array(ds.asstr()[unique] if unique.size else [], dtype=object)
        return got[back].tolist()
    got = read_dataset(f, name, unique) if unique.size else np.zeros((0, *ds.shape[1:]), ds.dtype)
    return got[back]


def find_splits(features_dir: str | Path) -> dict[str, Path]:
    """Finished split files in a features folder (`schema.split_file` of each split), train/valid/test first."""
    d = Path(features_dir)
    if not d.is_dir():
        raise NotFound(f"{d}: no such features folder (run `cli.py extract` first)")
    files = {p.stem: p for p in sorted(d.glob(schema.FILE_GLOB)) if not schema.is_shard_file(p.name)}
    if not files:
        raise NotFound(f"{d}: no finished cache files ({schema.FILE_GLOB}); run `cli.py extract` first")
    return {name: files[name] for name in sort_splits(files)}
