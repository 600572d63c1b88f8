"""Memory plans: what a phase will hold, decided from sizes alone before it reads anything.

Every phase whose memory grows with the collection (extraction, adapter training, evaluation,
search, indexing) counts its parts in bytes within `--max-memory-gb` (the whole process, imports
included): what it holds throughout, and its steps, which run one after the other, so only the
largest of them adds to the peak. A budget that cannot hold the plan is refused in one line, naming
the largest parts and the smallest budget that would do, before the first feature is read, never by
the OOM killer. `common.memory` formats the bytes and measures what the process really took.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from medembed.common.errors import MedembedError
from medembed.common.memory import GB, format_bytes

__all__ = ["DEFAULT_MAX_MEMORY_GB", "MIN_CHUNK_ROWS", "PROCESS_BYTES", "SLACK_BYTES", "MemoryBudgetError", "MemoryPlan",
           "gib_up", "largest_parts", "planned_peak"]

# the --max-memory-gb every phase plans within unless told (the index, which holds less, has its own):
# one number, so extraction, training, eval and search agree on what a default machine offers
DEFAULT_MAX_MEMORY_GB = 8.0

# what training, evaluation and search hold beside their data: python with torch, h5py, scipy and the
# medembed modules imported (757 MiB measured); and their batches and gradients, HDF5's chunk caches,
# the allocator's free lists
PROCESS_BYTES = 800 << 20
SLACK_BYTES = 192 << 20
MIN_CHUNK_ROWS = 1024  # rows of the smallest block read from a cache at a time: fewer would mean too many reads


class MemoryBudgetError(MedembedError, ValueError):
    """A phase does not fit --max-memory-gb, whatever it holds on disk instead of in memory."""


@dataclass(frozen=True)
class MemoryPlan:
    """What a phase holds throughout (`held`) and in each of its steps, one after the other
    (`phases`), in bytes by name, within `budget` bytes."""

    budget: int
    held: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The planned peak: what is held, plus the larger phase."""
        return planned_peak(self.held, self.phases)

    def largest(self) -> str:
        return largest_parts(self.held, self.phases)

    def describe(self) -> str:
        return f"planned peak {format_bytes(self.total)} of --max-memory-gb {self.budget / GB:g}"


def planned_peak(held: dict[str, int], phases: dict[str, int]) -> int:
    """A plan's peak: everything held throughout, plus the largest of its phases (one after the other)."""
    return sum(held.values()) + max(phases.values(), default=0)


def largest_parts(held: dict[str, int], phases: dict[str, int], n: int = 3) -> str:
    """The `n` largest parts of a plan, in words ("process 800.0 MiB, ..."), for a refusal's reason."""
    top = sorted({**held, **phases}.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {format_bytes(b)}" for name, b in top)


def gib_up(n: int) -> str:
    """Bytes as GiB rounded up to a tenth: the smallest --max-memory-gb to suggest."""
    return f"{math.ceil(n / GB * 10) / 10:g}"
