"""What an evaluation holds in memory, planned from the cache headers before a feature is read.

`cli.py eval` holds the evaluated split as stored (features, ids, captions, labels), the train and
valid splits its baselines and concept sections learn from, and one column's embeddings at a time
(plus the first run's, kept for its example grids); ranking takes `memory_mb` of scores at once. On
a pool of a million images with 4,096-d embeddings that is tens of GB, so the plan compares the
total with `--max-memory-gb` (the whole process) and refuses in one line, before anything is read,
naming what would fit: a larger budget, a compact run (`cli.py compact --dims 256`), or fewer
sections (`--skip`, `--no-closed-form`). Search and the search page (`serve.search_memory`) stream a pool of any size instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medembed.adapt.memory import CacheShape, cache_shape
from medembed.common.memory import GB, format_bytes
from medembed.common.planning import (
    PROCESS_BYTES,
    SLACK_BYTES,
    MemoryBudgetError,
    MemoryPlan,
    gib_up,
)

__all__ = ["EvalMemoryPlan", "PoolFiles", "plan_eval_memory"]

ID_BYTES = 100  # an image id or location held as a Python string
CAPTION_BYTES = 160  # a caption held as a Python string
SECTION_BYTES = 384 << 20  # the concept sections' probes and detectors (roco-rad: 0.39 GiB above retrieval alone)


class EvalMemoryPlan(MemoryPlan):
    """What an evaluation holds throughout (`held`) and at the peak of its largest step (`phases`);
    described with its largest parts, since eval prints the plan before it starts."""

    def describe(self) -> str:
        return f"{super().describe()} ({self.largest()})"


def _split_bytes(s: CacheShape, captions: bool) -> int:
    """A split as `cache.reader.load_split` holds it: features as stored, strings, labels."""
    out = s.n_images * (s.image_dim * s.itemsize + 2 * ID_BYTES) + 16 * s.concept_nnz + 4 * s.concept_text_numbers
    if captions:
        out += s.n_captions * (s.text_dim * s.itemsize + CAPTION_BYTES + 8)
    return out


@dataclass(frozen=True)
class PoolFiles:
    """One pool an evaluation scores: its evaluated split, the train / valid splits a section or the
    baseline learns from (None where none does), and the embedding width of each run scored on it."""

    test: Path
    train: Path | None
    valid: Path | None
    dims: list[int]
    tuned_apart: bool = False  # a refit run among them: its selection heads embed train and valid once more


def plan_eval_memory(budget_gb: float, pools: list[PoolFiles], closed_form: bool, keep_first: bool,
                     memory_mb: float, concept_sections: bool = True) -> EvalMemoryPlan:
    """Plan an evaluation of these pools (all held at once; their columns scored one at a time, the
    first run's embeddings kept when `keep_first`; `concept_sections`: zero-shot, few-shot or
    detection asked for); raises MemoryBudgetError (one line) when it does not fit `budget_gb`."""
    held = {"process": PROCESS_BYTES, "slack": SLACK_BYTES}
    phases: dict[str, int] = {}
    for i, pool in enumerate(pools):
        t = cache_shape(pool.test, False)
        tr = cache_shape(pool.train, False) if pool.train is not None else None
        va = cache_shape(pool.valid, False) if pool.valid is not None else None
        tag = f" ({pool.test.parent.name})" if len(pools) > 1 else ""
        held[f"{pool.test.stem} split{tag}"] = _split_bytes(t, True)
        if tr is not None:
            held[f"train split{tag}"] = _split_bytes(tr, closed_form)
        if va is not None:
            held[f"valid split{tag}"] = _split_bytes(va, closed_form)
        pool_rows = t.n_images + t.n_captions
        if keep_first and i == 0 and pool.dims:  # the first run's embeddings and offsets, for its example grids
            held["first run's embeddings"] = pool_rows * (pool.dims[0] + 1) * 4
        # one column at a time: the pool's embeddings and offsets, train and valid images embedded for
        # the concept sections, and one chunk of ranking scores
        widest = max(pool.dims, default=0)
        column = pool_rows * (widest + 1) * 4 + int(memory_mb * (1 << 20))
        column += 4 * widest * ((tr.n_images if tr else 0) + (va.n_images if va else 0)) * (2 if pool.tuned_apart else 1)
        if concept_sections and t.n_concepts:
            # the prompt ensemble's embeddings, image x concept scores (float64 where ranked), and the
            # probes' and detectors' own workspace
            column += 4 * widest * (t.concept_text_numbers // max(t.text_dim, 1)) + 8 * t.n_images * t.n_concepts
            column += SECTION_BYTES
        phases[f"scoring a column{tag}"] = column
        if closed_form and tr is not None:  # the baseline's fit widens train's pairs to float32
            phases[f"fitting the closed form{tag}"] = 2 * 4 * (tr.n_captions * (tr.image_dim + tr.text_dim))
    plan = EvalMemoryPlan(int(budget_gb * GB), held, phases)
    if plan.total > plan.budget:
        where = pools[0].test if len(pools) == 1 else "this evaluation"
        raise MemoryBudgetError(
            f"{where}: evaluating it needs about {format_bytes(plan.total)} ({plan.largest()}), above "
            f"--max-memory-gb {budget_gb:g}; raise it to at least {gib_up(plan.total)}, evaluate a compact run "
            "(`cli.py compact --dims 256`), or leave out what learns from train (--skip, --no-closed-form)")
    return plan
