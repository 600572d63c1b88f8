"""`cli.py index --engine ray`: fill an ivf or ivfpq index in parts on Ray workers, then merge them.

The driver trains the index once (on its sample, as a one-machine build does) and hands the trained,
empty index to one task per contiguous block of the pool's rows. Each task opens the run itself,
embeds its block a chunk at a time and adds it to its own copy, writing that part's index (and, for
ivfpq, its full vectors) to a file beside the final one. The driver then moves each part's inverted
lists into the trained index in row order (`IndexIVF.merge_from`, ids offset by the rows before the
part) and appends the vectors files in the same order: the merged index answers every query as the
one-machine build does (tested). A task that dies is re-run by Ray (its part is a pure function of its
block); the part files are removed once merged.
"""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import faiss
import numpy as np

from medembed.common.ray_session import ray_session

PARTS_KINDS = ("ivf", "ivfpq")


def part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous row blocks covering [0, n), as even as whole rows allow (empty ones dropped)."""
    edges = np.linspace(0, n, max(1, parts) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def fill_in_parts(index: faiss.Index, task, task_args: tuple, n: int, folder: Path, keep: Path | None,
                  address: str | None = None, parts: int = 0) -> int:
    """Fill the trained `index` with the pool's n rows from Ray tasks and merge them; `task(*task_args, lo,
    hi, base, keep_vectors, empty)` is the body each runs (`serve.index.fill_part`); `keep`: where the full
    vectors go (ivfpq). Returns the number of parts."""
    folder.mkdir(parents=True, exist_ok=True)
    with ray_session(address, what="index --engine ray") as ray:
        parts = parts or max(1, int(ray.cluster_resources().get("CPU", 1)))
        bounds = part_bounds(n, parts)
        empty = ray.put(faiss.serialize_index(index))
        remote = ray.remote(task).options(num_cpus=1, max_retries=2)
        bases = [folder / f".part-{i:04d}-of-{len(bounds):04d}" for i in range(len(bounds))]
        done = ray.get([remote.remote(*task_args, lo, hi, str(base), keep is not None, empty)
                        for (lo, hi), base in zip(bounds, bases)])
    try:
        inner = faiss.extract_index_ivf(index)
        for base, rows in zip(bases, done):
            part = faiss.read_index(str(base) + ".faiss")
            if int(part.ntotal) != rows:
                raise RuntimeError(f"{base}.faiss holds {part.ntotal} rows, its task added {rows}")
            inner.merge_from(faiss.extract_index_ivf(part), inner.ntotal)
        index.ntotal = inner.ntotal  # a pre-transform wrapper counts its inner index's rows
        if keep is not None:
            with open(keep, "wb") as out:
                for base in bases:
                    with open(str(base) + ".vectors", "rb") as part_vectors:
                        shutil.copyfileobj(part_vectors, out, 16 << 20)
    finally:
        for base in bases:
            for suffix in (".faiss", ".vectors"):
                Path(str(base) + suffix).unlink(missing_ok=True)
    return len(bounds)


def add_chunks(index: faiss.Index, chunks, keep=None) -> None:
    """Add vectors chunk by chunk (any iterable of [rows, d] arrays): only one chunk is held. `keep`
    (a binary file) also receives each chunk's float32 rows."""
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        index.add(chunk)
        if keep is not None:
            keep.write(chunk.tobytes())


def write_part(index: faiss.Index, rows, base: str, keep_vectors: bool) -> int:
    """A task's body once its rows are embedded: add them to its copy of the index, write the part."""
    with open(base + ".vectors", "wb") if keep_vectors else nullcontext(None) as f:
        add_chunks(index, rows, keep=f)
    faiss.write_index(index, base + ".faiss")
    return int(index.ntotal)
