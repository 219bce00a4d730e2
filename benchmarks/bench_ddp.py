"""PUB under DDP on CPU, 2 processes (gloo): time per step and communication, against K (issue 3).

Two processes on one machine, one thread each, ``DistributedDataParallel`` around an MLP trunk
(shared) with K towers, Adam lr 1e-3, a batch of ``--batch`` per rank. For each K in (2, 4, 8)
and each round, in a fresh random order (the same on both ranks):

* ``ddp``: plain DDP training of the summed loss: ``sum(losses).backward()`` (DDP's reducer
  all-reduces the gradient in buckets, overlapped with the backward pass), ``Adam.step()``;
* ``pub-ddp``: ``PUB(Adam, "pareto", gradient_sync=GradientAllReduce(ddp))``: K per-task backward
  passes, then one all-reduce of the K per-task gradients of the trunk and the towers' gradients;
* ``pub-local``: the same PUB step without the all-reduce (each rank on its own: the compute part
  of ``pub-ddp``, for reference; the ranks' parameters diverge, which does not matter for timing).

Reported: the median wall time per step over rounds (each round: median over its steps) with the
interquartile range; for ``pub-ddp`` the time spent in :class:`GradientAllReduce` (packing, the
collective, unpacking; measured around it) and its share of the step; the bytes each rank sends
into the all-reduce per step; and, for reference, the time of one standalone all-reduce of the
plain-DDP gradient size and of the PUB payload size (median of 20).

Usage::

    .venv/bin/python benchmarks/bench_ddp.py        # writes docs/results/ddp.{md,json,png}
    .venv/bin/python benchmarks/bench_ddp.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pub_optim import PUB
from pub_optim.distributed import GradientAllReduce

WORLD = 2
TASKS = (2, 4, 8)
MODES = ("ddp", "pub-ddp", "pub-local")
IN, TRUNK, TOWER = 128, (512, 512, 256), 64


class Net(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        n = IN
        for w in TRUNK:
            layers += [nn.Linear(n, w), nn.ReLU()]
            n = w
        self.trunk = nn.Sequential(*layers)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(n, TOWER), nn.ReLU(), nn.Linear(TOWER, 1)) for _ in range(tasks)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [t(h).squeeze(-1) for t in self.towers]


def losses_of(out: list[Tensor], y: Tensor) -> dict[str, Tensor]:
    return {
        f"t{k}": nn.functional.binary_cross_entropy_with_logits(o, y[:, k])
        for k, o in enumerate(out)
    }


def run_mode(mode: str, tasks: int, steps: int, warmup: int, batch: int, rank: int) -> dict:
    model = Net(tasks)
    ddp = DistributedDataParallel(model)
    inner = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    sync = GradientAllReduce(ddp) if mode == "pub-ddp" else None
    opt: torch.optim.Optimizer = inner
    if mode != "ddp":
        opt = PUB(inner, "pareto", shared_params=list(model.trunk.parameters()), gradient_sync=sync)
    gen = torch.Generator().manual_seed(100 + rank)
    data = [
        (
            torch.randn(batch, IN, generator=gen),
            (torch.randn(batch, tasks, generator=gen) > 0).float(),
        )
        for _ in range(8)
    ]
    times: list[float] = []
    comm_before = coll_before = 0.0
    dist.barrier()
    for i in range(warmup + steps):
        if i == warmup and sync is not None:
            comm_before = sync.stats.seconds
            coll_before = sync.stats.collective_seconds
        x, y = data[i % len(data)]
        start = time.perf_counter()
        opt.zero_grad()
        losses = losses_of(ddp(x), y)
        if isinstance(opt, PUB):
            opt.backward(losses)
        else:
            sum(losses.values()).backward()  # type: ignore[union-attr]
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times),
    }
    if sync is not None:
        out["comm_s"] = (sync.stats.seconds - comm_before) / steps
        out["collective_s"] = (sync.stats.collective_seconds - coll_before) / steps
        out["bytes"] = sync.stats.last_bytes
        out["collectives_per_step"] = sync.stats.collectives / sync.stats.calls
    return out


def allreduce_time(numel: int, repeats: int = 20) -> float:
    buf = torch.zeros(numel)
    dist.barrier()
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def worker(rank: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rng = random.Random(0)  # same order on both ranks
    results: dict[str, dict[str, list[dict]]] = {str(k): {m: [] for m in MODES} for k in TASKS}
    for r in range(args.rounds):
        for k in TASKS:
            order = list(MODES)
            rng.shuffle(order)
            for mode in order:
                res = run_mode(mode, k, args.steps, args.warmup, args.batch, rank)
                results[str(k)][mode].append(res)
        if rank == 0:
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    model = Net(1)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    tower = sum(p.numel() for p in model.towers[0].parameters())
    reference = {}
    for k in TASKS:
        ddp_numel = trunk + k * tower
        pub_numel = k * trunk + k * tower
        reference[str(k)] = {
            "ddp_grad_bytes": 4 * ddp_numel,
            "allreduce_ddp_size_s": allreduce_time(ddp_numel),
            "allreduce_pub_size_s": allreduce_time(pub_numel),
        }
    if rank == 0:
        Path(out_file).write_text(
            json.dumps(
                {
                    "results": results,
                    "reference": reference,
                    "trunk_params": trunk,
                    "tower_params": tower,
                }
            )
        )
    dist.destroy_process_group()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "results")
    parser.add_argument(
        "--from-json", type=Path, help="re-render the markdown and the plot from a results file"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        write_markdown(args.out / "ddp.md", saved["meta"], saved["summary"])
        plot(args.out / "ddp.png", saved["summary"])
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 5, 2
    fd, init_file = tempfile.mkstemp(prefix="bench_ddp_")
    os.close(fd)
    os.unlink(init_file)
    raw_file = tempfile.mktemp(suffix=".json")
    mp.start_processes(worker, args=(init_file, args, raw_file), nprocs=WORLD, start_method="spawn")
    raw = json.loads(Path(raw_file).read_text())
    os.unlink(raw_file)
    summary: dict[str, Any] = {}
    for k in map(str, TASKS):
        per = raw["results"][k]
        row: dict[str, Any] = {
            m: [1e3 * q for q in quartiles([r["step_s"] for r in per[m]])] for m in MODES
        }
        comm = [r["comm_s"] for r in per["pub-ddp"]]
        share = [r["comm_s"] / r["mean_step_s"] for r in per["pub-ddp"]]
        ratio = [a["step_s"] / b["step_s"] for a, b in zip(per["pub-ddp"], per["ddp"], strict=True)]
        row["comm_ms"] = [1e3 * q for q in quartiles(comm)]
        row["collective_ms"] = [
            1e3 * q for q in quartiles([r["collective_s"] for r in per["pub-ddp"]])
        ]
        row["comm_share"] = quartiles(share)
        row["ratio_pub_vs_ddp"] = quartiles(ratio)
        row["pub_bytes"] = per["pub-ddp"][0]["bytes"]
        row["collectives_per_step"] = per["pub-ddp"][0]["collectives_per_step"]
        row.update(raw["reference"][k])
        summary[k] = row
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_per_rank": args.batch,
        "trunk_params": raw["trunk_params"],
        "tower_params": raw["tower_params"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "raw": raw}, indent=1)
    )
    write_markdown(args.out / "ddp.md", meta, summary)
    plot(args.out / "ddp.png", summary)
    print((args.out / "ddp.md").read_text())


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, Any]) -> None:
    s, t = meta["trunk_params"], meta["tower_params"]
    lines = [
        "# PUB under DDP: 2 CPU processes, gloo",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; python {meta['python']}, "
        f"torch {meta['torch']}; one thread per process",
        f"- command: `{meta['command']}`",
        f"- {meta['rounds']} rounds x {meta['steps']} measured steps per mode and K (after "
        f"{meta['warmup']} warm-up steps), modes in a random order every round",
        f"- model: MLP trunk {IN}->{'->'.join(map(str, TRUNK))} (shared, S = {s} parameters) + K "
        f"towers ({t} parameters each, T = K x {t}); Adam; batch {meta['batch_per_rank']} per rank",
        "",
        "Wall time per step, ms: median [q1, q3] over rounds.",
        "",
        "| K | plain DDP (summed loss) | PUB + DDP | PUB, no all-reduce | PUB+DDP / DDP "
        "| PUB sync hook, ms/step (of which inside all_reduce) | its share of the step |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in summary.items():
        cell = "{1:.1f} [{0:.1f}, {2:.1f}]"
        lines.append(
            f"| {k} | {cell.format(*r['ddp'])} | {cell.format(*r['pub-ddp'])} | "
            f"{cell.format(*r['pub-local'])} | "
            "{1:.2f} [{0:.2f}, {2:.2f}]".format(*r["ratio_pub_vs_ddp"])
            + " | {1:.1f} [{0:.1f}, {2:.1f}]".format(*r["comm_ms"])
            + " ({:.1f})".format(r["collective_ms"][1])
            + " | {1:.0%} [{0:.0%}, {2:.0%}] |".format(*r["comm_share"])
        )
    lines += [
        "",
        "The sync hook's time is measured around it on rank 0: packing the buffers, the "
        "all_reduce (which also waits for the slower rank to finish its backward: on a shared "
        "machine the two processes drift apart), unpacking and rebuilding the shared `.grad`. "
        "The standalone all-reduce times below (after a barrier, median of 20) are the pure "
        "cost of moving the same payload.",
        "",
        "Communication per step and rank (bytes sent into all-reduce; a ring all-reduce moves "
        "about twice that over the wire):",
        "",
        "| K | plain DDP: (S + T) x 4 | PUB: (K S + T + flags) x 4 | ratio | collectives per step "
        "| one all-reduce of the DDP size, ms | of the PUB size, ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in summary.items():
        lines.append(
            f"| {k} | {r['ddp_grad_bytes']:,} | {r['pub_bytes']:,} | "
            f"{r['pub_bytes'] / r['ddp_grad_bytes']:.2f} | {r['collectives_per_step']:.0f} | "
            f"{1e3 * r['allreduce_ddp_size_s']:.2f} | {1e3 * r['allreduce_pub_size_s']:.2f} |"
        )
    lines += ["", "![time per step and communication share](ddp.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in summary]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, label in (
        ("ddp", "plain DDP (summed loss)"),
        ("pub-ddp", "PUB + DDP"),
        ("pub-local", "PUB, no all-reduce"),
    ):
        med = [summary[str(k)][mode][1] for k in ks]
        lo = [summary[str(k)][mode][1] - summary[str(k)][mode][0] for k in ks]
        hi = [summary[str(k)][mode][2] - summary[str(k)][mode][1] for k in ks]
        ax1.errorbar(ks, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax1.set_xlabel("tasks K")
    ax1.set_ylabel("ms per step (median, IQR)")
    ax1.set_xticks(ks)
    ax1.legend()
    ax1.set_title("2 CPU processes, gloo")
    share = [100 * summary[str(k)]["comm_share"][1] for k in ks]
    mb = [summary[str(k)]["pub_bytes"] / 2**20 for k in ks]
    ax2.bar([str(k) for k in ks], share, color="tab:orange")
    for i, (sv, m) in enumerate(zip(share, mb, strict=True)):
        ax2.text(i, sv, f"{m:.1f} MiB", ha="center", va="bottom")
    ax2.set_xlabel("tasks K")
    ax2.set_ylabel("% of the PUB+DDP step in the sync hook")
    ax2.set_title("GradientAllReduce (payload per rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
