"""What a `Searcher` (`cli.py search`, `cli.py serve`) holds in memory, decided before a feature is read.

Within `--max-memory-gb` (the whole process): the pool's embeddings are projected once and held
when they fit, so every query is one matrix product; else every exact scan streams the pool's
cached features from disk a chunk at a time, projects and scores them, and keeps a running top k;
else a one-line refusal names the budget that would do. With a FAISS index (`cli.py index`) a text
query never scans: it reads its candidates' features alone, so a streamed pool of ten million
images still answers in milliseconds.

What stays whatever the pool: the process with the query encoders, the pool's headers (8 bytes a
caption and the sparse labels, `serve.pool`), the run's query bank (`BANK_ROWS` rows per side, raw
and projected), and an index with its ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from medembed.adapt.run_querybank import BANK_ROWS
from medembed.common.memory import GB, format_bytes
from medembed.common.planning import (
    MIN_CHUNK_ROWS,
    PROCESS_BYTES,
    SLACK_BYTES,
    MemoryBudgetError,
    gib_up,
)

__all__ = ["SearchMemoryPlan", "plan_search_memory"]

ENCODER_BYTES = 640 << 20  # the query encoders (torch towers and their ONNX Runtime sessions) once loaded
ID_BYTES = 100  # per index row: its image id as a Python string beside the index (84 measured at 10M while its JSON is parsed)
MAX_CHUNK_ROWS = 65536
SCORING_BYTES = 256 << 20  # one block of scores: the query bank's hubness of a chunk, or a top k


@dataclass(frozen=True)
class SearchMemoryPlan:
    """How a Searcher holds its pool (`hold`: every embedding in memory; else streamed in chunks of
    `chunk_rows`), with the bytes it counted."""

    budget: int
    fixed: int  # process, encoders, pool headers, query bank, index
    held: int  # every pool embedding and query-bank offset, when held
    hold: bool
    chunk_rows: int
    chunk_bytes: int = 0  # one streamed chunk's features, embeddings and scores
    dim: int = 0  # the run's embedding width

    @property
    def total(self) -> int:
        """The planned peak."""
        return self.fixed + SLACK_BYTES + self.chunk_bytes + (self.held if self.hold else 0)

    def describe(self) -> str:
        if self.hold:
            return (f"pool embeddings held in memory ({format_bytes(self.held)}; planned peak "
                    f"{format_bytes(self.total)} of --max-memory-gb {self.budget / GB:g})")
        return (f"pool streamed from disk in chunks of {self.chunk_rows:,} rows for every exact scan (its embeddings, "
                f"{format_bytes(self.held)}, on top of the {format_bytes(self.fixed)} always held would pass "
                f"--max-memory-gb {self.budget / GB:g}; planned peak {format_bytes(self.total)}; `cli.py index` answers "
                "text queries without a scan)")


def plan_search_memory(budget_gb: float, n_images: int, n_captions: int, raw_width: int, itemsize: int,
                       dim: int, metadata_bytes: int, bank_width: int = 0, index_bytes: int = 0,
                       index_rows: int = 0) -> SearchMemoryPlan:
    """Hold or stream the pool within `budget_gb`, or raise `MemoryBudgetError` in one line.

    `raw_width`: the wider of the image and caption feature widths; `itemsize`: bytes per stored
    value; `dim`: the run's embedding width; `bank_width`: raw image + caption feature widths when
    the run ranks with a query bank (0 for plain cosine); `index_bytes`: what the index takes in
    memory (0 for a memory-mapped or absent one), `index_rows` its rows (each with an id)."""
    budget = int(budget_gb * GB)
    bank = BANK_ROWS * (bank_width + 2 * dim) * 4 if bank_width else 0
    fixed = PROCESS_BYTES + ENCODER_BYTES + SCORING_BYTES + metadata_bytes + bank + index_bytes + index_rows * ID_BYTES
    held = (n_images + n_captions) * (dim + 1) * 4
    # a chunk read from the cache: its features as stored and widened, their embeddings, offsets and scores
    per_row = raw_width * (itemsize + 4) + 2 * dim * 4 + 16
    projecting = min(MAX_CHUNK_ROWS, max(n_images, n_captions)) * per_row  # while the held pool is projected
    if fixed + held + projecting + SLACK_BYTES <= budget:
        return SearchMemoryPlan(budget, fixed, held, True, MAX_CHUNK_ROWS, projecting, dim)
    rows = (budget - fixed - SLACK_BYTES) // per_row
    if rows < MIN_CHUNK_ROWS:
        need = fixed + SLACK_BYTES + MIN_CHUNK_ROWS * per_row
        raise MemoryBudgetError(
            f"search needs at least {format_bytes(need)} even with the pool streamed (process and query encoders "
            f"{format_bytes(PROCESS_BYTES + ENCODER_BYTES)}, the pool's caption rows and labels "
            f"{format_bytes(metadata_bytes)}, query bank {format_bytes(bank)}, index "
            f"{format_bytes(index_bytes + index_rows * ID_BYTES)}), above --max-memory-gb {budget / GB:g}; "
            f"raise it to at least {gib_up(need)}")
    rows = int(min(rows, MAX_CHUNK_ROWS))
    return SearchMemoryPlan(budget, fixed, held, False, rows, rows * per_row, dim)
