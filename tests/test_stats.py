"""Bootstrap intervals against a straightforward resampling reference on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from medembed.common.stats import paired_difference, rate_interval


def _reference(a: np.ndarray, b: np.ndarray | None = None, draws: int = 40000, seed: int = 1) -> tuple[float, float]:
    """Resample the queries with replacement, recompute the mean (or the paired difference)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(draws, a.size))
    values = 100 * a[idx].mean(1) if b is None else 100 * (b[idx].mean(1) - a[idx].mean(1))
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def test_rate_interval_matches_resampling():
    hits = np.array([1] * 30 + [0] * 70, dtype=bool)
    lo, hi = rate_interval(hits)
    ref = _reference(hits.astype(float))
    assert lo == pytest.approx(ref[0], abs=1.01) and hi == pytest.approx(ref[1], abs=1.01)  # 1 query = 1 point
    assert lo < 30 < hi and (lo, hi) == (21.0, 39.0)
    assert rate_interval(np.ones(50, bool)) == (100.0, 100.0)  # nothing to resample away
    assert np.isnan(rate_interval(np.zeros(0, bool))[0])


def test_paired_difference_matches_resampling():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.35
    b = a.copy()
    flip = rng.choice(400, 60, replace=False)
    b[flip[:45]] = True  # B gains 45 - (overlap) queries
    b[flip[45:]] = False
    p = paired_difference(a, b)
    ref = _reference(a.astype(float), b.astype(float))
    assert p.diff == pytest.approx(100 * (b.mean() - a.mean()))
    assert p.low == pytest.approx(ref[0], abs=0.6) and p.high == pytest.approx(ref[1], abs=0.6)
    same = paired_difference(a, a)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0) and not same.clear
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(a, b[:10])
