"""The cost study's pieces on small synthetic data: the K-task variant, every method's step,
the interleaved measurement and the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks.study import cost
from integrations.moe_ranking.data import make_synthetic

CFG = dataclasses.replace(cost.QUICK, batch=64, rounds=2, warmup=1, steps=1)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=300, n_val=50, n_test=50, seed=1)


def test_k_task_variant(data) -> None:
    eight = cost.with_tasks(data, 8)
    assert len(eight.task_names) == 8 and eight.train.labels.shape == (300, 8)
    assert torch.equal(eight.train.labels[:, :2], data.train.labels)
    rates = eight.train.labels[:, 2:].mean(0)
    assert ((rates > 0.3) & (rates < 0.7)).all()  # synthetic tasks thresholded at the median
    assert cost.with_tasks(data, 1).train.labels.shape == (300, 1)


def test_k_task_variant_keeps_a_task_mask(data) -> None:
    mask = torch.rand(data.train.labels.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    masked = dataclasses.replace(data, train=dataclasses.replace(data.train, mask=mask))
    five = cost.with_tasks(masked, 5).train
    assert five.mask is not None and five.mask.shape == (300, 5)
    assert torch.equal(five.mask[:, :2], mask) and bool(five.mask[:, 2:].all())
    one = cost.with_tasks(masked, 1).train
    assert one.mask is not None and torch.equal(one.mask, mask[:, :1])
    # the cost problem's losses use the mask: each task's mean over its own rows
    model = cost.build_model("mmoe", masked)
    batch = masked.train.batch(slice(0, 64))
    losses = cost.task_losses(model, batch)
    logits = model(batch)
    for i, t in enumerate(masked.task_names):
        rows = batch["task_mask"][:, i]
        plain = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[t][rows], batch["labels"][rows, i]
        )
        torch.testing.assert_close(losses[t], plain)


@pytest.mark.parametrize("method", cost.COST_METHODS)
def test_every_method_takes_a_step(data, method: str) -> None:
    if method == "torchjd-upgrad":
        pytest.importorskip("torchjd")
    problem = cost.make_problem(data, 3, CFG)
    step, model = cost.build(method, problem)
    before = [p.detach().clone() for p in model.shared_parameters()]
    step()
    after = list(model.shared_parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # the problem's own model is untouched (every method trains a copy)
    assert all(
        torch.equal(a, b) for a, b in zip(before, problem.model.shared_parameters(), strict=True)
    )


def test_measure_and_report(data, tmp_path: Path) -> None:
    problem = cost.make_problem(data, 2, CFG)
    result = cost.measure(problem, ["equal", "pub-pareto", "famo"], CFG, log=lambda _: None)
    assert result.ratios["equal"] == [1.0, 1.0]
    assert all(len(t) == CFG.rounds for t in result.times.values())
    assert result.memory["equal"] > 0 and result.row("pub-pareto")["memory_ratio"] > 1.0
    out = tmp_path / "cost.md"
    text = cost.write_report([result], CFG, out, "python -m benchmarks.study.cost --x", 1.0)
    assert "| pub-pareto |" in text and "## K = 2" in text
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".json").exists()
