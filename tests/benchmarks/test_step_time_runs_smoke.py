"""``benchmarks/step_time_runs.py`` on the committed runs: its table holds each run's paired
median, recomputed here from the raw per-round timings of the saved ``.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench_loader import BENCHMARKS, load_benchmark

RESULTS = BENCHMARKS.parent / "docs" / "results"


def _paired_median(path: Path, k: int, name: str, reference: str) -> float:
    data = json.loads(path.read_text())
    (res,) = [r for r in data["results"] if r["k"] == k]
    a, b = res["timings"][name]["wall_ms"], res["timings"][reference]["wall_ms"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def test_spread_table_holds_each_runs_paired_median(tmp_path: Path) -> None:
    load_benchmark("bench_step_time")  # step_time_runs imports it by name
    spread = load_benchmark("step_time_runs")
    runs = [RESULTS / "step_time.json", *sorted((RESULTS / "step_time_runs").glob("*.json"))]
    assert len(runs) >= 2
    report = spread.main([*map(str, runs), "--out", str(tmp_path), "--name", "spread"])
    text = report.read_text()
    assert (tmp_path / "spread.png").stat().st_size > 0
    for reference, section in (("floor", "## PUB / floor"), ("torchjd-upgrad", "## PUB / torchjd")):
        expected = [_paired_median(p, 2, "pub-pareto", reference) for p in runs]
        block = text[text.index(section) :]
        row = next(line for line in block.splitlines() if line.startswith("| 2 | pareto |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2 : 2 + len(runs)] == [f"{v:.2f}" for v in expected]
        limit = 1.15 if reference == "floor" else 1.0
        assert cells[-1] == f"{sum(v <= limit for v in expected)} of {len(runs)}"
        assert cells[2 + len(runs) + 1] == f"{statistics.median(expected):.2f}"
