"""The study's protocol: which comparisons decide, at what level, with how many seeds.

* **Primary comparisons**: every PUB variant against equal weighting, per setting (dataset or
  scenario x model). These are what the study is for; Holm-Bonferroni runs over them alone.
* **Secondary comparisons**: every baseline (gradient-space Nash-MTL / MGDA / IMTL-G, PCGrad,
  CAGrad, UW, FAMO, per-task state with equal weights) against equal weighting; Holm over them
  separately. They give context, not the verdict.
* **Duplicates at K = 2**: with two tasks, equal-magnitude and pareto (Nash bargaining) choose the
  same weights (``alpha_1 ||d_1|| = alpha_2 ||d_2||`` in both), so PUB equal-magnitude equals PUB
  pareto and IMTL-G equals Nash-MTL (bit-identical on every seed of the first study). Each pair
  is trained and reported once (as pareto / Nash-MTL) and counted once in the correction.
* **Effect and power**: the decision is on the paired difference of the per-seed mean test AUC
  (same seed = same initial weights and batch order), with a paired t-test and its 95% confidence
  interval. The number of seeds of a setting is chosen from the measured standard deviation of
  those paired differences so that a true difference of :data:`TARGET_EFFECT` (+0.002 mean AUC,
  the PUB paper's typical gain) is detected with :data:`POWER` (80%) at the corrected level
  ``alpha / m`` (Bonferroni, Holm's strictest step; m = the number of primary comparisons). Next
  to every verdict the report gives the smallest effect detectable with 80% power at the seeds
  actually run, so "no difference" reads as "no difference larger than this".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALPHA = 0.05
POWER = 0.8
TARGET_EFFECT = 0.002
#: Fewest seeds of any setting (a t-test with fewer degrees of freedom says little).
MIN_SEEDS = 5
#: Most seeds of one setting (beyond this the setting is reported as underpowered instead).
MAX_SEEDS = 40

BASELINE = "equal"
#: K = 2 duplicates: the method on the left equals the one on the right; only the right one runs.
K2_DUPLICATES = {"pub-equal-magnitude": "pub-pareto", "imtl-g": "nash-mtl"}


def is_primary(method: str) -> bool:
    """PUB variants (update or marginal space, shared or per-task state) are primary."""
    return method.startswith("pub-")


def runs_at(method: str, num_tasks: int) -> bool:
    """False for a method that duplicates another at this number of tasks."""
    return not (num_tasks == 2 and method in K2_DUPLICATES)


def reported_as(method: str, num_tasks: int) -> str:
    """The method a duplicate is reported under (itself otherwise)."""
    return K2_DUPLICATES[method] if num_tasks == 2 and method in K2_DUPLICATES else method


# ------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Paired:
    """Paired differences (method - equal) of the per-seed mean test AUC on common seeds."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    p: float

    @classmethod
    def of(cls, diffs: Sequence[float], confidence: float = 0.95) -> Paired:
        from scipy import stats

        n = len(diffs)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        mean = statistics.fmean(diffs)
        if n == 1:
            return cls(1, mean, math.nan, math.nan, math.nan, math.nan)
        sd = statistics.stdev(diffs)
        if sd == 0.0:
            p = 1.0 if mean == 0.0 else 0.0
            return cls(n, mean, 0.0, mean, mean, p)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        t = mean / (sd / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), n - 1))
        return cls(n, mean, sd, mean - half, mean + half, p)


def power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` for a true mean difference
    ``effect`` with paired standard deviation ``sd`` over ``n`` seeds (noncentral t)."""
    from scipy import stats

    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = effect * math.sqrt(n) / sd
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(
    sd: float,
    alpha: float,
    effect: float = TARGET_EFFECT,
    target: float = POWER,
    lo: int = MIN_SEEDS,
    hi: int = MAX_SEEDS,
) -> int | None:
    """Fewest seeds in ``[lo, hi]`` reaching ``target`` power; None if ``hi`` is not enough."""
    for n in range(max(lo, 2), hi + 1):
        if power(effect, sd, n, alpha) >= target:
            return n
    return None


def detectable_effect(sd: float, n: int, alpha: float, target: float = POWER) -> float:
    """The smallest true difference detected with ``target`` power (bisection on
    :func:`power`); nan when it cannot be said (fewer than 2 seeds, unknown spread)."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    lo, hi = 0.0, sd
    while power(hi, sd, n, alpha) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid, sd, n, alpha) < target else (lo, mid)
    return hi


def corrected_alpha(num_comparisons: int, alpha: float = ALPHA) -> float:
    return alpha / max(1, num_comparisons)


# ------------------------------------------------------------------------ measured spread
def per_seed_means(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], dict]:
    """``(dataset, model, method) -> {seed: mean test score}`` from run records (the mean over
    tasks of the test AUC; of the test R² on regression data such as ``rf1``)."""
    out: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        k = r["key"]
        out[(k["dataset"], k["model"], k["method"])][int(k["seed"])] = mean_test_score(r)
    return out


def mean_test_score(record: Mapping[str, Any]) -> float:
    """A run record's mean test score: ``test/mean_score``, or ``test/mean_auc`` in records
    written before regression tasks existed."""
    test = record["test"]
    return float(test["test/mean_score"] if "test/mean_score" in test else test["test/mean_auc"])


def task_score(test: Mapping[str, float], task: str) -> float:
    """A task's test score in a record's ``test``: its AUC, or its R² for a regression task."""
    from integrations.moe_ranking.metrics import score_key

    return float(test[score_key(test, task)])


def paired_spread(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """Per ``(dataset, model)``: the pooled standard deviation of the paired differences of the
    primary methods against equal weighting (root mean square of their sds), the spread the
    seed count is chosen for."""
    means = per_seed_means(records)
    pooled: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (d, m, method), by_seed in means.items():
        base = means.get((d, m, BASELINE))
        if method == BASELINE or base is None or not is_primary(method):
            continue
        diffs = [by_seed[s] - base[s] for s in sorted(set(by_seed) & set(base))]
        if len(diffs) >= 2:
            pooled[(d, m)].append(statistics.stdev(diffs))
    return {k: math.sqrt(statistics.fmean(v * v for v in sds)) for k, sds in pooled.items()}
