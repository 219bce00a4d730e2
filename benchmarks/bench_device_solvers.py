"""What the synchronisation-free path (``PUB(sync_free=True)``) costs, next to the default.

Two tables:

* **Solvers**, per strategy and K: time per call of the host solver (``balancer(gram)``, which
  reads the Gram matrix on the host) and of the device solver (``balancer.device_weights(gram)``,
  torch backend) on CPU tensors here, and the number of tensor operators each device solve
  dispatches: on a GPU every one is at least one kernel launch of a few microseconds, so this
  count, not the CPU time, is what the device path costs there. For pareto the count with the
  Triton kernel is the count of the operators outside the Newton iterations plus the one launch.
* **PUB step**, per K: operators dispatched by one ``backward`` + ``step`` of the step-time
  benchmark's model shape (two-layer shared trunk, one head per task; a small width here, the
  count does not depend on it), with the default step and with ``sync_free=True``; and the time
  of that step on this CPU for both (the sync-free step does more arithmetic: the device solver,
  the norm-ratio rescaling of the per-task gradients, the save/select that makes a skip possible).

Operators are counted with a ``TorchDispatchMode``; views and allocations (no kernel) are not
counted. Times: median and interquartile range over repeated calls, interleaved.

Run: ``.venv/bin/python benchmarks/bench_device_solvers.py`` (``--quick`` for a smoke run).
Writes ``docs/results/device_solvers.md`` and ``docs/results/device_solvers.png``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import header_lines  # noqa: E402
from pub_optim import PUB  # noqa: E402
from pub_optim.solvers import device  # noqa: E402
from pub_optim.strategies import EqualMagnitude, MinNorm, Pareto, UpdateBalancer  # noqa: E402

_NOT_KERNELS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.lift_fresh.default,
}


class OperatorCounter(TorchDispatchMode):
    """Counts dispatched operators that launch work (not views, not bare allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.paused and not func.is_view and func not in _NOT_KERNELS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting() -> Iterator[OperatorCounter]:
    with OperatorCounter() as counter:
        yield counter


def count_operators(fn: Callable[[], Any]) -> int:
    with counting() as counter:
        fn()
    return counter.count


def count_outside_newton(fn: Callable[[], Any]) -> int:
    """Operators of ``fn`` outside ``_nash_attempts_torch`` (what remains of a pareto device
    solve, around the one kernel launch, when the Triton kernel runs the iterations)."""
    original = device._nash_attempts_torch
    holder: dict[str, OperatorCounter] = {}

    def paused(*args: Any) -> Any:
        holder["c"].paused += 1
        try:
            return original(*args)
        finally:
            holder["c"].paused -= 1

    device._nash_attempts_torch = paused  # type: ignore[assignment]
    try:
        with counting() as counter:
            holder["c"] = counter
            fn()
    finally:
        device._nash_attempts_torch = original  # type: ignore[assignment]
    return counter.count


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def time_calls(fns: dict[str, Callable[[], Any]], repeats: int, batch: int) -> dict[str, list]:
    """Seconds per call, ``repeats`` samples of ``batch`` calls each, the functions interleaved."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            times[name].append((time.perf_counter() - start) / batch)
    return times


def gram_matrix(k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    factor = rng.standard_normal((k, 64)) + 0.5 * rng.standard_normal(64)
    return torch.from_numpy(factor @ factor.T)


def solver_rows(ks: list[int], repeats: int, batch: int) -> list[dict[str, Any]]:
    strategies: dict[str, UpdateBalancer] = {
        "pareto": Pareto(),
        "min-norm": MinNorm(),
        "equal-magnitude": EqualMagnitude(),
    }
    rows = []
    for k in ks:
        gram = gram_matrix(k, seed=k)
        for name, balancer in strategies.items():
            if name == "min-norm" and k > device.MIN_NORM_MAX_TASKS:
                continue
            times = time_calls(
                {
                    "host": lambda b=balancer, g=gram: b(g),
                    "device": lambda b=balancer, g=gram: b.device_weights(g),
                },
                repeats,
                batch,
            )
            ops = count_operators(lambda b=balancer, g=gram: b.device_weights(g))
            triton_ops = None
            if name == "pareto":
                solve = lambda b=balancer, g=gram: b.device_weights(g)  # noqa: E731
                triton_ops = count_outside_newton(solve) + 1
            rows.append(
                {
                    "strategy": name,
                    "k": k,
                    "host": quartiles(times["host"]),
                    "device": quartiles(times["device"]),
                    "ops": ops,
                    "triton_ops": triton_ops,
                }
            )
    return rows


class Model(torch.nn.Module):
    def __init__(self, k: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
        )
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(k))

    def losses(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.relu(self.trunk(x))
        return [head(z).pow(2).mean() for head in self.heads]


def step_rows(ks: list[int], width: int, repeats: int, batch: int) -> list[dict[str, Any]]:
    rows = []
    x = torch.randn(512, width, generator=torch.Generator().manual_seed(0))
    for k in ks:
        runs: dict[str, Callable[[], Any]] = {}
        ops: dict[str, int] = {}
        for mode in ("default", "sync_free"):
            model = Model(k, width)
            pub = PUB(
                torch.optim.Adam(model.parameters(), lr=1e-4),
                "pareto",
                sync_free=mode == "sync_free",
                fused=False,
            )

            def one_step(pub: PUB = pub, model: Model = model) -> None:
                pub.zero_grad()
                pub.backward(model.losses(x))
                pub.step()

            one_step()
            ops[mode] = count_operators(one_step)
            if mode == "sync_free":
                ops["sync_free_triton"] = count_outside_newton(one_step) + 1
            runs[mode] = one_step
        times = time_calls(runs, repeats, batch)
        rows.append(
            {
                "k": k,
                "ops": ops,
                "default": quartiles(times["default"]),
                "sync_free": quartiles(times["sync_free"]),
            }
        )
    return rows


def fmt(q: tuple[float, float, float]) -> str:
    lo, med, hi = q
    return f"{med * 1e6:,.0f} ({lo * 1e6:,.0f}-{hi * 1e6:,.0f})"


def solver_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | K | host solver, us | device solver (torch), us | operators (torch) "
        "| operators (Triton kernel) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        triton_ops = "-" if r["triton_ops"] is None else str(r["triton_ops"])
        lines.append(
            f"| {r['strategy']} | {r['k']} | {fmt(r['host'])} | {fmt(r['device'])} "
            f"| {r['ops']:,} | {triton_ops} |"
        )
    return "\n".join(lines)


def step_table(rows: list[dict[str, Any]], width: int) -> str:
    lines = [
        f"| K | operators, default | operators, sync_free (torch / Triton solver) "
        f"| step on CPU (width {width}), default, us | sync_free, us | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["sync_free"][1] / r["default"][1]
        lines.append(
            f"| {r['k']} | {r['ops']['default']:,} "
            f"| {r['ops']['sync_free']:,} / {r['ops']['sync_free_triton']:,} "
            f"| {fmt(r['default'])} | {fmt(r['sync_free'])} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in ("pareto", "min-norm", "equal-magnitude"):
        sub = [r for r in rows if r["strategy"] == name]
        ax.plot([r["k"] for r in sub], [r["ops"] for r in sub], marker="o", label=f"{name}")
    sub = [r for r in rows if r["triton_ops"] is not None]
    ax.plot(
        [r["k"] for r in sub],
        [r["triton_ops"] for r in sub],
        marker="s",
        linestyle="--",
        label="pareto, Triton kernel",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ks = sorted({r["k"] for r in rows})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("number of tasks K")
    ax.set_ylabel("operators per device solve (~ GPU launches)")
    ax.set_title("Synchronisation-free solvers: operators per solve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> list[str]:
    return [
        *header_lines("; no GPU (the GPU columns are operator counts, not timings)"),
        f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    parser.add_argument("--step-ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--width", type=int, default=256, help="trunk width of the step model")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=20, help="calls per timing sample")
    parser.add_argument("--quick", action="store_true", help="smoke run, writes nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.step_ks, args.repeats, args.batch, args.width = [2, 4], [2], 2, 2, 32
    torch.set_num_threads(1)
    solvers = solver_rows(args.ks, args.repeats, args.batch)
    steps = step_rows(args.step_ks, args.width, args.repeats, max(1, args.batch // 4))
    text_solvers = solver_table(solvers)
    text_steps = step_table(steps, args.width)
    print(text_solvers, "", text_steps, sep="\n")
    if args.quick:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    plot(solvers, args.out / "device_solvers.png")
    command = ".venv/bin/python benchmarks/bench_device_solvers.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    doc = [
        "# The synchronisation-free path: solvers and step, side by side with the default",
        "",
        "Generated by `benchmarks/bench_device_solvers.py` (see its docstring for the method).",
        "",
        f"Command: `{command.strip()}`",
        "",
        *environment(),
        "- one CPU thread; times per call: median (interquartile range) over "
        f"{args.repeats} samples of {args.batch} calls (steps: {max(1, args.batch // 4)})",
        "",
        "## Solvers",
        "",
        text_solvers,
        "",
        "Host solver: what `PUB` calls by default (the Gram matrix is read on the host). Device "
        "solver: `UpdateBalancer.device_weights` with the torch backend, here on CPU tensors; on "
        "a GPU its cost is its operators (each at least one kernel launch; "
        "`torch.linalg.solve_ex` may launch several). Operators (Triton kernel): pareto with "
        "`pub_optim.kernels.nash_triton`, which CUDA tensors use when triton is installed: the "
        "operators outside the Newton iterations plus one launch.",
        "",
        "## One PUB step (backward + step), pareto, Adam",
        "",
        text_steps,
        "",
        "Triton solver: the operators of the sync-free step outside the Newton iterations plus "
        "the kernel's one launch (what runs on CUDA with triton installed). "
        "The default step also reads the Gram matrix, the gradient norms and (with "
        "`check_finite`) the losses on the host; the sync-free one reads nothing "
        "(`tests/core/test_wrapper_sync_free.py`). On CPU tensors the sync-free step is slower: "
        "it is meant for CUDA, where it lets the host queue the next batch without waiting. Its "
        "GPU time has not been measured (no GPU was available to this project's sessions).",
        "",
        "![operators per solve](device_solvers.png)",
        "",
    ]
    (args.out / "device_solvers.md").write_text("\n".join(doc))
    print(f"wrote {args.out / 'device_solvers.md'} and {args.out / 'device_solvers.png'}")


if __name__ == "__main__":
    main()
