"""Smoke test of ``benchmarks/bench_step_time.py`` (tiny sizes) and of its measuring tools."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_step_time")


def _grads_after_one_step(bench: ModuleType, builder, problem) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    built = builder(problem)
    built.step()
    return [p.grad.clone() for group in built.optimizer.param_groups for p in group["params"]]


def test_floor_methods_compute_the_plain_gradient(bench: ModuleType) -> None:
    """``floor`` and ``floor-vmap`` hand Adam the same gradient as ``plain`` (sum of the tasks)."""
    problem = bench.make_problem(bench.QUICK, 3, torch.device("cpu"))
    plain = _grads_after_one_step(bench, bench.build_plain, problem)
    for builder in (bench.build_floor, bench.build_floor_vmap):
        got = _grads_after_one_step(bench, builder, problem)
        assert len(got) == len(plain)
        for a, b in zip(got, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_peak_bytes_sees_a_temporary(bench: ModuleType) -> None:
    n = 1 << 20

    def run() -> None:
        a = torch.ones(n)  # 4 MiB, freed before the second one
        del a
        b = torch.ones(2 * n)  # 8 MiB
        del b

    peak = bench.peak_bytes(run, torch.device("cpu"))
    assert 8 * n <= peak < 8 * n + (1 << 20)


def test_paired_ratio_and_quantiles(bench: ModuleType) -> None:
    a = bench.Timing("a", 1, [2.0, 4.0, 6.0])
    b = bench.Timing("b", 1, [1.0, 2.0, 3.0])
    assert bench.paired_ratio(a, b) == (2.0, 2.0, 2.0)
    assert bench.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_cycles_amortise_solve_every(bench: ModuleType) -> None:
    """A solve_every method is summarised over whole cycles, paired over the same rounds."""
    slow_then_fast = bench.Timing("se", 2, [9.0, 1.0, 9.0, 1.0])  # one solve per 2 rounds
    flat = bench.Timing("floor", 1, [5.0, 5.0, 10.0, 10.0])
    assert bench.summary(slow_then_fast) == (5.0, 5.0, 5.0)
    # ratios 1.8, 0.2, 0.9, 0.1: solve rounds (1.8, 0.9), others (0.2, 0.1), amortised over 2
    assert bench.paired_ratio(slow_then_fast, flat) == pytest.approx((0.625, 0.75, 0.875))


@pytest.mark.slow
def test_quick_run_writes_report_and_chart(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.run(["--quick", "--out", str(tmp_path)])
    text = report.read_text()
    for method in bench.all_methods():
        assert f"| {method.name} |" in text
    assert "## Targets" in text
    # the figure and the verdicts come before the long tables
    assert text.index("![step time](step_time.png)") < text.index("## Targets")
    assert text.index("## Targets") < text.index("## Setup") < text.index("## K = ")
    assert "Where the time goes" in text
    assert "autograd.grad" in text and "lookahead" in text  # the breakdown was recorded
    png = tmp_path / "step_time.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved numbers rebuild the same report.
    again = bench.run(
        ["--from-json", str(tmp_path / "step_time.json"), "--out", str(tmp_path), "--name", "re"]
    )
    assert again.read_text() == text.replace("step_time.png", "re.png")
