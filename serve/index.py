"""`cli.py index`: a FAISS index of a run's adapted image embeddings, so a query against millions
of images is no longer a scan of every one of them.

A FAISS file holds only vectors and row numbers. The JSON written beside it records what those
rows are: which cache files, in which order, with which image ids, embedded by which trained
heads. Loading compares that record with the run's cache and checkpoint as they are now and
refuses a stale index (re-extracted cache, retrained heads, a half-written file) with a message
saying how to rebuild it, so row 17 of an index is never read as image 17 of a different cache.

Inner product on unit vectors is the cosine, the score every metric here ranks by: `flat` is exact,
`ivf` scans only the `nprobe` closest of `nlist` k-means cells, `hnsw` walks a neighbour graph,
`ivfpq` keeps a short code per image instead of its vector (ten million images' index in under a
gigabyte) and its best candidates are re-scored exactly by `search`. `--kind auto` picks one for
the collection size and `--max-memory-gb` (see `index_plan`); ivf's lists are memory-mapped when read.

An ivfpq index keeps its full vectors on disk beside it (`{split}-ivfpq.vectors`: the rows added
to the index, float32, row after row): re-scoring reads its candidates' rows from there, a few
kilobytes each, where reading them from the cache would read a whole compressed chunk of features
per candidate and project it through the heads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.run import QUERYBANK, read_querybank, run_features_dir
from medembed.adapt.run_querybank import bank_offsets
from medembed.cache import schema
from medembed.cache.reader import (
    feature_chunks,
    feature_rows,
    find_splits,
    read_attrs,
    read_rows,
    read_strings,
    string_chunks,
    verify_cache,
)
from medembed.common.errors import AlreadyExists, BadInput, BadOption, BadRun, Incompatible, MedembedError, NotFound
from medembed.common.files import read_json, slug
from medembed.common.hashing import sha256_file
from medembed.common.locks import exclusive
from medembed.common.memory import format_bytes
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT
from medembed.model.runs import open_run, open_runs
from medembed.serve.index_kinds import INDEX_KINDS, index_kind
from medembed.serve.index_parts import PARTS_KINDS, add_chunks, fill_in_parts, write_part
from medembed.serve.index_plan import KIND_CHOICES, IndexPlan, plan_index

__all__ = [
    "IndexMeta", "IndexOptions", "IndexSource", "StaleIndexError", "available_indexes",
    "build_index", "format_index_summary", "index_paths", "load_index", "new_index", "read_vectors", "search_index",
    "stale_reasons", "tune", "vectors_path",
]

INDEX_DIR = "index"
POOLS_DIR = "pools"
FORMAT = "medembed-index/1"
ALL_SPLITS = "all"
INDEX_ENGINES = ("local", "ray")  # ray: ivf / ivfpq filled in parts on Ray workers, then merged (index_parts)
OWN_BANK = "own"  # `load_index`'s default bank: the run's own querybank.json
HEADS_FILE = ckpt.BEST
RUN_CONFIG = ckpt.CONFIG


class StaleIndexError(MedembedError, ValueError):
    """The index no longer describes the run's cache or heads: it must be rebuilt."""


@dataclass
class IndexOptions:
    """How to build one index. Zero means "pick from the number of vectors" (see `plan`)."""

    split: str = ALL_SPLITS  # a split name of the run's features folder, or "all" (every split, in order)
    kind: str = "auto"  # auto: flat while a scan is short, else ivfpq with the largest code that fits (index_plan)
    nlist: int = 0  # ivf/ivfpq: k-means cells; 0 = about sqrt(N) (ivfpq: 2 sqrt(N), a power of two), at most N/39
    nprobe: int = 0  # ivf/ivfpq: cells scanned per query; 0 = max(16, nlist/16) (ivfpq: 128)
    m: int = 32  # hnsw: graph links per vector
    ef_construction: int = 40  # hnsw: candidate list while inserting
    ef_search: int = 128  # hnsw: candidate list while searching
    train_size: int = 0  # ivf: vectors k-means trains on; 0 = min(N, 64 * nlist) (ivfpq: 39 * nlist)
    pq_bytes: int = 0  # ivfpq: bytes of code per vector (64, 32, 16 or 8); 0 = the largest the budget holds
    pq_dim: int = 256  # ivfpq: dimensions the vectors are projected to before coding
    rerank: int = 1000  # ivfpq: candidates re-scored exactly from the cache (at least k)
    max_memory_gb: float = 4.0  # what the index and its build may take; more is refused before building
    chunk_rows: int = 65536  # rows read, embedded and added at a time: bounds memory
    seed: int = 0
    data: str | None = None  # index this dataset (e.g. an image-only archive), encoded by the run's backbone
    features_root: str = DEFAULT_FEATURES_ROOT  # where `data`'s encoding is cached
    follow_links: bool = False  # `data`: read links leading out of its folder
    readable_paths: bool = False  # `data`: keep image paths as ids where they would be hashed
    engine: str = "local"  # ray: ivf / ivfpq filled in parts on Ray workers, then merged (index_parts)
    address: str | None = None  # the Ray cluster (None: start a local one)
    parts: int = 0  # Ray tasks; 0 = one per CPU of the cluster
    overwrite: bool = False  # replace an earlier index of the same split, kind and pool (swapped in whole)

    def __post_init__(self) -> None:
        if self.kind not in KIND_CHOICES:
            raise BadOption(f"kind must be one of {', '.join(KIND_CHOICES)}, got {self.kind!r}")
        for name in ("nlist", "nprobe", "train_size", "pq_bytes"):
            if getattr(self, name) < 0:
                raise BadOption(f"{name} must be >= 0 (0 picks it from the data size), got {getattr(self, name)}")
        if self.m < 2:
            raise BadOption(f"m (hnsw links per vector) must be >= 2, got {self.m}")
        for name in ("ef_construction", "ef_search", "chunk_rows", "pq_dim", "rerank"):
            if getattr(self, name) < 1:
                raise BadOption(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pq_bytes and self.pq_bytes not in (8, 16, 32, 64):
            raise BadOption(f"pq_bytes must be 8, 16, 32 or 64 (or 0: from the budget), got {self.pq_bytes}")
        if not self.max_memory_gb > 0:
            raise BadOption(f"--max-memory-gb must be above 0, got {self.max_memory_gb}")
        if self.engine not in INDEX_ENGINES:
            raise BadOption(f"engine must be {' or '.join(INDEX_ENGINES)}, got {self.engine!r}")

    def plan(self, n: int, dim: int) -> IndexPlan:
        """The kind and parameters actually used for `n` vectors of `dim` (what the JSON records)."""
        return plan_index(n, dim, self)


@dataclass
class IndexSource:
    """One cache file whose images fill a contiguous block of index rows."""

    split: str
    path: str
    n_images: int
    backbone: str
    dataset_fingerprint: str
    ids_sha256: str


@dataclass
class IndexMeta:
    """The JSON beside a FAISS file: what its rows are and where they came from."""

    kind: str
    split: str
    params: dict
    ntotal: int
    dim: int
    run_dir: str
    heads_sha256: str
    sources: list[IndexSource]
    image_ids: list[str]
    index_bytes: int = 0
    build_seconds: float = 0.0
    created: str = ""
    metric: str = "inner_product"
    format: str = FORMAT
    # the run's query-bank setting when the index holds each image's offset as a last coordinate
    # (queries then carry a 1 there); None: plain cosine
    querybank: dict | None = None
    # the indexed pool when it is not the run's own cache (`index --data`): its name and features folder
    pool: str = ""
    features_dir: str = ""
    vectors: str = ""  # the file of full vectors candidates are re-scored from (ivfpq), beside the FAISS file
    # how the pool's folder was read (`index --data`): a rebuild must read it the same way, or it
    # would encode the folder again as another pool (or be refused by its cache's provenance)
    follow_links: bool = False
    readable_paths: bool = False
    features_root: str = ""  # where the pool's encoding is cached (absolute)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> IndexMeta:
        if d.get("format") != FORMAT:
            raise BadInput(f"{where}: not a medembed index description (format {d.get('format')!r}, want {FORMAT!r})")
        d = dict(d)
        d["sources"] = [IndexSource(**s) for s in d.get("sources", [])]
        return cls(**d)

    def locate(self, row: int) -> tuple[str, int]:
        """Index row -> (split, image row in that split's cache)."""
        if not 0 <= row < self.ntotal:
            raise IndexError(f"row {row} outside the index (ntotal {self.ntotal})")
        for s in self.sources:
            if row < s.n_images:
                return s.split, row
            row -= s.n_images
        raise IndexError(f"row {row}: the index sources cover fewer rows than ntotal {self.ntotal}")


# ------------------------------------------------------------------ paths and hashes

def vectors_path(faiss_path: Path) -> Path:
    """Where an index's full vectors (re-scoring) live: beside its FAISS file."""
    return faiss_path.with_suffix(".vectors")


def read_vectors(path: Path, rows, dim: int) -> np.ndarray:
    """Rows of a vectors file [len(rows), dim] float32, each read on its own: only what is asked for
    is read, and nothing stays mapped in the process."""
    width = 4 * dim
    out = np.empty((len(rows), dim), dtype=np.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, row in enumerate(rows):
            data = os.pread(fd, width, int(row) * width)
            if len(data) != width:
                raise StaleIndexError(f"{path}: row {row} is past the end of the file; rebuild the index")
            out[i] = np.frombuffer(data, dtype=np.float32)
    finally:
        os.close(fd)
    return out


def index_paths(run_dir: str | Path, split: str, kind: str, pool: str | None = None) -> tuple[Path, Path]:
    """(`runs/NAME/index/{split}-{kind}.faiss`, the JSON beside it); an index of another dataset's
    pool (`index --data`) lives in `runs/NAME/index/pools/{pool}/`."""
    folder = Path(run_dir) / INDEX_DIR
    base = (folder / POOLS_DIR / pool if pool else folder) / f"{split}-{kind}"
    return base.with_suffix(".faiss"), base.with_suffix(".json")


def pool_name(data: str | Path) -> str:
    """What an index over `--data FOLDER` is filed under: the folder's name, as its cache is."""
    return slug(Path(os.path.normpath(Path(data).expanduser().absolute())).name)


def pool_run(run_dir: str | Path, data: str | Path, split: str, features_root: str | Path,
             follow_links: bool = False, readable_paths: bool = False):
    """The run pointed at `data` (a dataset folder) encoded by its own backbone, `split` of it or all
    (`follow_links`, `readable_paths`: how the folder is read, see `extract.access`)."""
    (run,) = open_runs([run_dir], data, None if split == ALL_SPLITS else [split], features_root,
                       follow_links=follow_links, readable_paths=readable_paths)
    return run


def heads_sha256(run_dir: str | Path) -> str:
    path = Path(run_dir) / HEADS_FILE
    return sha256_file(path) if path.exists() else ""


def _read_ids(path: Path) -> list[str]:
    return read_strings(path, schema.IMAGE_IDS)


def _split_files(features_dir: Path, split: str) -> dict[str, Path]:
    files = find_splits(features_dir)
    if split == ALL_SPLITS:
        return files
    if split not in files:
        raise NotFound(f"{features_dir}: no {schema.split_file(split)} (found: {', '.join(files)})")
    return {split: files[split]}


def _describe(split: str, path: Path) -> IndexSource:
    """What the index records of one cache file; its ids are hashed a block at a time (never all held)."""
    attrs = read_attrs(path)
    h, n = hashlib.sha256(), 0
    for block in string_chunks(path, schema.IMAGE_IDS):
        for i in block:
            h.update(i.encode("utf-8") + b"\x1f")
        n += len(block)
    return IndexSource(split=split, path=str(path), n_images=n, backbone=str(attrs.get(schema.BACKBONE, "")),
                       dataset_fingerprint=str(attrs.get(schema.DATASET_FINGERPRINT, "")), ids_sha256=h.hexdigest())


# ------------------------------------------------------------------ building

def new_index(kind: str, dim: int, params: dict) -> faiss.Index:
    """An empty index of `kind` for unit vectors (`params` from `IndexOptions.plan`), made by
    faiss's own factory (`serve.index_kinds`); ivf and ivfpq still need `train_index`."""
    return index_kind(kind).build(dim, params)


def train_index(index: faiss.Index, kind: str, sample) -> None:
    """Train an ivf or ivfpq index on a sample of its vectors (flat and hnsw need none): an array, or
    a callable returning the sample's chunks afresh (ivfpq reads it twice, so that the sample is never
    held at full dimension). How each kind trains is its record's (`serve.index_kinds`)."""
    train = index_kind(kind).train
    if train is not None:
        train(index, sample)


def fill_index(index: faiss.Index, chunks, keep=None) -> None:
    """Add vectors chunk by chunk (any iterable of [rows, d] arrays): only one chunk is held. `keep`
    (a binary file) also receives each chunk's float32 rows."""
    add_chunks(index, chunks, keep)


def _as_queries(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    return x


def _embed(run, raw: np.ndarray) -> np.ndarray:
    return _as_queries(run.embed_images(torch.from_numpy(np.asarray(raw, dtype=np.float32))))


def _sample_chunks(run, paths: list[Path], n: int, size: int, rows: int, seed: int):
    """Embeddings of `size` rows drawn uniformly over all files, chunk by chunk, in one streamed pass."""
    pick = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    offset = 0
    for path in paths:
        for chunk in feature_chunks(path, rows=rows):
            lo, hi = np.searchsorted(pick, [offset, offset + chunk.shape[0]])
            if hi > lo:
                yield _embed(run, chunk[pick[lo:hi] - offset])
            offset += chunk.shape[0]


def _staged(path: Path) -> Path:
    """The temporary name a file of a new index is written under, beside `path` (never listed as an index)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomic(index: faiss.Index, meta: IndexMeta, faiss_path: Path, json_path: Path,
                  staged_vectors: Path | None = None) -> None:
    """Every file of the new index written whole under a temporary name, then renamed over an earlier
    index's: the vectors (already written, at `staged_vectors`), the FAISS file, last the JSON that
    vouches for both. An earlier index is untouched until the new one is complete; a kill between the
    renames leaves a JSON whose index_bytes/ntotal no longer match: reported as stale."""
    faiss_path.parent.mkdir(parents=True, exist_ok=True)
    faiss_tmp, json_tmp = _staged(faiss_path), _staged(json_path)
    try:
        faiss.write_index(index, str(faiss_tmp))
        meta.index_bytes = faiss_tmp.stat().st_size
        # indented for a person to read while small; compact beyond (Python's json indents in pure Python,
        # one string per id: gigabytes at 10M images)
        indent = 1 if meta.ntotal <= 100_000 else None
        json_tmp.write_text(json.dumps(meta.to_dict(), indent=indent) + "\n")
        if staged_vectors is not None:
            os.replace(staged_vectors, vectors_path(faiss_path))
        os.replace(faiss_tmp, faiss_path)
        os.replace(json_tmp, json_path)
    finally:
        faiss_tmp.unlink(missing_ok=True)
        json_tmp.unlink(missing_ok=True)


def build_index(run_dir: str | Path, options: IndexOptions | None = None, run=None) -> tuple[Path, IndexMeta]:
    """Embed the split's cached images with the run's image head and write a FAISS index of them.

    `run` may be an already loaded run (anything with `embed_images`, `dim`, `features_dir`).
    Returns the FAISS file's path and its description.
    """
    options = options or IndexOptions()
    run_dir = Path(run_dir)
    pool = pool_name(options.data) if options.data is not None else None
    # one lock per split and pool, whatever kind "auto" turns out to be
    with exclusive(index_paths(run_dir, options.split, "build", pool)[0], "index build",
                   "wait for it to finish; it writes an index of the same split"):
        if options.kind != "auto":  # known now: refused before `--data` is encoded, which may take hours
            _check_replaceable(run_dir, options, options.kind, pool)
        return _build_index(run_dir, options, run, pool)


def _check_replaceable(run_dir: Path, options: IndexOptions, kind: str, pool: str | None) -> None:
    """An earlier index of this split, kind and pool is replaced only when `options.overwrite` says so."""
    faiss_path, json_path = index_paths(run_dir, options.split, kind, pool)
    if (faiss_path.exists() or json_path.exists()) and not options.overwrite:
        what = f"the {options.split} split" + (f" of {pool}" if pool else "")
        raise AlreadyExists(f"{faiss_path}: already holds a {kind} index of {what}; pass --overwrite to replace "
                            "it (swapped in whole once the new one is built)")


def _build_index(run_dir: Path, options: IndexOptions, run, pool: str | None) -> tuple[Path, IndexMeta]:
    if run is None:
        run = _index_run(run_dir, options)
    if getattr(run, "checkpoint", None) is not None:
        raise Incompatible(f"{run_dir}: a fine-tuned run (backbone and heads in {run.checkpoint.name}); indexes are kept "
                           "for adapter runs, and `search` on this run scans its pool exactly")
    t0 = time.perf_counter()
    run.split_files()  # a features folder that moved is named with how to re-point the run
    files = _split_files(Path(run.features_dir), options.split)
    sources = [_describe(split, path) for split, path in files.items()]
    n = sum(s.n_images for s in sources)
    if n == 0:
        raise Incompatible(f"{run.features_dir}: the {options.split} cache holds no images to index")
    setting, vectors = _row_vectors(run)
    plan = options.plan(n, run.dim + (setting is not None))  # refuses a budget the index cannot fit
    kind, params = plan.kind, plan.params
    if options.engine == "ray" and kind not in PARTS_KINDS:
        raise BadOption(f"--engine ray fills ivf and ivfpq indexes in parts; {kind} (what --kind {options.kind} "
                        f"gives for {n:,} images) is built on one machine: drop --engine ray or pass --kind ivfpq")
    _check_replaceable(run_dir, options, kind, pool)  # once planned: the kind "auto" gives is known
    index = new_index(kind, plan.dim, params)
    paths = list(files.values())
    if "train_size" in params:
        def sample():
            return (vectors(x) for x in _sample_chunks(run, paths, n, params["train_size"], plan.chunk_rows,
                                                       options.seed))

        train_index(index, kind, sample)
    faiss_path, json_path = index_paths(run_dir, options.split, kind, pool)
    keep = "rerank" in params  # the full vectors candidates are re-scored from, written as they are added
    kept = vectors_path(faiss_path).name if keep else ""
    # written under a temporary name: an earlier index's vectors stay in place until the new index is whole
    staged = _staged(vectors_path(faiss_path)) if keep else None
    faiss_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if options.engine == "ray":
            task_args = (str(run_dir), replace(options, chunk_rows=plan.chunk_rows))
            fill_in_parts(index, fill_part, task_args, n, faiss_path.parent, staged, options.address, options.parts)
        else:
            rows = (vectors(_embed(run, chunk)) for path in paths
                    for chunk in feature_chunks(path, rows=plan.chunk_rows))
            if keep:
                _fill_keeping(index, rows, staged)
            else:
                fill_index(index, rows)
        ids = [i for path in paths for i in _read_ids(path)]
        meta = IndexMeta(
            kind=kind, split=options.split, params=params, ntotal=int(index.ntotal), dim=int(index.d),
            run_dir=str(run_dir), heads_sha256=heads_sha256(run_dir), sources=sources, image_ids=ids,
            build_seconds=round(time.perf_counter() - t0, 3),
            created=datetime.now(UTC).isoformat(timespec="seconds"), querybank=setting,
            pool=pool or "", features_dir=str(Path(run.features_dir).resolve()) if pool else "", vectors=kept,
            follow_links=bool(pool) and options.follow_links, readable_paths=bool(pool) and options.readable_paths,
            features_root=str(Path(options.features_root).resolve()) if pool else "",
        )
        _write_atomic(index, meta, faiss_path, json_path, staged)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
    return faiss_path, meta


def _index_run(run_dir: Path, options: IndexOptions):
    """The run an index embeds with: over its own cache, or pointed at `options.data` (`index --data`)."""
    if options.data is not None:
        return pool_run(run_dir, options.data, options.split, options.features_root, options.follow_links,
                        options.readable_paths)
    return open_run(run_dir)


def _row_vectors(run):
    """(the image side of the run's query bank or None, unit embeddings -> index rows): with a bank,
    each row carries the image's offset as a last coordinate."""
    offsets = bank_offsets(run)
    setting = _image_side(offsets.setting) if offsets is not None else None

    def vectors(emb: np.ndarray) -> np.ndarray:
        if setting is None:
            return emb
        return np.ascontiguousarray(np.concatenate([emb, offsets.images(torch.from_numpy(emb)).numpy()[:, None]], 1))

    return setting, vectors


def _range_chunks(paths: list[Path], lo: int, hi: int, rows: int):
    """Raw image features of the pool's rows [lo, hi) (the files one after the other), `rows` at a time."""
    start = 0
    for path in paths:
        n = feature_rows(path)
        a, b = max(lo, start), min(hi, start + n)
        for s in range(a, b, rows):
            yield read_rows(path, schema.IMAGE_FEATURES, np.arange(s - start, min(b, s + rows) - start))
        start += n


def fill_part(run_dir: str, options: IndexOptions, lo: int, hi: int, base: str, keep_vectors: bool,
              empty: np.ndarray) -> int:
    """A Ray task's body (see `serve.index_parts`): the pool's rows [lo, hi), embedded by the run (opened
    here, on the worker), added to a copy of the trained index written at `base`; returns the rows added."""
    run = _index_run(Path(run_dir), options)
    _, vectors = _row_vectors(run)
    paths = list(_split_files(Path(run.features_dir), options.split).values())
    rows = (vectors(_embed(run, chunk)) for chunk in _range_chunks(paths, lo, hi, options.chunk_rows))
    return write_part(faiss.deserialize_index(empty), rows, base, keep_vectors)


def _fill_keeping(index: faiss.Index, rows, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        fill_index(index, rows, keep=f)


# ------------------------------------------------------------------ loading and checking

def _image_side(setting) -> dict | None:
    """What of a query-bank setting an image index depends on (text queries against images): the
    image side and where its bank is; None when that side is off."""
    if setting is None or not setting.images.active:
        return None
    return {"images": asdict(setting.images), "bank_split": setting.bank_split, "bank_features": setting.bank_features,
            **({"bank_rows": setting.bank_rows} if setting.bank_rows else {})}


def _features_dir(run_dir: Path) -> Path:
    cfg = run_dir / RUN_CONFIG
    if not cfg.exists():
        raise NotFound(f"{cfg}: no config.json, not an adapter run folder")
    config = read_json(cfg)
    if not config.get("features_dir"):
        raise BadRun(f"{cfg}: names no features_dir; cannot check the index against the cache")
    return run_features_dir(config, run_dir)


def stale_reasons(meta: IndexMeta, run_dir: str | Path, index: faiss.Index | None = None,
                  faiss_path: Path | None = None, bank=OWN_BANK) -> list[str]:
    """Every way the index differs from the run's cache and heads now; empty when it is current.

    `bank` is the query-bank setting the indexed pool is ranked with (None: plain cosine): OWN_BANK
    reads the run's own `querybank.json`; a pool of another dataset (`index --data`) is ranked with
    that dataset's own bank or plain cosine (`adapt.run_querybank.bank_for`), which only the caller
    that opened the pool knows."""
    return [reason for reason, _ in _stale(meta, Path(run_dir), index, faiss_path, bank)]


def _stale(meta: IndexMeta, run_dir: Path, index: faiss.Index | None, faiss_path: Path | None,
           bank) -> list[tuple[str, bool]]:
    """`stale_reasons`, each with whether it concerns the cache files (their number, sizes, ids,
    provenance or where they are), the reasons a damaged cache can show as."""
    out = []
    if index is not None and (int(index.ntotal) != meta.ntotal or int(index.d) != meta.dim):
        out.append((f"the FAISS file holds {index.ntotal} x {index.d}, its description says {meta.ntotal} x {meta.dim}",
                    False))
    if faiss_path is not None and meta.index_bytes and faiss_path.stat().st_size != meta.index_bytes:
        out.append((f"{faiss_path.name} is {faiss_path.stat().st_size} bytes, {meta.index_bytes} when it was built", False))
    if meta.vectors and faiss_path is not None:
        kept = faiss_path.with_name(meta.vectors)
        size = kept.stat().st_size if kept.exists() else -1
        if size != 4 * meta.ntotal * meta.dim:
            out.append((f"{kept.name} (the vectors candidates are re-scored from) is "
                        f"{'missing' if size < 0 else f'{size} bytes'}, {4 * meta.ntotal * meta.dim} when the index "
                        "was built", False))
    if meta.heads_sha256 != heads_sha256(run_dir):
        out.append((f"the run's heads ({HEADS_FILE}) changed since the index was built", False))
    setting = _image_side(read_querybank(run_dir) if bank == OWN_BANK else bank)
    if setting != meta.querybank:
        # the bank read from another folder: its cache moved (`relink`), perhaps onto a damaged copy
        moved = bool(setting and meta.querybank) and setting.get("bank_features") != meta.querybank.get("bank_features")
        out.append((f"the query bank {meta.pool} is ranked with (its own dataset's, or plain cosine) changed since "
                    "the index was built" if meta.pool else
                    f"the run's query bank ({QUERYBANK}) changed since the index was built", moved))
    try:
        features = Path(meta.features_dir) if meta.pool else _features_dir(run_dir)
        files = _split_files(features, meta.split)
    except (FileNotFoundError, ValueError) as e:
        return [*out, (str(e), True)]
    built = [s.split for s in meta.sources]
    if list(files) != built:
        out.append((f"the cache now has splits {', '.join(files)}; the index was built from {', '.join(built)}", True))
    by_split = {s.split: s for s in meta.sources}
    for split, path in files.items():
        was = by_split.get(split)
        if was is None:
            continue
        now = _describe(split, path)
        if now.n_images != was.n_images:
            out.append((f"{path}: {now.n_images} images now, {was.n_images} when the index was built", True))
        elif now.ids_sha256 != was.ids_sha256:
            out.append((f"{path}: the image ids or their order changed since the index was built", True))
        for key in ("backbone", "dataset_fingerprint"):
            if getattr(now, key) != getattr(was, key):
                out.append((f"{path}: {key} is {getattr(now, key)!r}, the index was built from {getattr(was, key)!r}",
                            True))
    if sum(s.n_images for s in meta.sources) != meta.ntotal or len(meta.image_ids) != meta.ntotal:
        out.append((f"the description lists {len(meta.image_ids)} ids for {meta.ntotal} vectors", False))
    return out


def available_indexes(run_dir: str | Path, split: str | None = None, pool: str | None = None) -> list[tuple[str, str]]:
    """(split, kind) of every index written for the run (or for its `pool`), most recently built first."""
    folder = Path(run_dir) / INDEX_DIR / (f"{POOLS_DIR}/{pool}" if pool else "")
    found = []
    for js in folder.glob("*.json") if folder.is_dir() else []:
        name, _, kind = js.stem.rpartition("-")
        if kind in INDEX_KINDS and js.with_suffix(".faiss").exists() and (split is None or name == split):
            found.append((js.stat().st_mtime, name, kind))
    return [(name, kind) for _, name, kind in sorted(found, reverse=True)]


def tune(index: faiss.Index, params: dict) -> faiss.Index:
    """Apply the search-time knobs (ivf nprobe, hnsw efSearch), which a FAISS file may not keep."""
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "ef_search" in params and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params["ef_search"])
    return index


def load_index(run_dir: str | Path, split: str | None = None, kind: str | None = None,
               check: bool = True, pool: str | None = None, bank=OWN_BANK) -> tuple[faiss.Index, IndexMeta] | None:
    """The run's index over `split` (None = "all") of its own cache or of `pool` (see `pool_name`), or
    None when none was built. `bank`: the query bank the pool is ranked with (see `stale_reasons`).

    `kind` None takes the most recently built kind. Raises StaleIndexError when the index no
    longer matches the run's cache or heads (`check=False` skips that, e.g. to inspect an old one).
    """
    run_dir = Path(run_dir)
    split = split or ALL_SPLITS
    if kind is None:
        found = available_indexes(run_dir, split, pool)
        if not found:
            return None
        kind = found[0][1]
    faiss_path, json_path = index_paths(run_dir, split, kind, pool)
    if not (faiss_path.exists() and json_path.exists()):
        return None
    try:
        meta = IndexMeta.from_dict(json.loads(json_path.read_text()), str(json_path))
    except (json.JSONDecodeError, TypeError) as e:
        raise StaleIndexError(f"{json_path}: unreadable index description ({e}); "
                              f"{_rebuild_hint(run_dir, split, kind, pool)}") from e
    try:
        # ivf's lists are memory-mapped: they stay in the file and the page cache, not in this process
        # (FAISS reads ivfpq's blocked fast-scan lists into memory: 8-64 bytes per image)
        index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP if kind == "ivf" else 0)
    except RuntimeError as e:
        raise StaleIndexError(f"{faiss_path}: unreadable FAISS file; {_rebuild_hint(run_dir, split, kind, pool, meta)}") from e
    if check:
        reasons = _stale(meta, run_dir, index, faiss_path, bank)
        if reasons:
            if any(about_cache for _, about_cache in reasons):
                _refuse_damaged_caches(meta, run_dir)  # damage is named as such, never as a stale index
            lines = "\n  - ".join(reason for reason, _ in reasons)
            raise StaleIndexError(f"{faiss_path}: stale index, it no longer matches the run:\n  - {lines}\n"
                                  f"{_rebuild_hint(run_dir, split, kind, pool, meta)}")
    return tune(index, meta.params), meta


def _refuse_damaged_caches(meta: IndexMeta, run_dir: Path) -> None:
    """The `CacheError` of the first damaged cache file the index covers, if any. A cache damaged (or
    relinked onto a damaged copy) after the index was built shows as a stale index, whose message
    sends the user to rebuild it; the damage is what to fix, so it is read for (checksums, NaN/Inf)
    before staleness is reported. Costs a read of every cache file (tens of GB for a large pool), so
    only for the reasons a damaged or moved cache shows as (see `_stale`): never for retrained heads
    or a changed query-bank setting, the usual reasons, where rebuilding is the fix."""
    try:
        files = _split_files(Path(meta.features_dir) if meta.pool else _features_dir(run_dir), meta.split)
    except (FileNotFoundError, ValueError):
        return  # a missing cache or config is one of the stale reasons
    for path in files.values():
        verify_cache(path)


def _rebuild_hint(run_dir: Path, split: str, kind: str, pool: str | None = None, meta: IndexMeta | None = None) -> str:
    """The command that replaces the index (`--overwrite`: `index` refuses an existing one), reading a
    `--data` pool's folder as it was read (`meta`: links followed, readable paths, the features root)."""
    data = f" --data DATA/{pool}" if pool else ""
    if pool and meta is not None:
        data += "".join(flag for flag, used in ((" --follow-links", meta.follow_links),
                                                (" --readable-paths", meta.readable_paths)) if used)
        data += f" --features-root {shlex.quote(meta.features_root)}" if meta.features_root else ""
    return (f"rebuild it with: python cli.py index --run {shlex.quote(str(run_dir))} --split {split} --kind {kind}"
            f"{data} --overwrite")


def search_index(index: faiss.Index, queries, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k index rows for unit queries [Q, D] (numpy or torch): (scores [Q, k] float32 cosines,
    rows [Q, k] int64), best first. k is capped at the index size; approximate kinds may return
    fewer hits, padded with row -1 and score -inf. `allowed` (bool per index row) restricts the
    search to those rows (FAISS's own ID selector, so filtered hits are not lost to the top k)."""
    if k < 1:
        raise BadOption(f"k must be >= 1, got {k}")
    q = _as_queries(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    k = min(k, int(index.ntotal))
    if k == 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
    if allowed is None:
        scores, rows = index.search(q, k)
    else:
        # a bitmap of the allowed rows (N/8 bytes), not a hash set of their ids: cheap at millions
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        scores, rows = index.search(q, k, params=_search_params(index, selector))
    scores[rows < 0] = -np.inf
    return scores, rows.astype(np.int64)


def _search_params(index: faiss.Index, selector) -> faiss.SearchParameters:
    """Search parameters carrying a selector and the index's own search-time knobs."""
    if hasattr(index, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(index.hnsw.efSearch))
    ivf = _ivf_of(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    return faiss.SearchParameters(sel=selector)


def _ivf_of(index: faiss.Index):
    """The inverted-file index inside `index` (behind a projection too), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def format_index_summary(path: Path, meta: IndexMeta) -> str:
    params = ", ".join(f"{k} {v}" for k, v in meta.params.items() if k != "seed") or "exact"
    splits = ", ".join(f"{s.split} {s.n_images}" for s in meta.sources)
    size = f"{format_bytes(meta.index_bytes)}, {meta.index_bytes / max(meta.ntotal, 1):,.0f} bytes per image"
    return (f"{meta.kind} index of {meta.ntotal} x {meta.dim} image embeddings ({splits}; {params}) "
            f"built in {meta.build_seconds:.1f} s, {size}\n  {path}\n  {path.with_suffix('.json')}")
