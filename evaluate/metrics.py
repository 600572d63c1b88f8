"""The metrics `eval` computes, in report order: the one place a metric is listed.

A metric is one module declaring `METRIC = Metric(...)` (see `evaluate.metric`) plus its line here;
planning, scoring, report.md, the console table and `eval --skip` read this tuple when they run, so
nothing else names a section.
"""
from __future__ import annotations

from collections.abc import Iterable

from medembed.evaluate import detection, fewshot, retrieval, zeroshot
from medembed.evaluate.metric import Metric

METRICS: tuple[Metric, ...] = (retrieval.METRIC, zeroshot.METRIC, fewshot.METRIC, detection.METRIC)


def sections() -> tuple[str, ...]:
    """Every section, in report order (what an evaluation computes by default)."""
    return tuple(m.section for m in METRICS)


def optional_sections() -> tuple[str, ...]:
    """The sections `eval --skip` may leave out."""
    return tuple(m.section for m in METRICS if m.optional)


def asked(names: Iterable[str]) -> list[Metric]:
    """The registered metrics among these section names, in report order."""
    wanted = set(names)
    return [m for m in METRICS if m.section in wanted]
