"""Peak memory of PUB: at most (K + 1) x the shared parameters over plain training.

Issue 2's bound. Measured from the CPU allocator's own events (``torch.profiler`` with
``profile_memory=True``: every allocation and free in order, the peak of their running sum), the
same measure as ``benchmarks/bench_step_time.py``. The model is wide and the batch tiny, so the
shared parameters dominate and activations cannot hide an extra copy: keeping one task's gradient
tuple alive during the next task's backward pass (the regression this pins) shows plainly. The
inner Adam runs with ``foreach=False`` in both runs, so that plain training's own temporaries
(``foreach`` allocates whole-model intermediates) do not mask PUB's.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from pub_optim import PUB


@contextmanager
def _quiet_fd2() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(run: Callable[[], None], tmp_path: Path) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    trace = tmp_path / f"trace{len(list(tmp_path.iterdir()))}.json"
    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    mem = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    mem.sort(key=lambda e: (e["args"].get("Ev Idx", 0), e["ts"]))
    live = peak = 0
    for e in mem:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    return peak


class WideMultiTask(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        # Eight equal layers: no single tensor's temporaries (Adam's, per parameter with
        # ``foreach=False``) weigh much against the whole shared size.
        self.trunk = nn.Sequential(*(m for _ in range(8) for m in (nn.Linear(128, 128), nn.ReLU())))
        self.heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).pow(2).mean() for head in self.heads]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(
    ("space", "fused"),
    [
        ("update", False),
        ("gradient", False),
        # The compiled path keeps autograd's per-task gradients instead of copying them.
        pytest.param("update", True, marks=pytest.mark.slow),
    ],
)
def test_peak_extra_memory_at_most_k_plus_one_shared_copies(
    k: int, space: str, fused: bool, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    template = WideMultiTask(k)
    x = torch.randn(4, 128)
    shared_bytes = sum(p.numel() * p.element_size() for p in template.trunk.parameters())

    def plain() -> None:
        model = WideMultiTask(k)
        model.load_state_dict(template.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        for _ in range(3):
            opt.zero_grad()
            torch.stack(model(x)).sum().backward()
            opt.step()

    def balanced() -> None:
        model = WideMultiTask(k)
        model.load_state_dict(template.state_dict())
        # A small column chunk: the K x chunk scratch of the look-ahead is then negligible here
        # (the default, 65536 columns, is sized for models of millions of parameters).
        opt = PUB(
            torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False),
            space=space,  # type: ignore[arg-type]
            chunk_size=4096,
            fused=fused,
        )
        for _ in range(3):
            opt.zero_grad()
            opt.backward(model(x))
            assert (opt._grads.rows is not None) == fused  # the kept gradients, or the buffers
            opt.step()

    if fused:  # compile the kernels outside the measured runs
        balanced()
    extra = peak_bytes(balanced, tmp_path) - peak_bytes(plain, tmp_path)
    # Issue 2 bounds the extra at K + 1 shared copies. PUB keeps K per-task gradients (buffers, or
    # autograd's tensors on the compiled path); all it allocates on top (one task's gradients
    # while they are copied into the buffers, the K x chunk look-ahead scratch, the compiled
    # kernels' results) is transient and must stay under half a copy here. Keeping a
    # task's gradient tuple alive through the next backward pass (a past regression) gives ~K + 0.8.
    assert extra <= (k + 0.5) * shared_bytes, (
        f"PUB's peak is {extra / shared_bytes:.2f} x the shared parameters above plain Adam "
        f"(K buffers + transients; expected <= K + 0.5 = {k + 0.5}, issue bound K + 1)"
    )
    # The K per-task gradients themselves are needed: the measure sees them. On the compiled
    # path they are the only extra (its kernels allocate nothing of the parameters' size), so
    # plain Adam's own step temporaries (``foreach=False``: a few per-parameter tensors, one
    # layer = 1/8 of the shared size here) come off it: 1.79 copies measured at K = 2.
    assert extra >= (k - 0.5 if fused else 0.9 * k) * shared_bytes


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_per_task_state_costs_its_states_and_the_gradients_only(
    k: int, fused: bool, tmp_path: Path
) -> None:
    """``state="per_task"``: on top of the K per-task gradients, K Adam states of the shared
    parameters in place of plain Adam's one (2 (K - 1) more copies), and nothing else of the
    model's size: on the compiled path the kept gradients are not also stacked into buffers
    (K more copies), the states are advanced in place. (The kernels' own temporaries are per
    parameter, at most K / 8 of a copy here: below what this measure resolves.)"""
    torch.manual_seed(0)
    template = WideMultiTask(k)
    x = torch.randn(4, 128)
    shared_bytes = sum(p.numel() * p.element_size() for p in template.trunk.parameters())

    def plain() -> None:
        model = WideMultiTask(k)
        model.load_state_dict(template.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        for _ in range(3):
            opt.zero_grad()
            torch.stack(model(x)).sum().backward()
            opt.step()

    def balanced() -> None:
        model = WideMultiTask(k)
        model.load_state_dict(template.state_dict())
        opt = PUB(
            torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False),
            state="per_task",
            chunk_size=4096,
            fused=fused,
        )
        for _ in range(3):
            opt.zero_grad()
            opt.backward(model(x))
            assert (opt._grads.rows is not None) == fused
            opt.step()
            assert opt._engine is not None and not opt._engine.fused_failed

    if fused:  # compile the kernels outside the measured runs
        balanced()
    extra = peak_bytes(balanced, tmp_path) - peak_bytes(plain, tmp_path)
    # K gradients, K - 1 more Adam states of two tensors (measured: 3.81 / 9.86 copies at
    # K = 2 / 4 fused, 3.94 / 10.00 eager)
    needed = k + 2 * (k - 1)
    assert extra <= (needed + 0.5) * shared_bytes, (
        f"PUB(state='per_task')'s peak is {extra / shared_bytes:.2f} x the shared parameters "
        f"above plain Adam (expected <= {needed + 0.5})"
    )
    assert extra >= (needed - 0.5) * shared_bytes
