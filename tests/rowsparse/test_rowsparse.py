"""Row-sparse per-task gradients, sparse look-aheads and the untouched-row shortcut, checked
against torch's own optimizers and the dense computation."""

from __future__ import annotations

import copy

import pytest
import torch

from pub_optim.rowsparse import (
    TaskRows,
    UntouchedRows,
    gram,
    sparse_transform_for,
)
from pub_optim.transforms import exact_transform_for


def _sparse_grads(k: int, n: int = 50, d: int = 4, seed: int = 0, bag: bool = False):
    """Per-task sparse gradients of one shared table (embedding lookups of Zipf-like ids)."""
    torch.manual_seed(seed)
    if bag:
        table = torch.nn.EmbeddingBag(n, d, mode="sum", sparse=True)
    else:
        table = torch.nn.Embedding(n, d, sparse=True)
    grads = []
    for t in range(k):
        ids = torch.randint(0, n // (t + 1), (12,))
        if bag:
            out = table(ids, torch.tensor([0, 5]), per_sample_weights=torch.rand(12))
        else:
            out = table(ids)
        (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), [table.weight])
        grads.append(g)
    return table.weight, grads


@pytest.mark.parametrize("bag", [False, True])
def test_touched_row_gram_equals_dense_gram(bag: bool) -> None:
    weight, grads = _sparse_grads(3, bag=bag)
    rows = TaskRows.from_task_grads(grads, weight.shape)
    dense = torch.stack([g.to_dense() for g in grads])
    torch.testing.assert_close(gram(rows.values), gram(dense), rtol=1e-12, atol=1e-12)
    # the aligned values are the coalesced gradients, and nothing else
    restored = torch.stack([rows.to_sparse(v).to_dense() for v in rows.values])
    torch.testing.assert_close(restored, dense, rtol=0, atol=0)
    assert rows.values.shape[1] == rows.rows.numel() < weight.shape[0]


def _make(kind: str, p: torch.Tensor, **kw):
    if kind == "sparse_adam":
        return torch.optim.SparseAdam([p], lr=0.05, **kw)
    if kind == "adagrad":
        return torch.optim.Adagrad([p], lr=0.1, lr_decay=0.01, **kw)
    return torch.optim.SGD([p], lr=0.1, **kw)


@pytest.mark.parametrize("kind", ["sparse_adam", "adagrad", "sgd"])
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("maximize", [False, True])
def test_identical_tasks_equal_the_plain_sparse_optimizer(
    kind: str, num_tasks: int, maximize: bool
) -> None:
    torch.manual_seed(1)
    base = torch.randn(40, 3)
    p_ref = base.clone().requires_grad_()
    p_pub = base.clone().requires_grad_()
    ref = _make(kind, p_ref, maximize=maximize)
    opt = _make(kind, p_pub, maximize=maximize)
    transform = sparse_transform_for(opt)
    weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
    for step in range(4):
        ids = torch.randint(0, 40, (10,)) if step != 2 else torch.tensor([3, 3, 7])
        vals = torch.randn(ids.numel(), 3)
        g = torch.sparse_coo_tensor(ids.unsqueeze(0), vals, (40, 3), check_invariants=False)
        p_ref.grad = g
        ref.step()
        group = opt.param_groups[0]
        transform.validate_group(group)
        ctx = transform.begin(p_pub, group)
        rows = TaskRows.from_task_grads([g] * num_tasks, p_pub.shape)
        d = transform.lookahead(ctx, rows)
        with torch.no_grad():
            transform.commit(
                ctx, rows, rows.combine(weights), (d * weights.to(d)[:, None, None]).sum(0)
            )
        transform.finish(ctx)
        torch.testing.assert_close(p_pub, p_ref, rtol=1e-6, atol=1e-7)
        for key, value in ref.state[p_ref].items():
            other = opt.state[p_pub][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-7)
            else:
                assert other == value


def test_lookahead_changes_nothing_and_is_zero_off_a_tasks_rows() -> None:
    weight, grads = _sparse_grads(2)
    p = weight.detach().clone()
    opt = torch.optim.SparseAdam([p], lr=0.1)
    opt.state[p].update(
        {"step": 3, "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    )
    before = copy.deepcopy(opt.state[p])
    transform = sparse_transform_for(opt)
    rows = TaskRows.from_task_grads(grads, p.shape)
    d = transform.lookahead(transform.begin(p, opt.param_groups[0]), rows)
    assert torch.all(d[~rows.touched] == 0)
    assert torch.all(d[rows.touched].abs().sum(-1) > 0)
    assert opt.state[p]["step"] == 3
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[p][key], before[key], rtol=0, atol=0)


def test_sparse_refusals_name_what_works() -> None:
    p = torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(TypeError, match="SparseAdam"):
        sparse_transform_for(torch.optim.Adam([p]))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum=0"):
        sparse_transform_for(sgd).validate_group(sgd.param_groups[0])
    ada = torch.optim.Adagrad([p], weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay=0"):
        sparse_transform_for(ada).validate_group(ada.param_groups[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam([p], lr=0.01, weight_decay=0.01),
        lambda p: torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.RMSprop([p], lr=0.01, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad([p], lr=0.1),
    ],
)
@pytest.mark.parametrize("keep_drift", [True, False])
def test_untouched_row_shortcut_equals_the_dense_computation(make, keep_drift: bool) -> None:
    torch.manual_seed(2)
    n, dim, k = 60, 5, 3
    base = torch.randn(n, dim)
    p_dense, p_short = base.clone(), base.clone()
    o_dense, o_short = make(p_dense), make(p_short)
    t_dense, t_short = exact_transform_for(o_dense), exact_transform_for(o_short)
    assert t_dense is not None and t_short is not None
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for _ in range(4):
        rows = torch.unique(torch.randint(0, n, (7,)))
        task_grads = torch.zeros(k, n, dim)
        task_grads[:, rows] = torch.randn(k, rows.numel(), dim)
        task_grads[1, rows[0]] = 0.0  # a touched row one task does not reach
        # dense reference: K look-aheads over the whole table
        ctx = t_dense.begin(p_dense, o_dense.param_groups[0])
        flat = task_grads.reshape(k, -1)
        d = torch.empty_like(flat)
        t_dense.lookahead(ctx, 0, flat.shape[1], flat, d)
        g_dense = gram(d)
        w = weights.to(flat)
        t_dense.commit(ctx, 0, flat.shape[1], (flat * w[:, None]).sum(0), (d * w[:, None]).sum(0))
        t_dense.finish(ctx)
        # shortcut: K look-aheads on the touched rows, the drift once
        ctx = t_short.begin(p_short, o_short.param_groups[0])
        short = UntouchedRows(
            t_short, ctx, rows, task_grads[:, rows], chunk=64, keep_drift=keep_drift
        )
        torch.testing.assert_close(short.gram(), g_dense, rtol=1e-6, atol=1e-9)
        short.apply(weights)
        t_short.finish(ctx)
        torch.testing.assert_close(p_short, p_dense, rtol=1e-6, atol=1e-7)
        for key, value in o_dense.state[p_dense].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(o_short.state[p_short][key], value, rtol=1e-6, atol=1e-7)
