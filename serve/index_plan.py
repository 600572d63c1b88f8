"""Which FAISS index a collection gets, and what it will cost, decided before anything is built.

`plan_index` turns (number of vectors, their dimension, the memory budget) into a kind and its
parameters, with the memory the index and its build will take, so a budget that cannot hold the
collection is refused in one line before the index is built, not discovered by the OOM killer (an
`index --data` pool is encoded and cached first, since its size is known only then; the cache stays).
The budget (GiB) covers the build and the index; searching also holds the pool's cached features.
Each kind's parameters and costs are its record's in `serve.index_kinds`; what every build holds
beside them (the process, a chunk of rows, the images' ids) is counted here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from medembed.common.memory import GB, format_bytes
from medembed.common.planning import MemoryBudgetError, gib_up
from medembed.serve.index_kinds import FLAT, INDEX_KINDS, IVFPQ, index_kind

__all__ = ["AUTO", "KIND_CHOICES", "IndexPlan", "plan_index"]

AUTO = "auto"  # not a kind: the planner's choice of one (flat while a scan is short, else ivfpq)
KIND_CHOICES = (AUTO,) + INDEX_KINDS
EXACT_SCAN_FLOATS = 1 << 25  # flat while a query scans at most 32M floats (128 MiB: ~12 ms on 2 cores)
ID_LIST_BYTES = 100  # per image while building: its id as a Python string and in the JSON text
# an index build counts its own process (not common.planning's): what it holds before building (torch, faiss,
# numpy, the run), measured
INDEX_PROCESS_BYTES = 600 << 20


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


def plan_index(n: int, dim: int, opts) -> IndexPlan:
    """The index `opts` (an `IndexOptions`) asks for over `n` vectors of dimension `dim`, within
    `opts.max_memory_gb`. `kind="auto"` picks flat while a scan is short, else ivfpq with the
    largest code that fits (at 1M vectors it matched ivf's recall at 4x its speed and 1/14 of its
    memory; BENCHMARKS.md). Raises MemoryBudgetError (one line) when nothing fits, naming the budget
    that would, and BadOption for a kind `serve.index_kinds` does not hold."""
    if n < 1:
        raise ValueError("no vectors to index")
    budget = int(opts.max_memory_gb * GB)
    # one chunk (read rows and their embeddings) takes at most an eighth of the budget, at least 1,024 rows
    rows = max(1024, min(opts.chunk_rows, budget // 8 // (dim * 4 * 2)))
    kinds = [index_kind(opts.kind)] if opts.kind != AUTO else (
        ([FLAT] if n * dim <= EXACT_SCAN_FLOATS else []) + [IVFPQ])
    tried = []
    for kind in kinds:
        for code in kind.codes(dim, opts):
            params = kind.params(n, dim, opts, code)
            index, own = kind.costs(n, dim, params)
            build = INDEX_PROCESS_BYTES + own + rows * dim * 4 * 2 + n * ID_LIST_BYTES
            plan = IndexPlan(kind.name, n, dim, params, index, build, rows)
            if build <= budget:
                return plan
            tried.append(plan)
    smallest = min(tried, key=lambda p: p.build_bytes)
    what = f"--kind {opts.kind}" if opts.kind != AUTO else "the most compact index"
    code = f", {smallest.params['pq_bytes']}-byte codes" if "pq_bytes" in smallest.params else ""
    hint = ""
    if opts.kind not in (AUTO, IVFPQ.name):
        try:
            plan_index(n, dim, dataclasses.replace(opts, kind=IVFPQ.name, pq_bytes=0))
            hint = f" or use --kind {IVFPQ.name}"
        except ValueError:  # it does not fit either, or the vectors are too short for its codes
            pass
    raise MemoryBudgetError(
        f"{n:,} vectors of {dim} dimensions need {format_bytes(smallest.build_bytes)} to build in {what} "
        f"({smallest.kind}{code}), above --max-memory-gb {opts.max_memory_gb:g}; raise it to at least "
        f"{gib_up(smallest.build_bytes)}{hint}")
