"""The protocol's statistics against independent references: scipy's paired t-test, a Monte Carlo
estimate of power, and the measured spread of the committed first study."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.study import protocol

stats = pytest.importorskip("scipy.stats")


def test_paired_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.01, 12), rng.normal(0.799, 0.01, 12)
    diffs = list(a - b)
    got = protocol.Paired.of(diffs)
    ref = stats.ttest_rel(a, b)
    assert got.p == pytest.approx(float(ref.pvalue), rel=1e-9)
    low, high = stats.t.interval(0.95, 11, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (got.ci_low, got.ci_high) == pytest.approx((low, high), rel=1e-9)
    assert got.n == 12 and got.sd == pytest.approx(float(np.std(diffs, ddof=1)))
    same = protocol.Paired.of([0.0, 0.0, 0.0])
    assert same.p == 1.0 and same.ci_low == same.ci_high == 0.0
    assert math.isnan(protocol.Paired.of([0.1]).p)


@pytest.mark.parametrize(("effect", "sd", "n", "alpha"), [(0.002, 0.001, 6, 0.05 / 16),
                                                           (0.002, 0.0015, 15, 0.05 / 40),
                                                           (0.0, 0.001, 8, 0.05)])  # fmt: skip
def test_power_matches_simulation(effect: float, sd: float, n: int, alpha: float) -> None:
    rng = np.random.default_rng(1)
    reps = 40_000
    diffs = rng.normal(effect, sd, size=(reps, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    simulated = float(np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)))
    assert protocol.power(effect, sd, n, alpha) == pytest.approx(simulated, abs=0.01)


def test_seeds_needed_and_detectable_effect_invert_power() -> None:
    alpha = protocol.corrected_alpha(24)
    n = protocol.seeds_needed(0.0012, alpha)
    assert n is not None and protocol.MIN_SEEDS <= n <= protocol.MAX_SEEDS
    assert (
        protocol.power(0.002, 0.0012, n, alpha) >= 0.8 > protocol.power(0.002, 0.0012, n - 1, alpha)
    )
    mde = protocol.detectable_effect(0.0012, n, alpha)
    assert mde <= 0.002 and protocol.power(mde, 0.0012, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert protocol.seeds_needed(0.01, alpha) is None  # 40 seeds are not enough
    assert protocol.seeds_needed(0.0001, alpha) == protocol.MIN_SEEDS
    # The first study's design: 5 seeds at alpha/80 cannot see +0.002 at sd 0.0007.
    assert protocol.detectable_effect(0.0007, 5, 0.05 / 80) > 0.002


def test_duplicates_and_primary() -> None:
    assert protocol.is_primary("pub-pareto") and not protocol.is_primary("nash-mtl")
    assert not protocol.runs_at("pub-equal-magnitude", 2) and protocol.runs_at(
        "pub-equal-magnitude", 3
    )
    assert protocol.reported_as("imtl-g", 2) == "nash-mtl"


def test_paired_spread_of_records() -> None:
    def rec(d: str, method: str, seed: int, auc: float) -> dict:
        return {"key": {"dataset": d, "model": "m", "method": method, "seed": seed},
                "test": {"test/mean_auc": auc}}  # fmt: skip

    records = [rec("a", "equal", s, 0.8) for s in range(3)]
    records += [rec("a", "pub-pareto", s, 0.8 + d) for s, d in enumerate((0.001, 0.002, 0.003))]
    records += [rec("a", "pub-min-norm", s, 0.8 + d) for s, d in enumerate((0.0, 0.002, 0.004))]
    records += [rec("a", "mgda", s, 0.8 + d) for s, d in enumerate((0.0, 0.1, 0.2))]  # secondary
    spread = protocol.paired_spread(records)
    assert spread[("a", "m")] == pytest.approx(math.sqrt((0.001**2 + 0.002**2) / 2), rel=1e-6)
