"""How sure a number is: bootstrap 95% intervals over queries, and paired differences between runs.

Recall@K and accuracy are means of per-query hits (0 or 1). The percentile bootstrap of such a mean
resamples Q queries with replacement: the resampled number of hits is then exactly
Binomial(Q, observed rate), so its quantiles give the interval without drawing a single resample.
A paired difference between two runs scored on the same queries resamples the queries' pairs of
outcomes: only the discordant ones move the difference, and their resampled counts are a
multinomial draw over (hit only in B, hit only in A, the rest), drawn `draws` times.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

LEVEL = 0.95


def rate_interval(hits: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval (in %) of the mean of 0/1 `hits`."""
    hits = np.asarray(hits, dtype=bool)
    q = hits.size
    if q == 0:
        return float("nan"), float("nan")
    p = hits.mean()
    lo, hi = binom.ppf([(1 - level) / 2, (1 + level) / 2], q, p)
    return 100 * float(lo) / q, 100 * float(hi) / q


@dataclass
class PairedDifference:
    diff: float  # B - A, in points
    low: float
    high: float

    @property
    def clear(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray, level: float = LEVEL, draws: int = 20000,
                      seed: int = 0) -> PairedDifference:
    """Bootstrap interval (in points) of mean(hits_b) - mean(hits_a) over the same queries."""
    a, b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired hits need the same queries: {a.shape} vs {b.shape}")
    q = a.size
    if q == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"))
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    counts = np.random.default_rng(seed).multinomial(q, [only_b / q, only_a / q, 1 - (only_b + only_a) / q], draws)
    diffs = 100 * (counts[:, 0] - counts[:, 1]) / q
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(100 * (only_b - only_a) / q, float(lo), float(hi))
