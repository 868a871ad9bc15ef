"""Paired statistics for comparing training variants: t intervals, bootstrap intervals and power.

Variants of one seed share the initial policy, the split, the pools and the sampling seed stream, so their
results are compared seed by seed (and prompt by prompt), never as two independent samples.

>>> round(t_interval([0.1, 0.2, 0.3])["ci95"][1], 4)
0.4484
>>> seeds_needed(sd=0.05, delta=0.05)
10
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["t_interval", "bootstrap_interval", "seeds_needed", "detectable_difference"]


def _values(name: str, values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name}: expected a non-empty sequence of finite numbers, got {values!r}")
    return x


def t_interval(differences: Sequence[float], level: float = 0.95) -> dict:
    """Mean of paired differences with its Student-t interval: ``{"mean", "ci95", "sd", "n"}`` (``ci95`` is
    ``[None, None]`` for a single difference: no spread can be estimated from one)."""
    from scipy import stats

    x = _values("differences", differences)
    mean = float(x.mean())
    if x.size < 2:
        return dict(mean=mean, ci95=[None, None], sd=float("nan"), n=1)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * sd / math.sqrt(x.size)
    return dict(mean=mean, ci95=[mean - half, mean + half], sd=sd, n=int(x.size))


def bootstrap_interval(differences: Sequence[float], resamples: int = 10000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """Mean of paired differences with a percentile bootstrap interval, and the counts of positive, zero and
    negative differences: ``{"mean", "ci95", "wins", "ties", "losses", "n"}``."""
    x = _values("differences", differences)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return dict(mean=float(x.mean()), ci95=[float(lo), float(hi)], wins=int((x > 1e-12).sum()),
                ties=int((np.abs(x) <= 1e-12).sum()), losses=int((x < -1e-12).sum()), n=int(x.size))


def seeds_needed(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 10000) -> int:
    """Smallest number of paired units (seeds) whose two-sided paired t-test at level ``alpha`` detects a
    mean difference ``delta`` with probability ``power``, when the differences have standard deviation
    ``sd`` (the noncentral t distribution; at least 2)."""
    from scipy import stats

    if not (sd > 0 and delta > 0 and 0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"sd, delta: expected positive numbers, alpha and power in (0, 1); "
                         f"got {sd}, {delta}, {alpha}, {power}")
    for n in range(2, max_n + 1):
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        if stats.nct.sf(critical, n - 1, delta / sd * math.sqrt(n)) >= power:
            return n
    return max_n


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean difference a two-sided paired t-test on ``n`` units detects with probability
    ``power`` (differences of standard deviation ``sd``)."""
    from scipy import optimize, stats

    if not (sd > 0 and n >= 2):
        raise ValueError(f"sd, n: expected sd > 0 and n >= 2, got {sd}, {n}")
    critical = stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(delta: float) -> float:
        return stats.nct.sf(critical, n - 1, delta / sd * math.sqrt(n)) - power

    return float(optimize.brentq(shortfall, 1e-12 * sd, 100 * sd))
