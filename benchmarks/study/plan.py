"""The study plan: settings, seeds per setting from the measured spread, resumable tranches.

    # write benchmarks/study/plan.json and print the tranches (reads the committed records)
    .venv/bin/python -m benchmarks.study.plan
    # run one tranche (resumable: rerun the same command after an interruption)
    nice -n 10 .venv/bin/python -m benchmarks.study.run_study --plan benchmarks/study/plan.json \\
        --tranche 1 --jobs 2

Seeds: for each (scenario, model) the number of seeds that detects +0.002 mean test AUC with 80%
power at ``0.05 / m`` (m = the plan's primary comparisons; :mod:`benchmarks.study.protocol`),
from the pooled standard deviation of the paired differences of the PUB methods against equal
weighting in the committed records (``--records``). A scenario without records of its own takes
the spread of its base data set (``adult-x100`` -> ``adult``; the synthetic sweep takes
Adult's, as a stand-in), or the largest measured spread when the base has none; rerun the
planner after the first tranches to re-plan from the scenario's own spread. A setting that
would need more than ``MAX_SEEDS`` seeds gets ``MAX_SEEDS`` and is marked underpowered (its
smallest detectable effect is reported instead).

Time per run: the median worker time of the same (data set, model, method) in the records;
methods without records take PUB pareto's time x 1.3 (per-task state and the marginal space
transform the optimizer K + 1 times); scenarios scale their base data set's time by their size
(rows x tasks). Tranches hold whole settings (every method on every seed) where one fits in
``--budget`` seconds of worker time (default 7,200: about two hours of compute, about one hour
of wall time with ``--jobs 2`` on two free cores), else seed ranges of one setting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.study import protocol  # noqa: E402
from benchmarks.study.methods import STUDY_METHODS  # noqa: E402
from benchmarks.study.scenarios import SCENARIOS  # noqa: E402

DEFAULT_RECORDS = REPO / "benchmarks" / "study" / "records"
DEFAULT_PLAN = REPO / "benchmarks" / "study" / "plan.json"
BUDGET_S = 7200.0
#: (scenario, models): the new scenarios run on the cheaper models.
ALL_MODELS = ("shared-bottom", "mmoe", "ple", "sparse-moe")
CHEAP_MODELS = ("shared-bottom", "mmoe")
DEFAULT_SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("adult", ALL_MODELS),
    ("movielens", ALL_MODELS),
    ("adult-x100", CHEAP_MODELS),
    ("adult-x0.01", CHEAP_MODELS),
    ("adult3-scaled", CHEAP_MODELS),
    ("movielens-k4", CHEAP_MODELS),
    ("movielens-k8", CHEAP_MODELS),
    ("rf1", CHEAP_MODELS),
    *((f"synthetic-c{c}", ("mmoe",)) for c in (0.0, 0.25, 0.5, 0.75, 1.0)),
)
#: Base data set of a scenario, and its size relative to it (rows x tasks) for run times.
BASE = {
    "adult-x100": ("adult", 1.0),
    "adult-x0.01": ("adult", 1.0),
    "adult3-scaled": ("adult", 1.5),
    "movielens-k4": ("movielens", 2.0),
    "movielens-k8": ("movielens", 4.0),
    #: 7,300 training rows x 8 tasks against Adult's 26,374 x 2.
    "rf1": ("adult", 7300 * 8 / (26374 * 2)),
    **{f"synthetic-c{c}": ("adult", 8000 / 29305) for c in (0.0, 0.25, 0.5, 0.75, 1.0)},
}
NEW_METHOD_FACTOR = 1.3
#: Scenarios scored on another metric than their base (R², not AUC): their run time scales from
#: the base, their spread never does (the largest measured one stands in until they have records).
OWN_METRIC = frozenset({"rf1"})


@dataclass
class SettingPlan:
    scenario: str
    model: str
    methods: list[str]
    seeds: int
    sd: float
    sd_basis: str
    underpowered: bool
    detectable: float
    run_s: dict[str, float]

    @property
    def compute_s(self) -> float:
        return self.seeds * sum(self.run_s[m] for m in self.methods)


def load_records(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.glob("*/*/*/*/seed*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def run_times(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        k = r["key"]
        times[(k["dataset"], k["model"], k["method"])].append(float(r["wall_time_s"]))
    return {k: statistics.median(v) for k, v in times.items()}


def estimate_run_s(
    times: dict[tuple[str, str, str], float], scenario: str, model: str, method: str
) -> float:
    base, factor = BASE.get(scenario, (scenario, 1.0))
    for name in (method, protocol.reported_as(method, 2)):
        if (base, model, name) in times:
            return times[(base, model, name)] * factor
    pareto = times.get((base, model, "pub-pareto"))
    if pareto is not None:
        return pareto * factor * NEW_METHOD_FACTOR
    known = [t for (d, _, _), t in times.items() if d == base] or list(times.values()) or [60.0]
    return max(known) * factor * NEW_METHOD_FACTOR


def make_plan(
    records: Sequence[dict[str, Any]],
    settings: Sequence[tuple[str, Sequence[str]]] = DEFAULT_SETTINGS,
    methods: Sequence[str] = STUDY_METHODS,
) -> tuple[list[SettingPlan], int, float]:
    """The per-setting plans, the number of primary comparisons m and the level alpha / m."""
    spread = protocol.paired_spread(records)
    times = run_times(records)
    rows: list[tuple[str, str, list[str]]] = []
    for scenario, models in settings:
        k = SCENARIOS[scenario].num_tasks
        chosen = [m for m in dict.fromkeys(["equal", *methods]) if protocol.runs_at(m, k)]
        rows += [(scenario, model, chosen) for model in models]
    m = sum(1 for _, _, chosen in rows for name in chosen if protocol.is_primary(name))
    alpha = protocol.corrected_alpha(m)
    largest = max(spread.values()) if spread else 0.003
    plans = []
    for scenario, model, chosen in rows:
        base, _ = BASE.get(scenario, (scenario, 1.0))
        if (scenario, model) in spread:
            sd, basis = spread[(scenario, model)], "measured"
        elif (base, model) in spread and scenario not in OWN_METRIC:
            sd, basis = spread[(base, model)], f"from {base}"
        else:
            sd, basis = largest, "largest measured (no records)"
        n = protocol.seeds_needed(sd, alpha)
        under = n is None
        seeds = protocol.MAX_SEEDS if n is None else n
        plans.append(
            SettingPlan(
                scenario, model, chosen, seeds, sd, basis, under,
                protocol.detectable_effect(sd, seeds, alpha),
                {name: estimate_run_s(times, scenario, model, name) for name in chosen},
            )
        )  # fmt: skip
    return plans, m, alpha


def tranches(plans: Sequence[SettingPlan], budget_s: float = BUDGET_S) -> list[dict[str, Any]]:
    """Pack the settings into tranches of at most ``budget_s`` estimated worker seconds."""
    pieces: list[tuple[SettingPlan, int, int]] = []  # (setting, first seed, last seed + 1)
    for p in sorted(plans, key=lambda p: p.compute_s):
        per_seed = p.compute_s / p.seeds
        step = max(1, int(budget_s // per_seed)) if per_seed > 0 else p.seeds
        pieces += [(p, s, min(p.seeds, s + step)) for s in range(0, p.seeds, step)]
    out: list[dict[str, Any]] = []
    current: list[tuple[SettingPlan, int, int]] = []
    used = 0.0

    def close() -> None:
        if current:
            out.append(
                {
                    "tranche": len(out) + 1,
                    "estimated_compute_s": round(used),
                    "parts": [
                        {"scenario": p.scenario, "model": p.model, "methods": p.methods,
                         "seeds": list(range(a, b))}
                        for p, a, b in current
                    ],
                }
            )  # fmt: skip

    for piece in pieces:
        p, a, b = piece
        cost = (b - a) * p.compute_s / p.seeds
        if current and used + cost > budget_s:
            close()
            current, used = [], 0.0
        current.append(piece)
        used += cost
    close()
    return out


def plan_json(plans: Sequence[SettingPlan], m: int, alpha: float, budget_s: float) -> dict:
    return {
        "target_effect": protocol.TARGET_EFFECT,
        "power": protocol.POWER,
        "primary_comparisons": m,
        "alpha_corrected": alpha,
        "budget_s": budget_s,
        "settings": [
            {"scenario": p.scenario, "model": p.model, "seeds": p.seeds,
             "paired_sd": p.sd, "sd_basis": p.sd_basis, "underpowered": p.underpowered,
             "detectable_effect": p.detectable, "estimated_compute_s": round(p.compute_s),
             "methods": p.methods}
            for p in plans
        ],
        "tranches": tranches(plans, budget_s),
    }  # fmt: skip


def tranche_keys(plan: dict[str, Any], number: int) -> list[Any]:
    """The runs of tranche ``number`` (1-based) of a plan written by this module."""
    from benchmarks.study.train import RunKey

    found = [t for t in plan.get("tranches", []) if t.get("tranche") == number]
    if not found:
        count = len(plan.get("tranches", []))
        raise ValueError(f"the plan has tranches 1..{count}; there is no tranche {number}")
    keys = []
    for part in found[0]["parts"]:
        keys += [
            RunKey(part["scenario"], part["model"], method, seed)
            for method in part["methods"]
            for seed in part["seeds"]
        ]
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.plan", description=__doc__)
    p.add_argument("--records", type=Path, default=DEFAULT_RECORDS)
    p.add_argument("--out", type=Path, default=DEFAULT_PLAN)
    p.add_argument("--budget", type=float, default=BUDGET_S, help="worker seconds per tranche")
    p.add_argument(
        "--methods", nargs="+", choices=STUDY_METHODS, default=list(STUDY_METHODS),
        help="methods of the plan (default: all; the runner refuses those the installed "
        "pub_optim lacks)",
    )  # fmt: skip
    p.add_argument(
        "--available-only", action="store_true",
        help="leave out the methods the installed pub_optim lacks",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.budget <= 0:
        print("error: --budget must be > 0 seconds", file=sys.stderr)
        return 2
    methods = list(args.methods)
    if args.available_only:
        from benchmarks.study.methods import get_method, unavailable

        methods = [n for n in methods if unavailable(get_method(n)) is None]
    records = load_records(args.records)
    plans, m, alpha = make_plan(records, methods=methods)
    payload = plan_json(plans, m, alpha, args.budget)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    total = sum(p.compute_s for p in plans)
    print(f"{len(records)} records; {m} primary comparisons, alpha {alpha:.2e}")
    print("| scenario | model | seeds | paired sd | basis | detectable | compute h |")
    print("|---|---|---|---|---|---|---|")
    for sp in plans:
        flag = " (underpowered)" if sp.underpowered else ""
        print(
            f"| {sp.scenario} | {sp.model} | {sp.seeds}{flag} | {sp.sd:.5f} | {sp.sd_basis} | "
            f"{sp.detectable:+.4f} | {sp.compute_s / 3600:.2f} |"
        )
    n = len(payload["tranches"])
    print(f"total {total / 3600:.1f} h of compute in {n} tranches; wrote {args.out}")
    return 0 if math.isfinite(total) else 1


if __name__ == "__main__":
    raise SystemExit(main())
