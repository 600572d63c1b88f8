"""The FAISS index kinds, one record each: its name, its parameters from the collection size and the
options, how its empty index is made and trained, and what it costs in bytes.

`KINDS` is the one list: building (`serve.index.new_index`, `train_index`), planning
(`serve.index_plan.plan_index`), the options' check and `cli.py index --kind` all read it, and a
kind that is not in it is refused by name. The command line reads the names at start-up, so faiss
and numpy are imported only when an index is made.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medembed.common.errors import BadOption

if TYPE_CHECKING:
    import faiss

__all__ = ["FLAT", "HNSW", "INDEX_KINDS", "IVF", "IVFPQ", "KINDS", "IndexKind", "index_kind"]

PQ_BYTES = (64, 32, 16, 8)  # code sizes ivfpq tries, largest (most accurate) first
MIN_POINTS_PER_CELL = 39  # below this FAISS's k-means warns that its cells are poorly placed
HNSW_COARSE_FROM = 1024  # cells from which the coarse quantizer is an HNSW graph
HNSW_COARSE_M = 32
IVFPQ_NPROBE = 128
ID_BYTES = 8


def _one_code(dim: int, opts) -> list[int]:
    """A kind without codes: one build to plan."""
    return [0]


@dataclass(frozen=True)
class IndexKind:
    """One index kind.

    `params(n, dim, opts, code)`: its FAISS parameters for `n` vectors of dimension `dim` under `opts`
    (an `IndexOptions`), `code` one of `codes(dim, opts)` (the code sizes to try, best first);
    `build(dim, params)`: its empty index for unit vectors, by faiss's own factory; `train(index,
    sample)`: trains it on a sample (an array, or a callable returning the sample's chunks afresh),
    None for a kind that needs no training; `costs(n, dim, params)`: (bytes of the built index, bytes
    its build holds beyond what every build holds: the index while it is filled, its training sample)."""

    name: str
    params: Callable[[int, int, Any, int], dict]
    build: Callable[[int, dict], faiss.Index]
    costs: Callable[[int, int, dict], tuple[int, int]]
    train: Callable[[faiss.Index, Any], None] | None = None
    codes: Callable[[int, Any], list[int]] = _one_code


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _cells(n: int, asked: int, default: int) -> int:
    """`asked` cells when given (at most one per vector), else `default`."""
    if asked:
        if asked > n:
            raise BadOption(f"--nlist {asked} is more cells than the {n} vectors to index")
        return asked
    return default


def _ivf_params(n: int, nlist: int, nprobe: int, train_size: int, seed: int, default_probe_share: int) -> dict:
    """`default_probe_share` 0: a fixed 128 cells (ivfpq: at 1M and 10M vectors recall@10 after re-scoring
    is the same with 128 cells as with 512, and 3x faster; benchmarks/index_scale.py)."""
    default = max(16, round(nlist / default_probe_share)) if default_probe_share else IVFPQ_NPROBE
    nprobe = min(nlist, nprobe or default)
    train = min(n, train_size or 64 * nlist)
    if train < nlist:
        raise BadOption(f"ivf training needs at least nlist={nlist} vectors, got train_size {train}")
    return {"nlist": nlist, "nprobe": nprobe, "train_size": train, "seed": seed}


def _pq_dims(dim: int, pq_dim: int, pq_bytes: int) -> int:
    """Dimensions after the projection: `pq_dim` at most the input's, a multiple of the 2 * pq_bytes
    sub-quantizers (4 bits each)."""
    m = 2 * pq_bytes
    out = min(pq_dim, dim) // m * m
    if out == 0:
        raise BadOption(f"{dim}-d vectors are too few dimensions for {pq_bytes}-byte codes ({m} sub-quantizers)")
    return out


def _factory(dim: int, spec: str) -> faiss.Index:
    import faiss

    return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)


def _set_cells(index: faiss.Index, params: dict) -> faiss.Index:
    """ivf and ivfpq: spherical k-means (unit centroids: a cell is a cone around a direction, as
    cosine wants), its seed, and the cells a query scans."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True
    ivf.cp.seed = params["seed"]
    ivf.nprobe = params["nprobe"]
    return index


# ------------------------------------------------------------------ flat

def _flat_params(n: int, dim: int, opts, code: int) -> dict:
    return {}


def _flat_build(dim: int, params: dict) -> faiss.Index:
    return _factory(dim, "Flat")


def _flat_costs(n: int, dim: int, p: dict) -> tuple[int, int]:
    index = n * dim * 4
    return index, index


# ------------------------------------------------------------------ ivf

def _ivf_kind_params(n: int, dim: int, opts, code: int) -> dict:
    """About sqrt(N) cells, at most N / 39; max(16, nlist / 16) of them scanned."""
    nlist = _cells(n, opts.nlist, max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_CELL)))
    return _ivf_params(n, nlist, opts.nprobe, opts.train_size, opts.seed, 16)


def _ivf_build(dim: int, params: dict) -> faiss.Index:
    return _set_cells(_factory(dim, f"IVF{params.get('nlist', 1)},Flat"), params)


def _ivf_train(index: faiss.Index, sample) -> None:
    import numpy as np

    sample = np.concatenate(list(sample())) if callable(sample) else sample
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def _ivf_costs(n: int, dim: int, p: dict) -> tuple[int, int]:
    index = n * (dim * 4 + ID_BYTES) + p["nlist"] * dim * 4
    return index, index + p["train_size"] * dim * 4


# ------------------------------------------------------------------ hnsw

def _hnsw_params(n: int, dim: int, opts, code: int) -> dict:
    return {"m": opts.m, "ef_construction": opts.ef_construction, "ef_search": opts.ef_search}


def _hnsw_build(dim: int, params: dict) -> faiss.Index:
    index = _factory(dim, f"HNSW{params.get('m', 32)},Flat")
    index.hnsw.efConstruction = params["ef_construction"]
    index.hnsw.efSearch = params["ef_search"]
    return index


def _hnsw_costs(n: int, dim: int, p: dict) -> tuple[int, int]:
    index = n * (dim * 4 + int(p["m"] * 2 * 4 * 1.1))  # level 0 holds 2M links; upper levels ~1/M of that
    return index, index


# ------------------------------------------------------------------ ivfpq

def _ivfpq_codes(dim: int, opts) -> list[int]:
    """The code size asked for, else every size the projection can split, largest first."""
    if opts.pq_bytes:
        return [opts.pq_bytes]
    return [b for b in PQ_BYTES if 2 * b <= min(opts.pq_dim, dim)] or [PQ_BYTES[-1]]


def _ivfpq_params(n: int, dim: int, opts, code: int) -> dict:
    """A power of two near 2 sqrt(N) cells, at most N / 39 (they hold short codes, so more of them are
    scanned cheaply), trained on 39 points a cell; an HNSW coarse quantizer from 1,024 cells."""
    nlist = _cells(n, opts.nlist, max(1, min(_pow2_floor(2 * math.sqrt(n)), _pow2_floor(n / MIN_POINTS_PER_CELL))))
    p = _ivf_params(n, nlist, opts.nprobe, opts.train_size or min(n, MIN_POINTS_PER_CELL * nlist), opts.seed, 0)
    p.update(pq_dim=_pq_dims(dim, opts.pq_dim, code), pq_bytes=code,
             coarse="hnsw" if nlist >= HNSW_COARSE_FROM else "flat", rerank=opts.rerank)
    return p


def _ivfpq_build(dim: int, params: dict) -> faiss.Index:
    """The projection is a plain LinearTransform whose matrix `_ivfpq_train` sets: faiss's own PCA
    centres the data (shifting every inner product by a per-vector term) and takes minutes at 4,096-d."""
    import faiss

    coarse = f"_HNSW{HNSW_COARSE_M}" if params["coarse"] == "hnsw" else ""
    inner = _factory(params["pq_dim"], f"IVF{params['nlist']}{coarse},PQ{2 * params['pq_bytes']}x4fs")
    return _set_cells(faiss.IndexPreTransform(faiss.LinearTransform(dim, params["pq_dim"], False), inner), params)


def _ivfpq_train(index: faiss.Index, sample) -> None:
    """The projection is the top eigenvectors of the sample's second-moment matrix (its right singular
    vectors without centring): the directions that carry most of the vectors' energy, so <Pq, Px>
    stays close to <q, x>. Its cells and codes are then trained on the projected sample. The sample is
    read twice, chunk by chunk, so it is never held at full dimension."""
    import faiss
    import numpy as np

    chunks = sample if callable(sample) else (lambda: [sample])
    transform = faiss.downcast_VectorTransform(index.chain.at(0))
    gram = np.zeros((transform.d_in, transform.d_in))
    for x in chunks():
        x = np.asarray(x, dtype=np.float64)
        gram += x.T @ x
    _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues
    top = np.ascontiguousarray(vectors[:, ::-1][:, : transform.d_out].T, dtype=np.float32)
    faiss.copy_array_to_vector(top.ravel(), transform.A)
    transform.is_trained = True
    projected = np.concatenate([transform.apply(np.ascontiguousarray(x, dtype=np.float32)) for x in chunks()])
    faiss.downcast_index(index.index).train(projected)
    index.is_trained = True


def _ivfpq_costs(n: int, dim: int, p: dict) -> tuple[int, int]:
    out = p["pq_dim"]
    coarse = p["nlist"] * out * 4 + (p["nlist"] * HNSW_COARSE_M * 2 * 4 if p["coarse"] == "hnsw" else 0)
    index = n * (p["pq_bytes"] + ID_BYTES) + coarse + dim * out * 4
    train = p["train_size"] * out * 4 + dim * dim * 8  # the projected sample; the second-moment matrix
    # fast-scan codes are re-packed into blocks as they are added: ivfpq holds about twice its index while building
    # (measured: 1.6 GB over the imports for a 0.7 GB index of 10M vectors)
    return index, 2 * index + train


FLAT = IndexKind("flat", _flat_params, _flat_build, _flat_costs)
IVF = IndexKind("ivf", _ivf_kind_params, _ivf_build, _ivf_costs, _ivf_train)
HNSW = IndexKind("hnsw", _hnsw_params, _hnsw_build, _hnsw_costs)
IVFPQ = IndexKind("ivfpq", _ivfpq_params, _ivfpq_build, _ivfpq_costs, _ivfpq_train, _ivfpq_codes)

KINDS = (FLAT, IVF, HNSW, IVFPQ)  # from exact to compact
INDEX_KINDS = tuple(k.name for k in KINDS)


def index_kind(name: str) -> IndexKind:
    """The record of kind `name`; BadOption (one line, naming the kinds) for any other."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise BadOption(f"unknown index kind {name!r}: the kinds are {', '.join(INDEX_KINDS)}")
