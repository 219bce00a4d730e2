"""Cost and quality of re-solving the PUB weights only every N steps (issue: core, solve_every).

Trains the reference MMoE on UCI Adult with the plain ``PUB`` wrapper (Adam, lr 1e-3, batch 512)
under four settings, over several seeds, in one process with the runs interleaved:

* ``equal``: ``PUB(strategy="equal")``: equal weights through the same machinery (K backward
  passes, look-aheads and Gram), so its time is that of the machinery, not of a plain step;
* ``pareto/1``: PUB pareto, weights solved every step;
* ``pareto/10 weighted``: solved every 10 steps; in between one backward pass of the weighted loss
  and a plain step, i.e. ``T(sum_k a_k g_k)`` instead of ``sum_k a_k T(g_k)``;
* ``pareto/10 reuse``: solved every 10 steps; in between K backward passes and K look-aheads with
  the last weights (only the Gram matrix and the solve are skipped).

Reports the median time per training step (and its spread over seeds), per-task test AUC (mean and
standard deviation over seeds) and writes ``docs/results/solve_every.md`` plus a PNG.

    python benchmarks/bench_solve_every.py            # 3 seeds, 3 epochs (~a few minutes)
    python benchmarks/bench_solve_every.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from integrations.moe_ranking.data import load_data
from integrations.moe_ranking.models import build_model
from pub_optim import PUB

SETTINGS: dict[str, dict[str, object]] = {
    "equal": {"strategy": "equal"},
    "pareto/1": {"strategy": "pareto"},
    "pareto/10 weighted": {"strategy": "pareto", "solve_every": 10},
    "pareto/10 reuse": {
        "strategy": "pareto",
        "solve_every": 10,
        "between_solves": "reuse_weights",
    },
}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run(setting: str, seed: int, data, epochs: int, batch_size: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = build_model("mmoe", data)
    options = dict(SETTINGS[setting])
    strategy = options.pop("strategy")
    opt = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        strategy,  # type: ignore[arg-type]
        shared_params=list(model.shared_parameters()),
        **options,  # type: ignore[arg-type]
    )
    bce = torch.nn.BCEWithLogitsLoss()
    train = data.train
    generator = torch.Generator().manual_seed(seed)
    step_times: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        model.train()
        for start in range(0, len(train), batch_size):
            batch = train.batch(order[start : start + batch_size])
            t0 = time.perf_counter()
            logits = model(batch)
            losses = {
                name: bce(logits[name], batch["labels"][:, k])
                for k, name in enumerate(data.task_names)
            }
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
            step_times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        logits = model(data.test.batch(slice(None)))
    aucs = {
        name: auc(logits[name].numpy(), data.test.labels[:, k].numpy())
        for k, name in enumerate(data.task_names)
    }
    return {"ms_per_step": 1e3 * statistics.median(step_times[5:]), "auc": aucs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, no docs written")
    parser.add_argument("--out", default="docs/results/solve_every.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 1
    torch.set_num_threads(2)
    data = load_data("adult")
    results: dict[str, list[dict[str, object]]] = {name: [] for name in SETTINGS}
    for seed in range(args.seeds):
        for name in SETTINGS:  # interleaved: machine noise hits every setting alike
            results[name].append(run(name, seed, data, args.epochs, args.batch_size))
            print(f"seed {seed} {name:20s} {results[name][-1]}", flush=True)

    tasks = data.task_names
    header = (
        "| setting | ms/step (median over seeds) | spread (min-max) | "
        + " | ".join(f"test AUC {t}" for t in tasks)
        + " | mean AUC |"
    )
    lines = [header, "|" + "---|" * (4 + len(tasks))]
    summary = {}
    for name, runs in results.items():
        times = [float(r["ms_per_step"]) for r in runs]  # type: ignore[arg-type]
        per_task = {t: [r["auc"][t] for r in runs] for t in tasks}  # type: ignore[index]
        means = [statistics.mean(per_task[t]) for t in tasks]
        sds = [statistics.stdev(per_task[t]) if len(runs) > 1 else 0.0 for t in tasks]
        summary[name] = (statistics.median(times), means, sds)
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(means, sds, strict=True))
        lines.append(
            f"| {name} | {statistics.median(times):.1f} | {min(times):.1f}-{max(times):.1f} | "
            f"{cells} | {statistics.mean(means):.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    command = "python benchmarks/bench_solve_every.py " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    _plot(summary, tasks, png)
    out.write_text(
        "# Re-solving the weights every N steps: cost and quality\n\n"
        f"- command: `{command.strip()}`\n"
        f"- date: {dt.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{platform.processor() or 'cpu'}, torch threads {torch.get_num_threads()}; "
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}\n"
        f"- model: MMoE (reference integration defaults), Adam lr 1e-3, batch {args.batch_size}, "
        f"{args.epochs} epochs, {args.seeds} seeds; UCI Adult official test split; time per step "
        "= forward + backward + step, median over the steps of a run, then median over seeds\n\n"
        f"{table}\n\n![solve_every](solve_every.png)\n\n"
        "`pareto/10 weighted` costs what the plain step costs on 9 steps out of 10 (one backward "
        "pass); what it approximates is `sum_k a_k T(g_k)` by `T(sum_k a_k g_k)`. "
        "`pareto/10 reuse` keeps the exact update with stale weights and only saves the solve. "
        "`equal` is `PUB(strategy=\"equal\")`: the same machinery with fixed equal weights.\n"
    )
    print(f"wrote {out} and {png}")


def _plot(summary: dict[str, tuple[float, list[float], list[float]]], tasks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax_time, ax_auc) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_time.bar(names, [summary[n][0] for n in names], color="#4c72b0")
    ax_time.set_ylabel("ms per training step")
    ax_time.tick_params(axis="x", rotation=20)
    width = 0.8 / len(tasks)
    for k, task in enumerate(tasks):
        xs = [i + k * width for i in range(len(names))]
        ax_auc.bar(
            xs,
            [summary[n][1][k] for n in names],
            width,
            yerr=[summary[n][2][k] for n in names],
            label=task,
        )
    ax_auc.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(names))], names)
    ax_auc.tick_params(axis="x", rotation=20)
    low = min(min(summary[n][1]) for n in names)
    ax_auc.set_ylim(low - 0.02, None)
    ax_auc.set_ylabel("test AUC (mean ± sd over seeds)")
    ax_auc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
