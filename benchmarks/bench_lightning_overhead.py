"""Step time of the UpdateBalancing callback in Lightning vs the plain PUB wrapper loop (issue 3).

Same model, same data (an in-memory ``TensorDataset`` through the same kind of ``DataLoader``),
same optimizer, one CPU thread. Four set-ups, run in the same process, interleaved round by round
in a fresh random order so that the noise of a shared machine hits them alike:

* ``wrapper``: the hand-written loop ``zero_grad(); backward(task_losses); step()`` with
  ``PUB(Adam, "pareto")``;
* ``lightning+callback``: ``Trainer(callbacks=[UpdateBalancing("pareto")])`` on a module whose
  ``training_step`` returns ``{"loss", "task_losses"}`` (no logger, no progress bar, no
  checkpointing; the callback logs its statistics every ``log_every_n_steps=50`` steps);
* ``plain``: the hand-written loop on the summed loss with plain Adam;
* ``lightning``: the same module in Lightning without the callback (summed loss, plain Adam).

Time per step: the time between consecutive iterations (data fetch + everything), median over
the measured steps of a round. The ratios use the main thread's CPU time (``time.thread_time``;
everything runs in that one thread), which the other processes of a shared machine disturb far
less than the wall time; the wall-clock medians are reported next to them. Reported per set-up:
median over rounds and interquartile range; and the paired ratios of the same round:
``lightning+callback / wrapper`` (the target, <= 1.05), ``lightning / plain`` (Lightning's own
overhead, for reference), and the callback's own cost
``(lightning+callback - wrapper) - (lightning - plain)`` in microseconds per step.

Usage::

    .venv/bin/python benchmarks/bench_lightning_overhead.py            # writes docs/results/
    .venv/bin/python benchmarks/bench_lightning_overhead.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pub_optim import PUB
from pub_optim.lightning import UpdateBalancing

SIZES = {
    # name: (input features, trunk widths, tower width, tasks, batch)
    "small": (32, (128, 64), 32, 2, 256),
    "medium": (128, (512, 512, 256), 64, 2, 512),
}


class Net(pl.LightningModule):
    def __init__(self, size: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        n_in, widths, tower, tasks, _ = SIZES[size]
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(n_in, w), nn.ReLU()]
            n_in = w
        self.trunk = nn.Sequential(*layers)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, tower), nn.ReLU(), nn.Linear(tower, 1))
            for _ in range(tasks)
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_losses(self, batch: list[Tensor]) -> dict[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        return {
            f"t{k}": nn.functional.binary_cross_entropy_with_logits(t(h).squeeze(-1), y[:, k])
            for k, t in enumerate(self.towers)
        }

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Any:
        losses = self.task_losses(batch)
        return {"loss": sum(losses.values()), "task_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Summed(Net):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Any:
        return sum(self.task_losses(batch).values())


def make_loader(size: str, steps: int) -> DataLoader:
    n_in, _, _, tasks, batch = SIZES[size]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch, n_in, generator=gen)
    y = (torch.randn(steps * batch, tasks, generator=gen) > 0).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


Stamp = tuple[float, float]  # (CPU time of the thread, wall time)


def _stamp() -> Stamp:
    return time.thread_time(), time.perf_counter()


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(_stamp())


def _medians(stamps: list[Stamp], warmup: int) -> tuple[float, float]:
    """Median CPU and wall time per step, dropping the first ``warmup`` steps."""
    cpu = [b[0] - a[0] for a, b in itertools.pairwise(stamps)][warmup:]
    wall = [b[1] - a[1] for a, b in itertools.pairwise(stamps)][warmup:]
    return statistics.median(cpu), statistics.median(wall)


def run_lightning(size: str, steps: int, warmup: int, callback: bool) -> tuple[float, float]:
    model = Net(size) if callback else Summed(size)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if callback:
        callbacks.append(UpdateBalancing(strategy="pareto"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, make_loader(size, steps))
    return _medians(timer.stamps, warmup)


def run_loop(size: str, steps: int, warmup: int, balanced: bool) -> tuple[float, float]:
    model = Net(size)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = PUB(inner, "pareto", shared_params=model.shared_parameters()) if balanced else inner
    stamps: list[Stamp] = []
    for batch in make_loader(size, steps):
        stamps.append(_stamp())
        opt.zero_grad()
        losses = model.task_losses(batch)
        if isinstance(opt, PUB):
            opt.backward(losses)
        else:
            sum(losses.values()).backward()  # type: ignore[union-attr]
        opt.step()
    stamps.append(_stamp())
    return _medians(stamps, warmup)


SETUPS = {
    "wrapper": lambda s, n, w: run_loop(s, n, w, balanced=True),
    "lightning+callback": lambda s, n, w: run_lightning(s, n, w, callback=True),
    "plain": lambda s, n, w: run_loop(s, n, w, balanced=False),
    "lightning": lambda s, n, w: run_lightning(s, n, w, callback=False),
}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    parser.add_argument(
        "--from-json", type=Path, help="re-render the markdown and the plot from a results file"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        meta = saved.pop("meta")
        write_markdown(args.out / "lightning_overhead.md", meta, saved)
        plot(args.out / "lightning_overhead.png", saved)
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 30, 5
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    rng = random.Random(0)
    results: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in SIZES}
    walls: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in SIZES}
    for r in range(args.rounds):
        for size in SIZES:
            order = list(SETUPS)
            rng.shuffle(order)
            for name in order:
                cpu, wall = SETUPS[name](size, args.steps, args.warmup)
                results[size][name].append(cpu)
                walls[size][name].append(wall)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for size, per in results.items():
        ratio = [c / w for c, w in zip(per["lightning+callback"], per["wrapper"], strict=True)]
        own = [lt / p for lt, p in zip(per["lightning"], per["plain"], strict=True)]
        cost = [
            ((c - w) - (lt - p)) * 1e6
            for c, w, lt, p in zip(
                per["lightning+callback"],
                per["wrapper"],
                per["lightning"],
                per["plain"],
                strict=True,
            )
        ]
        summary[size] = {
            "ms": {k: [1e3 * q for q in quartiles(v)] for k, v in per.items()},
            "wall_ms": {k: [1e3 * q for q in quartiles(v)] for k, v in walls[size].items()},
            "ratio_callback_vs_wrapper": quartiles(ratio),
            "ratio_lightning_vs_plain": quartiles(own),
            "callback_own_cost_us": quartiles(cost),
            "raw_cpu_s": dict(per),
            "raw_wall_s": dict(walls[size]),
        }
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared with other "
        f"jobs), torch threads={torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "sizes": {
            k: dict(zip(("in", "trunk", "tower", "tasks", "batch"), v, strict=True))
            for k, v in SIZES.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lightning_overhead.json").write_text(
        json.dumps({"meta": meta, **summary}, indent=1)
    )
    write_markdown(args.out / "lightning_overhead.md", meta, summary)
    plot(args.out / "lightning_overhead.png", summary)
    print((args.out / "lightning_overhead.md").read_text())


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, Any]) -> None:
    lines = [
        "# Lightning callback overhead",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; python {meta['python']}, "
        f"torch {meta['torch']}, pytorch-lightning {meta['pytorch_lightning']}",
        f"- command: `{meta['command']}`",
        f"- {meta['rounds']} rounds x {meta['steps']} steps per set-up (first {meta['warmup']} "
        "steps of each run dropped); set-ups interleaved in a random order every round",
        "- model: MLP trunk (shared) + 2 towers, Adam lr 1e-3, PUB strategy pareto, "
        "sizes: "
        + "; ".join(
            f"{k}: in {v['in']}, trunk {v['trunk']}, batch {v['batch']}"
            for k, v in meta["sizes"].items()
        ),
        "",
        "CPU time of the training thread per step, ms: median [q1, q3] over rounds (each round: "
        "median over its steps); wall-clock medians in the second table.",
        "",
        "| size | wrapper loop | Lightning + callback | plain loop (summed) | Lightning (summed) |",
        "|---|---|---|---|---|",
    ]
    for size, s in summary.items():
        cells = [
            "{1:.3f} [{0:.3f}, {2:.3f}]".format(*s["ms"][k])
            for k in ("wrapper", "lightning+callback", "plain", "lightning")
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per step, ms (median over rounds; disturbed by the other processes of the "
        "machine):",
        "",
        "| size | wrapper loop | Lightning + callback | plain loop (summed) | Lightning (summed) |",
        "|---|---|---|---|---|",
    ]
    for size, s in summary.items():
        cells = [
            "{1:.3f}".format(*s["wall_ms"][k])
            for k in ("wrapper", "lightning+callback", "plain", "lightning")
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired ratios of CPU times (same round), median [q1, q3]:",
        "",
        "| size | Lightning+callback / wrapper (target <= 1.05) | Lightning / plain loop "
        "(Lightning's own) | callback's own cost, us/step |",
        "|---|---|---|---|",
    ]
    for size, s in summary.items():
        a = "{1:.3f} [{0:.3f}, {2:.3f}]".format(*s["ratio_callback_vs_wrapper"])
        b = "{1:.3f} [{0:.3f}, {2:.3f}]".format(*s["ratio_lightning_vs_plain"])
        c = "{1:.0f} [{0:.0f}, {2:.0f}]".format(*s["callback_own_cost_us"])
        lines.append(f"| {size} | {a} | {b} | {c} |")
    lines += ["", "![CPU time per step](lightning_overhead.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = ("plain", "lightning", "wrapper", "lightning+callback")
    labels = (
        "plain loop\n(summed)",
        "Lightning\n(summed)",
        "PUB wrapper\nloop",
        "Lightning +\nUpdateBalancing",
    )
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.8))
    for ax, (size, s) in zip(axes, summary.items(), strict=True):
        med = [s["ms"][k][1] for k in setups]
        err = [
            [s["ms"][k][1] - s["ms"][k][0] for k in setups],
            [s["ms"][k][2] - s["ms"][k][1] for k in setups],
        ]
        ax.bar(labels, med, yerr=err, capsize=4, color=["0.7", "0.5", "tab:blue", "tab:orange"])
        ratio = s["ratio_callback_vs_wrapper"][1]
        ax.set_title(f"{size}: Lightning+callback / wrapper = {ratio:.3f}")
        ax.set_ylabel("CPU ms per step (median, IQR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
