"""Intervals for findings over seeds: the mean and its Student-t confidence interval.

    mean +- t_{(1+level)/2, n-1} * s / sqrt(n)        (s: the sample standard deviation, n >= 2 seeds)

The t quantile is computed with mpmath from the distribution function
``F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2`` (t >= 0, I the regularised incomplete beta function).
A finding is *resolved* only when its interval excludes 0; otherwise it is "not resolved at this
scale", whatever the sign of the mean; with one seed there is no interval.
"""

from __future__ import annotations

import functools
import math

import mpmath


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of freedom."""
    if not (0.5 < p < 1) or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")

    def cdf(t):
        return 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:  # F is increasing: bracket, then bisect to double precision
        lo, hi = hi, 2 * hi
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of the finite values; low = high = nan for fewer than 2 values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, math.nan, n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile((1 + level) / 2, n - 1) * s / math.sqrt(n)
    return m, m - h, m + h, n


def wording(low: float, high: float, n: int) -> str:
    """How a difference with this interval may be stated."""
    if n < 2 or math.isnan(low):
        return "one seed: no interval" if n == 1 else "no data"
    if low > 0:
        return "resolved: positive"
    if high < 0:
        return "resolved: negative"
    return "not resolved at this scale"


__all__ = ["mean_ci", "t_quantile", "wording"]
