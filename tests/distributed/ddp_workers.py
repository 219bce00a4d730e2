"""Worker functions for the 2-process gloo tests (imported by the spawned children)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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


def spawn(worker: Callable[..., None], out_dir: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``worker(rank, init_file, out_dir, kwargs)`` on 2 gloo ranks; return their results."""
    fd, init_file = tempfile.mkstemp(prefix="pub_gloo_")
    os.close(fd)
    os.unlink(init_file)
    try:
        mp.start_processes(
            _entry,
            args=(worker, init_file, str(out_dir), kwargs),
            nprocs=WORLD,
            start_method="spawn",
        )
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]


def _entry(
    rank: int, worker: Callable[..., dict[str, Any]], init_file: str, out_dir: str, kwargs: Any
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = worker(rank, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class TwoTask(nn.Module):
    """A shared trunk and two heads (plus a parameter that no task reaches)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.head_a(h).squeeze(-1), self.head_b(h).squeeze(-1)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


def task_losses(out: tuple[Tensor, Tensor], y: Tensor) -> dict[str, Tensor]:
    return {
        "a": (out[0] - y[:, 0]).pow(2).mean(),
        "b": nn.functional.binary_cross_entropy_with_logits(out[1], y[:, 1]),
    }


def batches(steps: int, size: int, seed: int = 7) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(size, 6, generator=gen, dtype=torch.float64)
        y = torch.stack([x[:, 0] - x[:, 1], (x[:, 2] > 0).double()], dim=1)
        out.append((x, y))
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


CONFIGS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "every-step": (1, 1, {}),
    "solve-every-2": (2, 1, {}),
    "accumulate-2-no_sync": (1, 2, {}),
    "per-task-state": (1, 1, {"state": "per_task"}),
    "per-task-solve-every-2": (2, 1, {"state": "per_task", "between_solves": "reuse_weights"}),
    "marginal-space": (1, 1, {"space": "marginal", "diagnostics": True}),
}


def equivalence(rank: int) -> dict[str, Any]:
    """:func:`matches_single_process` for every configuration of :data:`CONFIGS`."""
    return {name: matches_single_process(rank, *cfg) for name, cfg in CONFIGS.items()}


def edge_cases(rank: int) -> dict[str, Any]:
    """The smaller checks, in one pair of processes to save start-up time."""
    return {
        "idle": {fup: reducer_stays_idle(rank, fup) for fup in (False, True)},
        "presence": partial_presence(rank),
        "mismatch": layout_mismatch(rank),
        "nan": nan_on_one_rank(rank),
    }


def matches_single_process(
    rank: int,
    solve_every: int,
    accumulate: int,
    options: dict[str, Any],
    steps: int = 4,
    batch: int = 8,
) -> dict[str, Any]:
    """DDP PUB on 2 ranks x ``batch`` vs single-process PUB on ``2 * batch`` (float64)."""
    torch.set_default_dtype(torch.float64)
    data = batches(steps, WORLD * batch)
    # reference: one process, the whole batch
    ref = TwoTask()
    ref_opt = PUB(torch.optim.Adam(ref.parameters(), lr=1e-2), solve_every=solve_every, **options)
    for x, y in data:
        ref_opt.zero_grad()
        ref_opt.backward(task_losses(ref(x), y))
        ref_opt.step()
    # DDP: each rank its half, optionally in ``accumulate`` micro-batches under no_sync
    model = TwoTask()
    ddp = DistributedDataParallel(model)
    sync = GradientAllReduce(ddp)
    opt = PUB(torch.optim.Adam(ddp.parameters(), lr=1e-2), solve_every=solve_every, **options)
    opt.gradient_sync = sync
    for x, y in data:
        xs, ys = x[rank * batch : (rank + 1) * batch], y[rank * batch : (rank + 1) * batch]
        opt.zero_grad()
        for i, (xm, ym) in enumerate(zip(xs.chunk(accumulate), ys.chunk(accumulate), strict=True)):
            losses = task_losses(ddp(xm), ym)
            losses = {k: v / accumulate for k, v in losses.items()}
            if i < accumulate - 1:
                with ddp.no_sync():
                    opt.backward(losses)
            else:
                opt.backward(losses)
        opt.step()
    return {
        "ddp": _flat(model),
        "ref": _flat(ref),
        "weights": opt.weights,
        "ref_weights": ref_opt.weights,
        "calls": sync.stats.calls,
        "collectives": sync.stats.collectives,
        "bytes": sync.stats.last_bytes,
        "unused_grad": model.unused.weight.grad,
    }


def reducer_stays_idle(rank: int, find_unused_parameters: bool) -> dict[str, Any]:
    """Per-task backward through a live DDP reducer, without our hook: nothing is synchronised."""
    torch.set_default_dtype(torch.float64)
    model = TwoTask()
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    opt = PUB(torch.optim.SGD(ddp.parameters(), lr=0.1))
    grads = []
    for x, y in batches(3, 8, seed=100 + rank):
        opt.zero_grad()
        opt.backward(task_losses(ddp(x), y))
        grads.append(model.trunk[0].weight.grad.clone())
        opt.step()
    return {"grads": torch.stack(grads)}


def partial_presence(rank: int) -> dict[str, Any]:
    """A task-specific parameter with a gradient on rank 0 only; a shared one reached on rank 1
    only: both get the rank average on both ranks."""
    torch.set_default_dtype(torch.float64)
    model = TwoTask()
    extra_a = nn.Parameter(torch.zeros(3))
    extra_shared = nn.Parameter(torch.zeros(2))
    params = [*model.parameters(), extra_a, extra_shared]
    sync = GradientAllReduce()
    opt = PUB(
        torch.optim.SGD(params, lr=1.0),
        shared_params=[*model.shared_parameters(), extra_shared],
        gradient_sync=sync,
    )
    x, y = batches(1, 8, seed=3 + rank)[0]
    losses = task_losses(model(x), y)
    if rank == 0:
        losses["a"] = losses["a"] + (extra_a * torch.tensor([1.0, 2.0, 3.0])).sum()
    else:
        losses["a"] = losses["a"] + extra_shared.sum()
        losses["b"] = losses["b"] + 3 * extra_shared.sum()
    opt.zero_grad()
    opt.backward(losses)
    grads = {"extra_a": extra_a.grad.clone(), "extra_shared": extra_shared.grad.clone()}
    opt.step()
    return {
        **grads,
        "extra_a_after": extra_a.detach().clone(),
        "extra_shared_after": extra_shared.detach().clone(),
        "all": _flat(model),
    }


def layout_mismatch(rank: int) -> dict[str, Any]:
    """Ranks that balance different shared parameters get a clear error (no hang)."""
    torch.set_default_dtype(torch.float32)
    model = TwoTask()
    shared = model.shared_parameters()
    if rank == 1:
        shared = shared[:2]
    opt = PUB(
        torch.optim.SGD(model.parameters(), lr=0.1),
        shared_params=shared,
        gradient_sync=GradientAllReduce(),
    )
    x, y = batches(1, 8)[0]
    try:
        opt.backward(task_losses(model(x.float()), y.float()))
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


def nan_on_one_rank(rank: int) -> dict[str, Any]:
    """``check_finite=False``: a NaN loss on rank 1 only is averaged into both ranks, and
    ``step`` raises on both before changing anything."""
    torch.set_default_dtype(torch.float64)
    model = TwoTask()
    ddp = DistributedDataParallel(model)
    opt = PUB(
        torch.optim.Adam(ddp.parameters(), lr=1e-2),
        check_finite=False,
        gradient_sync=GradientAllReduce(ddp),
    )
    x, y = batches(1, 8, seed=5 + rank)[0]
    losses = task_losses(ddp(x), y)
    if rank == 1:
        losses["b"] = losses["b"] * float("nan")
    before = _flat(model).clone()
    opt.zero_grad()
    opt.backward(losses)
    try:
        opt.step()
    except FloatingPointError as err:
        return {
            "error": str(err),
            "unchanged": torch.equal(before, _flat(model)),
            "state": len(opt.optimizer.state),
        }
    return {"error": None}
