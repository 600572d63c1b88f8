"""Which FAISS index a collection gets, and what it will cost, decided before anything is built.

`plan_index` turns (number of vectors, their dimension, the memory budget) into a kind and its
parameters, with the memory the index and its build will take, so a budget that cannot hold the
collection is refused in one line before the index is built, not discovered by the OOM killer (an
`index --data` pool is encoded and cached first, since its size is known only then; the cache stays).
The budget (GiB) covers the build and the index; searching also holds the pool's cached features.

The kinds, from exact to compact (bytes per vector at dimension d):
- `flat`: every vector, scanned whole (4 d). Exact; chosen while one query's scan stays short.
- `ivf`: every vector in k-means cells, `nprobe` cells scanned (4 d + 8).
- `hnsw`: every vector plus a neighbour graph (4 d + about 8 M).
- `ivfpq`: a linear projection to `pq_dim` dimensions (the top singular directions of a training
  sample, not centred, so inner products keep their meaning), k-means cells, and a 4-bit product
  code per vector (`pq_bytes` + 8 for the id) that FAISS scans with SIMD ("fast scan"). Its scores
  are approximate, so the best `rerank` candidates are re-scored exactly from the cache.

The size rules follow what large-scale users of FAISS settled on (autofaiss, the FAISS wiki): about
sqrt(N) cells, at least 39 training points per cell, an HNSW graph over the cell centres once
there are thousands of them (assigning 10M vectors to 4,096 centres by brute force is the slow
part of a build), and the largest code that fits the budget.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from medembed.common.errors import MedembedError
from medembed.common.memory import GB, format_bytes

__all__ = ["INDEX_KINDS", "KIND_CHOICES", "BudgetError", "IndexPlan", "plan_index", "format_bytes"]

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
KIND_CHOICES = ("auto",) + INDEX_KINDS
EXACT_SCAN_FLOATS = 1 << 25  # flat while a query scans at most 32M floats (128 MiB: ~12 ms on 2 cores)
PQ_BYTES = (64, 32, 16, 8)  # code sizes ivfpq tries, largest (most accurate) first
MIN_POINTS_PER_CELL = 39  # below this FAISS's k-means warns that its cells are poorly placed
HNSW_COARSE_FROM = 1024  # cells from which the coarse quantizer is an HNSW graph
HNSW_COARSE_M = 32
IVFPQ_NPROBE = 128
ID_BYTES = 8
ID_LIST_BYTES = 100  # per image while building: its id as a Python string and in the JSON text
PROCESS_BYTES = 600 << 20  # what the process holds before building (torch, faiss, numpy, the run), measured


class BudgetError(MedembedError, ValueError):
    """The collection does not fit the memory budget in the index asked for (or in any index)."""


@dataclass(frozen=True)
class IndexPlan:
    """One index for `n` vectors of dimension `dim`: its kind, FAISS parameters and costs."""

    kind: str
    n: int
    dim: int
    params: dict = field(default_factory=dict)
    index_bytes: int = 0  # the built index, in memory or on disk
    build_bytes: int = 0  # peak while building: the index, its training sample and one chunk
    chunk_rows: int = 65536  # rows read, embedded and added at a time (fewer when the budget is tight)

    @property
    def bytes_per_vector(self) -> float:
        return self.index_bytes / max(self.n, 1)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _nlist(n: int, asked: int, kind: str) -> int:
    """ivf: sqrt(N) cells; ivfpq: a power of two near 2 sqrt(N) (its cells hold short codes, so more
    of them are scanned cheaply); both at most N / 39."""
    if asked:
        if asked > n:
            raise ValueError(f"--nlist {asked} is more cells than the {n} vectors to index")
        return asked
    if kind == "ivf":
        return max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_CELL))
    return max(1, min(_pow2_floor(2 * math.sqrt(n)), _pow2_floor(n / MIN_POINTS_PER_CELL)))


def _ivf_params(n: int, nlist: int, nprobe: int, train_size: int, seed: int, default_probe_share: int) -> dict:
    """`default_probe_share` 0: a fixed 128 cells (ivfpq: at 1M and 10M vectors recall@10 after re-scoring
    is the same with 128 cells as with 512, and 3x faster; benchmarks/index_scale.py)."""
    default = max(16, round(nlist / default_probe_share)) if default_probe_share else IVFPQ_NPROBE
    nprobe = min(nlist, nprobe or default)
    train = min(n, train_size or 64 * nlist)
    if train < nlist:
        raise ValueError(f"ivf training needs at least nlist={nlist} vectors, got train_size {train}")
    return {"nlist": nlist, "nprobe": nprobe, "train_size": train, "seed": seed}


def _pq_dims(dim: int, pq_dim: int, pq_bytes: int) -> int:
    """Dimensions after the projection: `pq_dim` at most the input's, a multiple of the 2 * pq_bytes
    sub-quantizers (4 bits each)."""
    m = 2 * pq_bytes
    out = min(pq_dim, dim) // m * m
    if out == 0:
        raise ValueError(f"{dim}-d vectors are too few dimensions for {pq_bytes}-byte codes ({m} sub-quantizers)")
    return out


def _costs(kind: str, n: int, dim: int, p: dict, chunk_rows: int) -> tuple[int, int]:
    """(index bytes, build peak bytes) of one kind with its parameters."""
    if kind == "flat":
        index = n * dim * 4
        train = 0
    elif kind == "ivf":
        index = n * (dim * 4 + ID_BYTES) + p["nlist"] * dim * 4
        train = p["train_size"] * dim * 4
    elif kind == "hnsw":
        index = n * (dim * 4 + int(p["m"] * 2 * 4 * 1.1))  # level 0 holds 2M links; upper levels ~1/M of that
        train = 0
    else:
        out = p["pq_dim"]
        coarse = p["nlist"] * out * 4 + (p["nlist"] * HNSW_COARSE_M * 2 * 4 if p["coarse"] == "hnsw" else 0)
        index = n * (p["pq_bytes"] + ID_BYTES) + coarse + dim * out * 4
        train = p["train_size"] * out * 4 + dim * dim * 8  # the projected sample; the second-moment matrix
    # fast-scan codes are re-packed into blocks as they are added: ivfpq holds about twice its index while building
    # (measured: 1.6 GB over the imports for a 0.7 GB index of 10M vectors)
    held = 2 * index if kind == "ivfpq" else index
    return index, PROCESS_BYTES + held + train + chunk_rows * dim * 4 * 2 + n * ID_LIST_BYTES


def _params(kind: str, n: int, dim: int, opts, pq_bytes: int = 0) -> dict:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": opts.m, "ef_construction": opts.ef_construction, "ef_search": opts.ef_search}
    if kind == "ivf":
        return _ivf_params(n, _nlist(n, opts.nlist, "ivf"), opts.nprobe, opts.train_size, opts.seed, 16)
    nlist = _nlist(n, opts.nlist, "ivfpq")
    p = _ivf_params(n, nlist, opts.nprobe, opts.train_size or min(n, MIN_POINTS_PER_CELL * nlist), opts.seed, 0)
    p.update(pq_dim=_pq_dims(dim, opts.pq_dim, pq_bytes), pq_bytes=pq_bytes,
             coarse="hnsw" if nlist >= HNSW_COARSE_FROM else "flat", rerank=opts.rerank)
    return p


def _codes(kind: str, dim: int, opts) -> list[int]:
    """Code sizes to try for `kind`: the one asked for, else every size the projection can split."""
    if kind != "ivfpq":
        return [0]
    if opts.pq_bytes:
        return [opts.pq_bytes]
    return [b for b in PQ_BYTES if 2 * b <= min(opts.pq_dim, dim)] or [PQ_BYTES[-1]]


def plan_index(n: int, dim: int, opts) -> IndexPlan:
    """The index `opts` (an `IndexOptions`) asks for over `n` vectors of dimension `dim`, within
    `opts.max_memory_gb`. `kind="auto"` picks flat while a scan is short, else ivfpq with the
    largest code that fits (at 1M vectors it matched ivf's recall at 4x its speed and 1/14 of its
    memory; BENCHMARKS.md). Raises BudgetError (one line) when
    nothing fits, naming the budget that would."""
    if n < 1:
        raise ValueError("no vectors to index")
    budget = int(opts.max_memory_gb * GB)
    # one chunk (read rows and their embeddings) takes at most an eighth of the budget, at least 1,024 rows
    rows = max(1024, min(opts.chunk_rows, budget // 8 // (dim * 4 * 2)))
    kinds = [opts.kind] if opts.kind != "auto" else (
        (["flat"] if n * dim <= EXACT_SCAN_FLOATS else []) + ["ivfpq"])
    tried = []
    for kind in kinds:
        for code in _codes(kind, dim, opts):
            params = _params(kind, n, dim, opts, code)
            index, build = _costs(kind, n, dim, params, rows)
            plan = IndexPlan(kind, n, dim, params, index, build, rows)
            if build <= budget:
                return plan
            tried.append(plan)
    smallest = min(tried, key=lambda p: p.build_bytes)
    what = f"--kind {opts.kind}" if opts.kind != "auto" else "the most compact index"
    code = f", {smallest.params['pq_bytes']}-byte codes" if smallest.kind == "ivfpq" else ""
    hint = ""
    if opts.kind not in ("auto", "ivfpq"):
        try:
            plan_index(n, dim, dataclasses.replace(opts, kind="ivfpq", pq_bytes=0))
            hint = " or use --kind ivfpq"
        except ValueError:  # it does not fit either, or the vectors are too short for its codes
            pass
    raise BudgetError(
        f"{n:,} vectors of {dim} dimensions need {format_bytes(smallest.build_bytes)} to build in {what} "
        f"({smallest.kind}{code}), above --max-memory-gb {opts.max_memory_gb:g}; raise it to at least "
        f"{math.ceil(smallest.build_bytes / GB * 10) / 10:g}{hint}")
