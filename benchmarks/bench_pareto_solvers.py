"""Time the three Pareto (Nash bargaining) solvers side by side on the same Gram matrices.

* ``newton``: the native damped Newton solver (:func:`pub_optim.solvers.nash_newton`);
* ``dpp``: the cvxpy DPP program, compiled once per K, re-solved with new data (CLARABEL);
* ``ccp``: the concave-convex procedure of Nash-MTL (Navon et al., ICML 2022), the formulation
  of the PUB paper (arXiv:2410.05806): the whole procedure, all of its convex programs, each
  recompiled by cvxpy (it is not DPP), started cold from ``alpha = 1`` as Nash-MTL's first call.

Matrices: for each K, several Gram matrices of random Adam-like look-ahead updates (a shared
gradient component plus task noise, one shared second-moment estimate), scaled to mean diagonal
one as the :class:`~pub_optim.strategies.Pareto` strategy does before calling a solver. Seeds are
fixed. Every solver sees the same matrices in an interleaved order (so that a load change on the
machine affects all three alike), and each time is one solve (Newton: the mean of a batch of
calls, to stay above the timer's resolution).

Reported per K: median and interquartile range of the time per solve; the Nash residual
``max_k |alpha_k (G alpha)_k - 1|`` of the raw weights (worst over the matrices); the largest
difference between the normalised weights (sum one) of each pair of solvers; the speed-up of
Newton over the CCP (ratio of medians, and the pessimistic CCP first quartile / Newton third
quartile, which decides whether the 1000x target is met) and over the DPP re-solve.

Run: ``.venv/bin/python benchmarks/bench_pareto_solvers.py`` (``--quick`` for a smoke run).
Writes ``docs/results/pareto_solvers.md`` and ``docs/results/pareto_solvers.png``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import header_lines  # noqa: E402
from pub_optim.solvers.nash_newton import nash_residual, solve_nash_newton  # noqa: E402

SOLVERS = ("newton", "dpp", "ccp")
PAIRS = (("newton", "dpp"), ("newton", "ccp"), ("dpp", "ccp"))


def adam_like_gram(k: int, p: int, seed: int) -> np.ndarray:
    """Gram matrix (mean diagonal one) of K Adam-like look-ahead updates of P coordinates."""
    rng = np.random.default_rng(seed)
    shared = rng.uniform(0.2, 1.0)
    grads = shared * rng.standard_normal(p)[None, :] + rng.standard_normal((k, p)) * rng.uniform(
        0.3, 3.0, (k, 1)
    )
    b1, b2, step = 0.9, 0.999, 10
    m = 0.1 * rng.standard_normal(p)
    v = np.mean(grads**2, axis=0) * rng.uniform(0.5, 1.5, p)
    m_k = b1 * m + (1 - b1) * grads
    v_k = b2 * v + (1 - b2) * grads**2
    updates = -(m_k / (1 - b1**step)) / (np.sqrt(v_k / (1 - b2**step)) + 1e-8)
    gram = updates @ updates.T
    gram = 0.5 * (gram + gram.T)
    return gram / np.mean(np.diag(gram))


@dataclass
class Record:
    times: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SOLVERS})
    residual: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SOLVERS, 0.0))
    diff: dict[tuple[str, str], float] = field(default_factory=lambda: dict.fromkeys(PAIRS, 0.0))
    ccp_programs: list[int] = field(default_factory=list)
    condition: list[float] = field(default_factory=list)


def _time_newton(gram: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for _ in range(batch):
        solve_nash_newton(gram)
    return (time.perf_counter() - start) / batch


def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(ks: list[int], matrices: int, repeats: int, batch: int, p: int) -> dict[int, Record]:
    from pub_optim.solvers.nash_cvxpy import NashCCP, NashDPP

    dpp = NashDPP()
    ccp = NashCCP()
    records: dict[int, Record] = {}
    for k in ks:
        record = Record()
        grams = [adam_like_gram(k, p, seed=1000 * k + i) for i in range(matrices)]
        # Warm-up (and correctness): compile the DPP program, run every solver once per matrix.
        for gram in grams:
            record.condition.append(float(np.linalg.cond(gram)))
            weights = {"newton": solve_nash_newton(gram), "dpp": dpp(gram)}
            ccp.reset()
            weights["ccp"] = ccp(gram)
            record.ccp_programs.append(ccp.last_num_solves)
            for name, alpha in weights.items():
                record.residual[name] = max(record.residual[name], nash_residual(gram, alpha))
            normalised = {name: alpha / alpha.sum() for name, alpha in weights.items()}
            for a, b in PAIRS:
                gap = float(np.max(np.abs(normalised[a] - normalised[b])))
                record.diff[(a, b)] = max(record.diff[(a, b)], gap)
        for _ in range(repeats):
            for gram in grams:
                record.times["newton"].append(_time_newton(gram, batch))
                record.times["dpp"].append(_time_once(lambda g=gram: dpp(g)))
                ccp.reset()
                record.times["ccp"].append(_time_once(lambda g=gram: ccp(g)))
        records[k] = record
        print(f"K={k}: done", file=sys.stderr, flush=True)
    return records


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def table(records: dict[int, Record]) -> str:
    head = (
        "| K | newton median [IQR] | dpp median [IQR] | ccp median [IQR] (programs) "
        "| ccp / newton (Q1/Q3) | dpp / newton | residual newton / dpp / ccp "
        "| max diff newton-dpp / newton-ccp / dpp-ccp |"
    )
    lines = [head, "|" + "---|" * 8]
    for k, rec in records.items():
        cells = [str(k)]
        medians = {}
        for name in SOLVERS:
            q1, med, q3 = quartiles(rec.times[name])
            medians[name] = med
            cell = f"{fmt_time(med)} [{fmt_time(q1)} .. {fmt_time(q3)}]"
            if name == "ccp":
                cell += f" ({min(rec.ccp_programs)}-{max(rec.ccp_programs)})"
            cells.append(cell)
        cells.append(f"{medians['ccp'] / medians['newton']:.0f}x ({speedups(rec)[1]:.0f}x)")
        cells.append(f"{medians['dpp'] / medians['newton']:.0f}x")
        cells.append(" / ".join(f"{rec.residual[s]:.1e}" for s in SOLVERS))
        cells.append(" / ".join(f"{rec.diff[p]:.1e}" for p in PAIRS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rec: Record) -> tuple[float, float]:
    """Median ratio CCP / Newton, and a pessimistic one: CCP's first quartile / Newton's third."""
    ccp, newton = quartiles(rec.times["ccp"]), quartiles(rec.times["newton"])
    return ccp[1] / newton[1], ccp[0] / newton[2]


def targets(records: dict[int, Record]) -> list[str]:
    out = []
    for k, rec in records.items():
        speedup, pessimistic = speedups(rec)
        if pessimistic >= 1000:
            verdict = "met"
        elif speedup >= 1000:
            verdict = "met by the medians only, NOT by the quartiles: borderline"
        else:
            verdict = "NOT met"
        # Agreement "within the CCP's own accuracy": the issue states it as a residual of
        # ~1e-5..1e-7 (checked: <= 1e-5); stricter, also against 10x the CCP's measured residual.
        agreement = max(rec.diff.values())
        strict = max(10 * rec.residual["ccp"], 1e-9)
        worst = max(SOLVERS, key=lambda name: rec.residual[name])
        out.append(
            f"- K={k}: newton {speedup:.0f}x faster than the CCP (medians; {pessimistic:.0f}x "
            f"from CCP Q1 / newton Q3) ({verdict}: target >= 1000x); "
            f"newton residual {rec.residual['newton']:.1e} "
            f"({'met' if rec.residual['newton'] <= 1e-9 else 'NOT met'}: target <= 1e-9); "
            f"CCP residual {rec.residual['ccp']:.1e}; the three agree within {agreement:.1e} "
            f"({'met' if agreement <= 1e-5 else 'NOT met'}: target <= 1e-5, the CCP's stated "
            f"accuracy; {'within' if agreement <= strict else 'NOT within'} 10x its measured "
            f"residual = {strict:.1e}; least accurate here: {worst}, "
            f"residual {rec.residual[worst]:.1e})"
        )
    return out


def plot(records: dict[int, Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = list(records)
    for offset, (name, label) in enumerate(
        [("newton", "native Newton"), ("dpp", "cvxpy DPP re-solve"), ("ccp", "Nash-MTL CCP")]
    ):
        q = [quartiles(records[k].times[name]) for k in ks]
        med = np.array([x[1] for x in q])
        err = np.array([[x[1] - x[0] for x in q], [x[2] - x[1] for x in q]])
        xs = np.array(ks) * (1.0 + 0.04 * (offset - 1))
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("number of tasks K")
    ax.set_ylabel("time per solve [s] (median, IQR)")
    ax.set_title("Nash bargaining weights: time per solve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> list[str]:
    import clarabel
    import cvxpy
    import torch

    return [
        *header_lines(),
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}, cvxpy {cvxpy.__version__}, clarabel {clarabel.__version__}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--matrices", type=int, default=5, help="Gram matrices per K")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the matrices")
    parser.add_argument("--batch", type=int, default=200, help="Newton calls per timing")
    parser.add_argument("--p", type=int, default=4096, help="coordinates per update")
    parser.add_argument("--quick", action="store_true", help="smoke run, writes nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.matrices, args.repeats, args.batch = [2, 4], 2, 2, 20
    records = run(args.ks, args.matrices, args.repeats, args.batch, args.p)
    text = table(records)
    verdicts = targets(records)
    print(text)
    print("\n".join(verdicts))
    if args.quick:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    plot(records, args.out / "pareto_solvers.png")
    command = ".venv/bin/python benchmarks/bench_pareto_solvers.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    doc = [
        "# Pareto (Nash bargaining) solvers: native Newton vs cvxpy DPP vs Nash-MTL CCP",
        "",
        "Generated by `benchmarks/bench_pareto_solvers.py` (see its docstring for the method).",
        "",
        f"Command: `{command.strip()}`",
        "",
        *environment(),
        f"- matrices: {args.matrices} per K, Adam-like updates of {args.p} coordinates, "
        f"mean diagonal 1; {args.repeats} timed passes; Newton timed over batches of "
        f"{args.batch} calls; the CCP restarts cold (alpha = 1) at every solve",
        "",
        text,
        "",
        "Residual: `max_k |alpha_k (G alpha)_k - 1|` of the raw weights, worst over the "
        "matrices. Max diff: largest absolute difference between normalised weights (sum one). "
        "(programs): convex programs the CCP solved per call.",
        "",
        "Targets:",
        "",
        *verdicts,
        "",
        "Notes:",
        "",
        "- The machine is shared (several jobs on 2 logical CPUs; see the load average): absolute "
        "times move between runs by up to ~2x. The three solvers are timed interleaved on the "
        "same matrices, so their ratios move less, but a ratio near a threshold can fall on "
        "either side of it from run to run.",
        "- For K <= 16 the native solver's cost is its number of numpy calls (a few microseconds "
        "each here): about 12 for the start and the final check plus 8 per Newton iteration, "
        "3-4 iterations at K = 4 and 8, 5 at K = 16; K = 2 is a closed form. The CCP needs two "
        "convex programs at every K here, each recompiled by cvxpy, so its cost grows with K "
        "more slowly than Newton's at small K: K = 4 is where the ratio is smallest.",
        "- The DPP program is solved with tightened CLARABEL settings (gap 1e-12, maximal step "
        "0.9; see `pub_optim/solvers/nash_cvxpy.py`): residual ~1e-9 typically, up to ~1e-6 "
        "where the interior-point method stalls; with CLARABEL's defaults it is ~1e-5.",
        "",
        "![time per solve](pareto_solvers.png)",
        "",
    ]
    (args.out / "pareto_solvers.md").write_text("\n".join(doc))
    print(f"wrote {args.out / 'pareto_solvers.md'} and {args.out / 'pareto_solvers.png'}")


if __name__ == "__main__":
    main()
