"""Run-to-run spread of issue 2's step-time targets, over several saved runs of bench_step_time.py.

One run of ``bench_step_time.py`` interleaves every method in every round, so its paired ratios
are robust to the load of a shared machine *within* the run; from run to run they still move by a
few percent. This script reads several saved runs (their ``.json``; it measures nothing) and
tabulates, per K and PUB strategy, the paired median of each run against the floor and against
TorchJD's UPGrad, with their minimum, median and maximum over the runs and how many runs meet each
target; a strip chart goes next to the table.

    python benchmarks/bench_step_time.py          # writes docs/results/step_time.json
    python benchmarks/bench_step_time.py --out docs/results/step_time_runs --name <date>  # more
    python benchmarks/step_time_runs.py \
        docs/results/step_time_runs/*.json docs/results/step_time.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_step_time import (
    FLOOR_TARGETS,
    PUB_STRATEGIES,
    REPO,
    KResult,
    load_json,
    paired_ratio,
)

#: The references of the two targets: method -> its target at K (None: no target at that K).
REFERENCES: dict[str, Callable[[int], float | None]] = {
    "floor": FLOOR_TARGETS.get,
    "torchjd-upgrad": lambda k: 1.0,  # "PUB is no slower than TorchJD's UPGrad step"
}


def ratios(runs: Sequence[list[KResult]], reference: str) -> dict[tuple[int, str], list[float]]:
    """Per (K, PUB strategy): the paired median ratio to ``reference`` in each run."""
    table: dict[tuple[int, str], list[float]] = {}
    for results in runs:
        for res in results:
            if reference not in res.timings:
                continue
            for strategy in PUB_STRATEGIES:
                name = f"pub-{strategy}"
                median = paired_ratio(res.timings[name], res.timings[reference])[1]
                table.setdefault((res.k, strategy), []).append(median)
    return table


def table_lines(table: dict[tuple[int, str], list[float]], reference: str) -> list[str]:
    target = REFERENCES[reference]
    num_runs = max(len(v) for v in table.values())
    head = " | ".join(f"run {i + 1}" for i in range(num_runs))
    lines = [
        f"| K | strategy | {head} | min | median | max | target | runs meeting it |",
        "|---|---|" + "---:|" * (num_runs + 3) + "---|---|",
    ]
    for (k, strategy), values in sorted(table.items()):
        limit = target(k)
        met = "-" if limit is None else f"{sum(v <= limit for v in values)} of {len(values)}"
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(
            f"| {k} | {strategy} | {cells} | {min(values):.2f} | {statistics.median(values):.2f} "
            f"| {max(values):.2f} | {'-' if limit is None else f'<= {limit:.2f}'} | {met} |"
        )
    return lines


def plot(tables: dict[str, dict[tuple[int, str], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.5), squeeze=False)
    for ax, (reference, table) in zip(axes[0], tables.items(), strict=True):
        keys = sorted(table)
        for x, key in enumerate(keys):
            values = table[key]
            ax.plot([x] * len(values), values, "o", color="tab:blue", alpha=0.6)
            ax.plot([x - 0.3, x + 0.3], [statistics.median(values)] * 2, color="k", lw=1.5)
            limit = REFERENCES[reference](key[0])
            if limit is not None:
                ax.plot([x - 0.45, x + 0.45], [limit] * 2, color="tab:red", ls=":", lw=1.2)
        ax.set_xticks(
            range(len(keys)), [f"K={k} {s}" for k, s in keys], fontsize=7, rotation=45, ha="right"
        )
        ax.set_ylabel(f"PUB / {reference} (paired median of a run)")
        ax.set_title(f"against {reference}: dots = runs, bar = median, dotted = target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: Sequence[Path], out: Path, name: str) -> Path:
    loaded = [load_json(p) for p in paths]
    runs = [results for _, _, results in loaded]
    metas: list[dict[str, Any]] = [meta for _, meta, _ in loaded]
    tables = {reference: ratios(runs, reference) for reference in REFERENCES}
    tables = {r: t for r, t in tables.items() if t}
    lines = [
        "# Step time of the PUB core: run-to-run spread",
        "",
        f"- Command: `python benchmarks/step_time_runs.py {' '.join(_relative(p) for p in paths)}`"
        " (reads the saved runs; measures nothing)",
        "- Each column is one full run of `benchmarks/bench_step_time.py`: the paired median over "
        "its interleaved rounds (see [step_time.md](step_time.md) for the method); `min`, "
        "`median` and `max` are over the runs. No other job of ours ran during a run; other "
        "tenants of the machine did (load averages below).",
        "",
        "| run | file | date | commit | machine | load before / after | versions |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (path, meta) in enumerate(zip(paths, metas, strict=True)):
        lines.append(
            f"| {i + 1} | `{_relative(path)}` | {meta['date']} | {meta['commit']} | "
            f"{meta['machine']}, {meta['threads']} threads, `{meta['device']}` | "
            f"{meta['load_before']} / {meta.get('load_after', '?')} | Python {meta['python']}, "
            f"torch {meta['torch']}, torchjd {meta['torchjd']} |"
        )
    for reference, table in tables.items():
        lines += ["", f"## PUB / {reference}", ""]
        lines += table_lines(table, reference)
    lines += ["", f"![run-to-run spread]({name}.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    plot(tables, out / f"{name}.png")
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    return path


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("runs", type=Path, nargs="+", help="saved runs (.json)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--name", default="step_time_runs")
    args = parser.parse_args(argv)
    path = report(args.runs, args.out, args.name)
    print(f"wrote {path} and {path.with_suffix('.png')}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
