"""Checks shared by the gating tests, written from the definitions (not from the implementation)."""

from __future__ import annotations

import torch

from integrations.moe_ranking.gating import GatingOutput


def router_logits(logits: torch.Tensor, task_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``float32(logits) + float32(task_bias)``: the logits the router softmax sees."""
    x = logits.float()
    return x if task_bias is None else x + task_bias.float()


def assert_dispatch_metadata(out: GatingOutput, n: int, e: int, k: int) -> None:
    """Counts, offsets and dispatch order agree with the ids, by the definitions of the contract."""
    ids = out.expert_ids
    assert ids.shape == (n, k) and ids.dtype == torch.int64
    assert out.weights.shape == (n, k)
    if n:
        assert int(ids.min()) >= 0 and int(ids.max()) < e
        assert all(len(set(row)) == k for row in ids.tolist()), "ids of a row must be distinct"
    flat = ids.reshape(-1)
    expected_counts = torch.tensor([int((flat == j).sum()) for j in range(e)], dtype=torch.int64)
    assert out.expert_counts.dtype == torch.int64
    assert torch.equal(out.expert_counts.cpu(), expected_counts)
    offsets = out.expert_offsets.cpu()
    assert offsets.dtype == torch.int64 and offsets.shape == (e + 1,)
    assert int(offsets[0]) == 0 and int(offsets[-1]) == n * k
    assert torch.equal(offsets[1:] - offsets[:-1], expected_counts)
    order = out.dispatch_order.cpu()
    assert order.dtype == torch.int64 and order.shape == (n * k,)
    assert sorted(order.tolist()) == list(range(n * k)), "dispatch_order must be a permutation"
    flat = flat.cpu()
    for j in range(e):
        group = order[int(offsets[j]) : int(offsets[j + 1])]
        assert bool((flat[group] == j).all()), f"group of expert {j} holds other experts"
        assert bool((group[1:] > group[:-1]).all()), f"group of expert {j} is not ascending"


def assert_ranked(out: GatingOutput, y: torch.Tensor) -> None:
    """Ids follow the logits ``y`` (finite, no NaN) in descending order, ties to the lowest id."""
    ids = out.expert_ids.cpu()
    y = y.cpu()
    for row_ids, row in zip(ids.tolist(), y.tolist(), strict=True):
        ranking = sorted(range(len(row)), key=lambda j, r=row: (-r[j], j))
        assert row_ids == ranking[: len(row_ids)], (row_ids, row)
