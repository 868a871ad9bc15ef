"""Paired statistics: intervals against scipy and hand-computed cases, power against simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ospo_fast.app.stats import bootstrap_interval, detectable_difference, seeds_needed, t_interval


def test_t_interval_matches_scipy_on_random_inputs():
    rng = np.random.default_rng(7)
    for n in (2, 3, 7, 31):
        x = rng.normal(0.03, 0.1, size=n)
        out = t_interval(x)
        lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
        assert out["mean"] == pytest.approx(x.mean()) and out["ci95"] == pytest.approx([lo, hi])
        assert out["n"] == n and out["sd"] == pytest.approx(x.std(ddof=1))


def test_t_interval_by_hand():
    # mean 0.2, sd 0.1, n 3: half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    out = t_interval([0.1, 0.2, 0.3])
    assert out["ci95"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-6)
    assert t_interval([0.5])["ci95"] == [None, None]  # one difference: no spread, no interval


def test_bootstrap_interval_counts_and_covers():
    x = [0.1, 0.0, -0.05, 0.2, 0.0, 0.3]
    out = bootstrap_interval(x, seed=1)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 2, 1, 6)
    assert out["ci95"][0] <= out["mean"] <= out["ci95"][1] and min(x) <= out["ci95"][0]
    assert bootstrap_interval(x, seed=1) == out  # seeded


def test_power_by_simulation():
    # seeds_needed(sd, delta) paired units detect delta about 80% of the time; one fewer falls short.
    sd, delta = 0.1, 0.08
    n = seeds_needed(sd, delta)
    rng = np.random.default_rng(0)

    def rejection_rate(size):
        x = rng.normal(delta, sd, size=(20000, size))
        t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(size))
        return float((np.abs(t) > stats.t.ppf(0.975, size - 1)).mean())

    assert rejection_rate(n) >= 0.79 and rejection_rate(n - 1) < 0.8
    assert detectable_difference(sd, n) <= delta < detectable_difference(sd, n - 1)


@pytest.mark.parametrize("bad", [[], [float("nan")], [1.0, float("inf")]])
def test_bad_differences_are_named(bad):
    with pytest.raises(ValueError, match="differences"):
        t_interval(bad)
    with pytest.raises(ValueError, match="differences"):
        bootstrap_interval(bad)
