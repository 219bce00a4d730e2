"""Smoke test of ``benchmarks/bench_device_solvers.py`` and of its operator counter."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_device_solvers")


def test_counter_counts_kernels_not_views(bench: ModuleType) -> None:
    x = torch.ones(4, 4)
    # add, mul: two operators; view, transpose and slicing launch nothing.
    assert bench.count_operators(lambda: (x + 1).mul(2).view(16)) == 2
    assert bench.count_operators(lambda: x.t()[1:].unsqueeze(0)) == 0


def test_newton_iterations_are_what_the_kernel_replaces(bench: ModuleType) -> None:
    from pub_optim.strategies import Pareto

    gram = torch.eye(3, dtype=torch.float64)
    total = bench.count_operators(lambda: Pareto().device_weights(gram))
    outside = bench.count_outside_newton(lambda: Pareto().device_weights(gram))
    assert 0 < outside < total / 10


def test_quick_run_prints_both_tables(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| pareto | 2 |" in out and "| min-norm | 4 |" in out
    assert "operators, sync_free" in out
