"""Step time and peak memory of PUB over a large embedding table: sparse vs dense gradients.

A recommendation-shaped model: one shared table of ``--rows`` x 16 (1M rows: 16M parameters),
a batch of 512 ids per step (a tiny fraction of the rows), a small dense tower and one head per
task, K tasks. Per step, interleaved in rounds (the machine is shared), medians and IQR:

* ``plain dense`` / ``plain sparse``: the optimizer on the summed loss, table with dense or
  sparse gradients (the floor a user pays without balancing);
* ``PUB dense``: PUB over the dense-gradient table (K per-task gradients, the eager path: Adagrad
  has no compiled kernel), with the untouched rows taken once (their look-ahead is the drift, the
  same for every task);
* ``PUB dense, all rows``: the same with that shortcut off (K look-aheads over the whole table);
* ``PUB sparse``: PUB over the sparse-gradient table (per-task rows touched only);
* ``pair``: ``PUB([SparseAdam(table), Adam(dense)])`` against the plain pair;
* ``plain dense Adam`` / ``PUB dense Adam`` (eager, ``fused=False``) / ``..., all rows``: the
  untouched-rows shortcut under Adam, whose drift (the first moment) moves every row.

Adagrad for the single-optimizer rows (it takes both gradient layouts, and a zero-gradient row
keeps its value and state, so the dense and sparse runs compute the same step).

    .venv/bin/python -m benchmarks.bench_embeddings     # docs/results/embeddings.{md,json,png}
    .venv/bin/python -m benchmarks.bench_embeddings --rows 100000 --rounds 2 --out /tmp/e
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.machine import header_lines
from benchmarks.memory import peak_bytes
from benchmarks.study.provenance import code_state
from pub_optim import PUB

REPO = Path(__file__).resolve().parents[1]
DIM, BATCH = 16, 512


class Ranker(nn.Module):
    def __init__(self, rows: int, num_tasks: int, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(rows, DIM, sparse=sparse)
        self.tower = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(num_tasks))

    def losses(self, ids: Tensor, y: Tensor) -> list[Tensor]:
        z = self.tower(self.table(ids))
        return [
            nn.functional.binary_cross_entropy_with_logits(head(z).squeeze(-1), y[:, k])
            for k, head in enumerate(self.heads)
        ]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.tower.parameters(), *self.heads.parameters()]


def make_step(name: str, rows: int, k: int) -> Callable[[int], None]:
    sparse = name in ("plain sparse", "PUB sparse", "plain pair", "pair")
    dense_adam = name in ("plain dense Adam", "PUB dense Adam", "PUB dense Adam, all rows")
    model = Ranker(rows, k, sparse)
    opt: Any
    if name in ("plain pair", "pair"):
        inner = [
            torch.optim.SparseAdam([model.table.weight], lr=1e-3),
            torch.optim.Adam(model.dense_parameters(), lr=1e-3),
        ]
        opt = PUB(inner, "pareto") if name == "pair" else inner
    elif dense_adam:
        base = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = PUB(base, "pareto", fused=False) if name.startswith("PUB") else base
    else:
        base = torch.optim.Adagrad(model.parameters(), lr=0.05)
        opt = PUB(base, "pareto") if name.startswith("PUB") else base
    if isinstance(opt, PUB) and name.endswith("all rows"):
        assert opt._engine is not None
        opt._engine.untouched_rows = False

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, rows, (BATCH,), generator=g)
        y = torch.randint(0, 2, (BATCH, k), generator=g).float()
        losses = model.losses(ids, y)
        if isinstance(opt, PUB):
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
            return
        optimizers = opt if isinstance(opt, list) else [opt]
        for o in optimizers:
            o.zero_grad()
        torch.stack(losses).sum().backward()
        for o in optimizers:
            o.step()

    return step


NAMES = (
    "plain dense",
    "PUB dense",
    "PUB dense, all rows",
    "plain sparse",
    "PUB sparse",
    "plain pair",
    "pair",
    "plain dense Adam",
    "PUB dense Adam",
    "PUB dense Adam, all rows",
)


def measure(rows: int, ks: list[int], rounds: int, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ks:
        runners = {name: make_step(name, rows, k) for name in NAMES}
        for run in runners.values():  # warm-up: first-step state and allocations
            run(0)
            run(1)
        times: dict[str, list[float]] = {name: [] for name in NAMES}
        for r in range(rounds):
            for name, run in runners.items():
                for i in range(steps):
                    t0 = time.perf_counter()
                    run(100 + r * steps + i)
                    times[name].append(1e3 * (time.perf_counter() - t0))
        memory = {name: peak_bytes(lambda run=run: run(999)) for name, run in runners.items()}
        out[str(k)] = {"times_ms": times, "peak_bytes": memory}
        del runners
    return out


def quantiles(values: list[float]) -> tuple[float, float, float]:
    lo, med, hi = np.percentile(values, [25, 50, 75])
    return float(med), float(lo), float(hi)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = sorted(results, key=int)
    width = 0.8 / len(NAMES)
    for j, name in enumerate(NAMES):
        med = [quantiles(results[k]["times_ms"][name])[0] for k in ks]
        mem = [results[k]["peak_bytes"][name] / 2**20 for k in ks]
        x = np.arange(len(ks)) + j * width
        axes[0].bar(x, med, width, label=name)
        axes[1].bar(x, mem, width, label=name)
    titles = ("ms per step (median)", "peak extra memory of a step (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(np.arange(len(ks)) + 0.4 - width / 2, [f"K={k}" for k in ks])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    if args.rows < BATCH or args.rounds < 1 or args.steps < 1 or min(args.ks) < 2:
        parser.error(f"need --rows >= {BATCH}, --rounds >= 1, --steps >= 1 and every K >= 2")
    if args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = measure(args.rows, args.ks, args.rounds, args.steps)
    state = code_state(REPO)
    command = "python -m benchmarks.bench_embeddings " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"# Embedding tables: sparse vs dense gradients ({args.rows:,} x {DIM} shared table)",
        "",
        *header_lines(),
        f"- commit: {state.get('commit', '?')}{' (dirty)' if state.get('dirty') else ''}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; "
        f"{args.threads} torch thread(s)",
        f"- command: `{command.strip()}` ({time.perf_counter() - started:.0f} s)",
        f"- batch {BATCH} ids per step; {args.rounds} interleaved rounds of {args.steps} steps; "
        "median [IQR] ms per step; peak extra memory of one step (CPU allocator events)",
        "",
    ]
    for k in sorted(results, key=int):
        res = results[k]
        base = {
            "PUB dense": "plain dense",
            "PUB dense, all rows": "plain dense",
            "PUB sparse": "plain sparse",
            "pair": "plain pair",
            "PUB dense Adam": "plain dense Adam",
            "PUB dense Adam, all rows": "plain dense Adam",
        }
        lines += [
            f"## K = {k}",
            "",
            "| run | ms/step | IQR | x its plain run | peak MiB |",
            "|---|---|---|---|---|",
        ]
        for name in NAMES:
            med, lo, hi = quantiles(res["times_ms"][name])
            ratio = ""
            if name in base:
                ratio = f"{med / quantiles(res['times_ms'][base[name]])[0]:.2f}"
            mib = res["peak_bytes"][name] / 2**20
            lines.append(f"| {name} | {med:.1f} | {lo:.1f}-{hi:.1f} | {ratio} | {mib:.1f} |")
        med = {name: quantiles(res["times_ms"][name])[0] for name in NAMES}
        memory = res["peak_bytes"]["PUB dense"] / max(1, res["peak_bytes"]["PUB sparse"])
        lines += [
            "",
            f"- PUB over the sparse-gradient table: {med['PUB dense'] / med['PUB sparse']:.1f}x "
            f"faster than over the dense one (Adagrad), peak memory {memory:.0f}x lower.",
            "- Untouched rows once, dense-gradient table: "
            f"{med['PUB dense, all rows'] / med['PUB dense']:.2f}x faster with Adagrad, "
            f"{med['PUB dense Adam, all rows'] / med['PUB dense Adam']:.2f}x with Adam (eager).",
            "",
        ]
    lines += ["![step time and memory](embeddings.png)", ""]
    (args.out / "embeddings.md").write_text("\n".join(lines))
    (args.out / "embeddings.json").write_text(
        json.dumps(
            {"provenance": state, "args": vars(args) | {"out": str(args.out)}, "results": results}
        )
    )
    plot(results, args.out / "embeddings.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
