"""Smoke test of ``benchmarks/bench_grec.py``: the quick profile writes its page, JSON and figures,
and the page is rebuilt identically from the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_loader import load_benchmark

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_grec")


def test_quantiles(bench: ModuleType) -> None:
    assert bench.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert bench.quantiles([7.0]) == (7.0, 7.0, 7.0)


def test_serving_macs_count_attention(bench: ModuleType) -> None:
    """MACs per row of one self-attention layer in eval mode (fast path and fused attention
    kernels on CPU, which the flop counter alone does not see), counted by hand."""
    import torch

    length, d, heads, rows = 5, 8, 2, 3

    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(d, heads, batch_first=True)

        def forward(self, batch: dict, tasks: list) -> dict:  # type: ignore[type-arg]
            x = batch["x"]
            return {tasks[0]: self.attention(x, x, x, need_weights=False)[0]}

    model = Attend().eval()
    batch = {"x": torch.randn(rows, length, d), "labels": torch.zeros(rows, 1)}
    # q/k/v projections, scores q k^T, weights x v, output projection
    expected = length * d * 3 * d + 2 * length * length * d + length * d * d
    assert bench.serving_macs(model, batch, "t") == expected


def test_single_task_data_keeps_only_the_tasks_rows(bench: ModuleType) -> None:
    import torch

    from integrations.moe_ranking.data.base import MultiTaskData, Split

    mask = torch.tensor([[True, False], [True, True], [False, True]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    split = Split(torch.arange(3).reshape(3, 1), torch.zeros(3, 1), labels, mask=mask)
    data = MultiTaskData("d", ("a", "b"), ("c",), (3,), ("n",), split, split, split)
    one = bench.single_task_data(data, 1)
    assert one.task_names == ("b",)
    assert one.test.mask is None
    assert one.test.cat.flatten().tolist() == [1, 2]
    assert one.test.labels.tolist() == [[1.0], [0.0]]


def test_quick_run_writes_tables_and_figures(bench: ModuleType, tmp_path: Path) -> None:
    md = bench.run(["--quick", "--out", str(tmp_path)])
    text = md.read_text()
    assert md == tmp_path / "grec.md"
    assert "## Targets" in text and "## 1. Quality" in text and "## 2. Scaling" in text
    assert "- commit: " in text
    for label in bench.QUALITY_MODELS:
        assert f"| {label} | " in text
    for label in bench.SCALING_MODELS:
        assert f"| 2 | {label} | " in text and f"| 4 | {label} | " in text
    assert "K=4 / K=2" in text
    for png in ("grec_quality.png", "grec_scaling.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "grec.json").read_text())
    assert set(report["scaling"]) == {"2", "4"}
    assert len(report["quality"]) == len(bench.QUALITY_MODELS)
    # task routing serves one task with a fixed top-1 expert, and counts the same MACs at any K
    grec = [report["scaling"][k]["grec-task"] for k in ("2", "4")]
    assert all(len(r["served_experts"]) == 1 for r in grec)
    assert grec[0]["macs_per_row"] == grec[1]["macs_per_row"] > 0
    # The saved numbers rebuild the same page.
    again = bench.run(["--from-json", str(tmp_path / "grec.json"), "--out", str(tmp_path),
                       "--name", "re"])  # fmt: skip
    assert again.read_text() == text.replace("grec_quality.png", "re_quality.png").replace(
        "grec_scaling.png", "re_scaling.png"
    )
