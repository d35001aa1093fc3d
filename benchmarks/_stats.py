"""Small-sample statistics for the benchmark tables: Student-t intervals and paired t-tests.

No SciPy: the t distribution's CDF is the integral of its density (composite Simpson rule on
``[0, |t|]``, exact to ~1e-10 for the degrees of freedom used here), its quantiles come from
bisection on the CDF. ``tests/test_benchmarks.py`` checks both against SciPy where it is installed.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "PairedTest", "mean_interval", "paired_test", "t_cdf", "t_quantile"]


def _t_density(x: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: float, intervals: int = 4000) -> float:
    """``P(T <= x)`` for Student's t with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom should be > 0, got {df}")
    a = abs(x)
    if a == 0:
        return 0.5
    n = intervals + intervals % 2
    h = a / n
    total = _t_density(0.0, df) + _t_density(a, df)
    for i in range(1, n):
        total += (4 if i % 2 else 2) * _t_density(i * h, df)
    half = min(0.5, total * h / 3)
    return 0.5 + half if x > 0 else 0.5 - half


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-9)."""
    if not 0 < p < 1:
        raise ValueError(f"p should be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided ``level`` Student-t confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.3f}"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean and its ``level`` t-interval (``mean +- t_{n-1} * sd / sqrt(n)``)."""
    v = [float(x) for x in values if math.isfinite(x)]
    if not v:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(v)
    if len(v) < 2:
        return Interval(m, math.nan, math.nan, len(v))
    half = t_quantile(0.5 + level / 2, len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
    return Interval(m, m - half, m + half, len(v))


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of ``a - b`` over matched pairs (here: runs with the same seed)."""

    difference: Interval
    t: float
    p: float

    def __str__(self) -> str:
        return f"{self.difference} (t = {self.t:+.2f}, p = {self.p:.3f})"


def paired_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """Two-sided paired t-test of ``mean(a - b) = 0``; ``a[i]`` and ``b[i]`` are a pair."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    diff = mean_interval(d, level)
    if len(d) < 2:
        return PairedTest(diff, math.nan, math.nan)
    sd = statistics.stdev(d)
    if sd == 0:
        t = math.copysign(math.inf, diff.mean) if diff.mean else 0.0
        return PairedTest(diff, t, 0.0 if diff.mean else 1.0)
    t = diff.mean / (sd / math.sqrt(len(d)))
    p = 2 * (1 - t_cdf(abs(t), len(d) - 1))
    return PairedTest(diff, t, max(0.0, min(1.0, p)))
