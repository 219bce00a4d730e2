"""Cost study of issue 6: time per training step and peak memory of every method, as ratios to
equal weighting measured side by side in one process.

Model: the reference MMoE of the integration (``build_model("mmoe", ...)`` with its defaults, the
model of the quality study) on UCI Adult at batch 2048 (K = 2 tasks), and a K = 8 variant: the
same inputs and architecture with 8 tasks (8 gates and towers), whose labels are the 2 Adult tasks
plus 6 synthetic ones (thresholded random projections of the numeric features plus noise; they
exist only to give the model 8 losses, their AUC is not studied).

One training step = ``zero_grad``, forward, the K losses, the method's backward pass(es) and the
optimizer step (Adam, lr 1e-3, weight decay 1e-6), plus whatever the method adds (FAMO: one
extra forward pass without gradients on the same batch and its logit update). Plain PyTorch
loops, no Lightning (its per-step overhead is the same for every method and is measured in
``docs/results/lightning_overhead.md``). Methods:

* ``equal``: ``sum(losses).backward()``; ``uw``: uncertainty weighting; ``famo``: FAMO;
* ``mgda``, ``imtl-g``, ``nash-mtl``, ``pcgrad``, ``cagrad``: ``PUB(Adam, strategy,
  space="gradient")`` (what the ``UpdateBalancing`` callback runs);
* ``pub-min-norm``, ``pub-equal-magnitude``, ``pub-pareto``: ``PUB(Adam, strategy)``;
* ``torchjd-upgrad``: TorchJD's UPGrad on the same model: the task-specific parameters get their
  gradients from one backward pass of the summed loss (each is reached by one task only), the
  shared parameters' Jacobian comes from ``torchjd.autojac.backward(losses, inputs=shared)`` and
  ``jac_to_grad(shared, UPGrad())`` aggregates it; then the same Adam step.

Timing: every method trains its own copy of the same initial model on the same fixed batches.
After a warm-up, each round runs every method for a few steps in a fresh random order (so the
noise of a shared machine hits all alike); per method the median over rounds of the time per step
and its interquartile range, and the median (and IQR) over rounds of the ratio to equal weighting
in the same round. Peak memory: the largest number of live CPU allocator bytes (torch.profiler
memory events) from building the method's model copy and optimizer through two steps, so that
parameters, optimizer state and every per-task buffer a method keeps are counted.

    .venv/bin/python -m benchmarks.study.cost                 # writes docs/results/cost.md + PNG
    .venv/bin/python -m benchmarks.study.cost --quick --out /tmp/cost.md   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.memory import peak_bytes  # noqa: E402
from integrations.moe_ranking.data import MultiTaskData, Split, load_data  # noqa: E402
from integrations.moe_ranking.losses import task_bce  # noqa: E402
from integrations.moe_ranking.models import MultiTaskModel, build_model  # noqa: E402
from pub_optim import PUB  # noqa: E402
from pub_optim.loss_weighting import FAMO, UncertaintyWeighting  # noqa: E402
from pub_optim.strategies import CAGrad, PCGrad  # noqa: E402

StepFn = Callable[[], None]
COST_METHODS = (
    "equal", "uw", "famo", "mgda", "imtl-g", "nash-mtl", "pcgrad", "cagrad",
    "pub-min-norm", "pub-equal-magnitude", "pub-pareto", "torchjd-upgrad",
)  # fmt: skip
STRATEGY = {
    "mgda": ("min-norm", "gradient"),
    "imtl-g": ("equal-magnitude", "gradient"),
    "nash-mtl": ("pareto", "gradient"),
    "pcgrad": ("pcgrad", "gradient"),
    "cagrad": ("cagrad", "gradient"),
    "pub-min-norm": ("min-norm", "update"),
    "pub-equal-magnitude": ("equal-magnitude", "update"),
    "pub-pareto": ("pareto", "update"),
}


@dataclass(frozen=True)
class CostConfig:
    batch: int = 2048
    ks: tuple[int, ...] = (2, 8)
    rounds: int = 30
    steps: int = 3
    warmup: int = 3
    batches: int = 4
    threads: int = 1
    seed: int = 0
    max_rows: int | None = None


FULL = CostConfig()
QUICK = CostConfig(batch=256, ks=(2, 3), rounds=3, steps=1, warmup=1, batches=2, max_rows=2000)


# ---------------------------------------------------------------------------------- problems
def with_tasks(data: MultiTaskData, k: int, seed: int = 0) -> MultiTaskData:
    """``data`` with K tasks: its own tasks first, then synthetic ones (see the docstring)."""
    base = len(data.task_names)
    if k <= base:
        names = data.task_names[:k]
        return dataclasses.replace(
            data,
            task_names=names,
            train=dataclasses.replace(
                data.train,
                labels=data.train.labels[:, :k],
                mask=None if data.train.mask is None else data.train.mask[:, :k],
            ),
            funnel=None,
        )
    rng = np.random.default_rng(seed)
    num = data.train.num.numpy()
    proj = rng.standard_normal((num.shape[1], k - base))
    scores = num @ proj + 0.5 * rng.standard_normal((num.shape[0], k - base))
    extra = torch.from_numpy((scores > np.median(scores, axis=0)).astype(np.float32))
    labels = torch.cat([data.train.labels, extra], dim=1)
    names = (*data.task_names, *(f"synthetic{i}" for i in range(k - base)))
    mask = data.train.mask  # the added tasks cover every row
    if mask is not None:
        mask = torch.cat([mask, torch.ones(len(mask), k - base, dtype=torch.bool)], dim=1)
    train = dataclasses.replace(data.train, labels=labels, mask=mask)
    return dataclasses.replace(data, task_names=names, train=train, funnel=None)


@dataclass
class Problem:
    k: int
    model: MultiTaskModel
    batches: list[dict[str, Tensor]]


def make_problem(data: MultiTaskData, k: int, cfg: CostConfig) -> Problem:
    kdata = with_tasks(data, k, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model("mmoe", kdata)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(kdata.train)
    batches = []
    for _ in range(cfg.batches):
        index = torch.randint(0, n, (cfg.batch,), generator=gen)
        batches.append(kdata.train.batch(index))
    return Problem(k, model, batches)


def task_losses(model: MultiTaskModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    losses = task_bce(model(batch), batch["labels"], model.task_names, batch.get("task_mask"))
    for t, aux in model.aux_losses().items():
        losses[t] = losses[t] + aux
    return losses


# ----------------------------------------------------------------------------------- methods
def build(method: str, problem: Problem) -> tuple[StepFn, MultiTaskModel]:
    """A fresh copy of the problem's model and a closure running one training step on it."""
    model = copy.deepcopy(problem.model)
    model.train()
    cursor = iter(range(1 << 62))

    def next_batch() -> dict[str, Tensor]:
        return problem.batches[next(cursor) % len(problem.batches)]

    def adam(params: Any) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6)

    k = problem.k
    if method == "equal":
        opt = adam(model.parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.stack(list(task_losses(model, next_batch()).values())).sum().backward()
            opt.step()

    elif method == "uw":
        uw = UncertaintyWeighting(k)
        opt = adam([*model.parameters(), *uw.parameters()])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            uw.combine(task_losses(model, next_batch())).backward()
            opt.step()

    elif method == "famo":
        famo = FAMO(k)
        opt = adam(model.parameters())

        def step() -> None:
            batch = next_batch()
            opt.zero_grad(set_to_none=True)
            famo.combine(task_losses(model, batch)).backward()
            opt.step()
            with torch.no_grad():
                famo.update(torch.stack(list(task_losses(model, batch).values())))

    elif method in STRATEGY:
        name, space = STRATEGY[method]
        strategy: Any = name
        if name == "pcgrad":
            strategy = PCGrad(seed=0)
        elif name == "cagrad":
            strategy = CAGrad(c=0.5)
        pub = PUB(
            adam(model.parameters()),
            strategy,
            space=space,  # type: ignore[arg-type]
            shared_params=model.shared_parameters(),
        )

        def step() -> None:
            pub.zero_grad(set_to_none=True)
            pub.backward(task_losses(model, next_batch()))
            pub.step()

    elif method == "torchjd-upgrad":
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import backward as jac_backward
        from torchjd.autojac import jac_to_grad

        aggregator = UPGrad()
        shared = list(model.shared_parameters())
        shared_ids = {id(p) for p in shared}
        own = [p for p in model.parameters() if id(p) not in shared_ids]
        opt = adam(model.parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            losses = list(task_losses(model, next_batch()).values())
            # Task-specific parameters: each is reached by one loss, so the summed loss gives
            # every one of them its own task's gradient.
            torch.autograd.backward(torch.stack(losses).sum(), inputs=own, retain_graph=True)
            jac_backward(losses, inputs=shared)
            jac_to_grad(shared, aggregator)
            opt.step()

    else:
        raise ValueError(f"unknown method {method!r}")
    return step, model


# ---------------------------------------------------------------------------------- measuring
def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


@dataclass
class KResult:
    k: int
    shared_numel: int
    total_numel: int
    times: dict[str, list[float]]  # per round, seconds per step
    ratios: dict[str, list[float]]  # per round, time / equal's time in that round
    memory: dict[str, int]

    def row(self, method: str) -> dict[str, float]:
        t, r = self.times[method], self.ratios[method]
        return {
            "ms_median": 1e3 * statistics.median(t),
            "ms_q25": 1e3 * _quantile(t, 0.25),
            "ms_q75": 1e3 * _quantile(t, 0.75),
            "ratio_median": statistics.median(r),
            "ratio_q25": _quantile(r, 0.25),
            "ratio_q75": _quantile(r, 0.75),
            "peak_mib": self.memory[method] / 2**20,
            "memory_ratio": self.memory[method] / self.memory["equal"],
        }


def measure(problem: Problem, methods: list[str], cfg: CostConfig, log: Any = print) -> KResult:
    steps: dict[str, StepFn] = {}
    for m in methods:
        fn, _ = build(m, problem)
        for _ in range(cfg.warmup):
            fn()
        steps[m] = fn
    rng = random.Random(cfg.seed)
    times: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(cfg.rounds):
        order = list(methods)
        rng.shuffle(order)
        this_round: dict[str, float] = {}
        for m in order:
            start = time.perf_counter()
            for _ in range(cfg.steps):
                steps[m]()
            this_round[m] = (time.perf_counter() - start) / cfg.steps
        for m in methods:
            times[m].append(this_round[m])
            ratios[m].append(this_round[m] / this_round["equal"])
        log(f"  K={problem.k} round {r + 1}/{cfg.rounds}: equal "
            f"{1e3 * this_round['equal']:.1f} ms")  # fmt: skip
    memory: dict[str, int] = {}
    for m in methods:

        def run(m: str = m) -> None:
            fn, _ = build(m, problem)
            fn()
            fn()

        memory[m] = peak_bytes(run)
    shared = sum(p.numel() for p in problem.model.shared_parameters())
    total = sum(p.numel() for p in problem.model.parameters())
    return KResult(problem.k, shared, total, times, ratios, memory)


# ------------------------------------------------------------------------------------ report
def plot(results: list[KResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    width = 0.8 / len(results)
    methods = list(results[0].times)
    for i, res in enumerate(results):
        rows = [res.row(m) for m in methods]
        x = np.arange(len(methods)) + (i - (len(results) - 1) / 2) * width
        med = np.array([r["ratio_median"] for r in rows])
        err = np.array(
            [[r["ratio_median"] - r["ratio_q25"] for r in rows],
             [r["ratio_q75"] - r["ratio_median"] for r in rows]]
        )  # fmt: skip
        axes[0].bar(x, med, width, yerr=err, capsize=2, label=f"K = {res.k}")
        axes[1].bar(x, [r["memory_ratio"] for r in rows], width, label=f"K = {res.k}")
    for ax, what in zip(axes, ("time per step / equal (median, IQR)", "peak memory / equal"),
                        strict=True):  # fmt: skip
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("Cost of each method on the reference MMoE (Adult inputs), ratio to equal")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: list[KResult], cfg: CostConfig, out: Path, command: str, wall: float
) -> str:
    from importlib.metadata import version

    lines = [
        "# Cost study: time per step and peak memory, ratio to equal weighting",
        "",
        f"Command: `{command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time "
        f"{wall / 60:.1f} min. Machine: {platform.platform()}, {os.cpu_count()} CPUs shared with "
        f"other work, torch threads {cfg.threads}; torch {torch.__version__}, torchjd "
        f"{version('torchjd')}.",
        "",
        f"Reference MMoE (integration defaults: 4 experts (64, 32), towers (16,), embedding dim 8) "
        f"on Adult inputs, batch {cfg.batch}; {cfg.rounds} interleaved rounds of {cfg.steps} "
        f"step(s) per method after {cfg.warmup} warm-up steps. See the docstring of "
        "`benchmarks/study/cost.py` for what a step includes and how memory is measured.",
        "",
    ]
    for res in results:
        lines += [
            f"## K = {res.k} ({res.shared_numel:,} shared of {res.total_numel:,} parameters)",
            "",
            "| method | ms / step (median) | IQR | x equal (median) | IQR of x equal | "
            "peak MiB | memory x equal |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in res.times:
            r = res.row(m)
            lines.append(
                f"| {m} | {r['ms_median']:.1f} | {r['ms_q25']:.1f}-{r['ms_q75']:.1f} | "
                f"{r['ratio_median']:.2f} | {r['ratio_q25']:.2f}-{r['ratio_q75']:.2f} | "
                f"{r['peak_mib']:.1f} | {r['memory_ratio']:.2f} |"
            )
        lines.append("")
    lines += ["## Summary", ""]
    for res in results:
        rows = {m: res.row(m) for m in res.times}

        def ratio(m: str, rows: dict[str, dict[str, float]] = rows) -> str:
            return f"{rows[m]['ratio_median']:.2f}x" if m in rows else "n/a"

        grad = [m for m in ("mgda", "imtl-g", "nash-mtl", "pcgrad", "cagrad") if m in rows]
        pub = [m for m in ("pub-min-norm", "pub-equal-magnitude", "pub-pareto") if m in rows]

        def span(ms: Sequence[str], rows: dict[str, dict[str, float]] = rows) -> str:
            if not ms:
                return "n/a"
            values = [rows[m]["ratio_median"] for m in ms]
            return f"{min(values):.2f}-{max(values):.2f}x"

        lines.append(
            f"- K = {res.k}: PUB (three strategies) {span(pub)} the time of equal weighting; the "
            f"gradient-space methods {span(grad)}; loss weighting UW {ratio('uw')}, FAMO "
            f"{ratio('famo')}; TorchJD UPGrad {ratio('torchjd-upgrad')} (memory "
            + (
                f"{rows['torchjd-upgrad']['memory_ratio']:.2f}x"
                if "torchjd-upgrad" in rows
                else "n/a"
            )
            + ", PUB "
            + (f"{rows['pub-pareto']['memory_ratio']:.2f}x" if "pub-pareto" in rows else "n/a")
            + ")."
        )
    lines += [
        "",
        "Per-task gradients dominate: PUB and the gradient-space methods all run K backward "
        "passes through the shared part, so they cost about the same; what PUB adds on top (K "
        "look-ahead transforms, the Gram matrix of the updates) is small next to them on this "
        "model. The strategy's solve is negligible at K <= 8.",
        "",
        f"![cost ratios]({out.stem}.png)",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plot(results, out.with_suffix(".png"))
    payload = {
        "config": dataclasses.asdict(cfg),
        "results": [
            {"k": r.k, "rows": {m: r.row(m) for m in r.times}, "times": r.times, "memory": r.memory}
            for r in results
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--methods", nargs="+", choices=COST_METHODS, default=list(COST_METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "cost.md")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.rounds is not None:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    methods = list(dict.fromkeys(["equal", *args.methods]))
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    data = load_data("adult")
    if cfg.max_rows is not None:
        data = dataclasses.replace(
            data,
            train=Split(
                data.train.cat[: cfg.max_rows],
                data.train.num[: cfg.max_rows],
                data.train.labels[: cfg.max_rows],
            ),
        )
    results = []
    for k in cfg.ks:
        print(f"K = {k}: {len(methods)} methods, batch {cfg.batch}", flush=True)
        results.append(measure(make_problem(data, k, cfg), methods, cfg))
    command = " ".join(["python -m benchmarks.study.cost", *(argv or sys.argv[1:])])
    text = write_report(results, cfg, args.out, command, time.perf_counter() - start)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
