"""Sparse-gradient embedding tables (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag``) in PUB.

Independent references: torch's own optimizers (one task, or K identical tasks: the plain step),
and the same model with dense-gradient tables (``sparse=False``): for SGD without momentum and for
Adagrad a row with a zero gradient does not move and keeps its state, so the sparse and the dense
computations must agree, balanced weights included, for different tasks too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from mtl_fixtures import assert_state_equal
from torch import Tensor, nn

from pub_optim import PUB

ROWS, DIM = 40, 4


class Tables(nn.Module):
    """A shared table and bag (the ids of a batch touch a few rows), a dense trunk, a head and a
    task-specific table per task."""

    def __init__(self, sparse: bool, num_tasks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(ROWS, DIM, sparse=sparse)
        self.bag = nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=sparse)
        self.trunk = nn.Linear(2 * DIM, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))
        self.own = nn.ModuleList(nn.Embedding(ROWS, 1, sparse=sparse) for _ in range(num_tasks))

    def losses(self, step: int, identical: bool = False) -> list[Tensor]:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, ROWS, (16,), generator=g)
        bags = torch.randint(0, ROWS, (16, 3), generator=g)
        weights = torch.rand(16, 3, generator=g)
        y = torch.randn(16, len(self.heads), generator=g)
        x = torch.cat([self.table(ids), self.bag(bags, per_sample_weights=weights)], dim=1)
        z = torch.tanh(self.trunk(x))
        out = []
        for k, (head, own) in enumerate(zip(self.heads, self.own, strict=True)):
            j = 0 if identical else k
            pred = self.heads[j](z).squeeze(-1) + self.own[j](ids).squeeze(-1)
            out.append((pred - y[:, j]).pow(2).mean())
            del head, own
        return out


FACTORIES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
}


def _train(pub: PUB, model: Tables, steps: range, identical: bool = False) -> None:
    for step in steps:
        pub.zero_grad()
        pub.backward(model.losses(step, identical))
        pub.step()


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_identical_tasks_equal_the_plain_optimizer(name: str, num_tasks: int) -> None:
    factory = FACTORIES[name]
    reference, model = Tables(True, 1), Tables(True, 1)
    ref_opt = factory(list(reference.parameters()))
    pub = PUB(factory(list(model.parameters())), "pareto", shared_params=list(model.parameters()))
    for step in range(8):
        ref_opt.zero_grad()
        reference.losses(step)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(step)[0]
        pub.backward([loss * 1.0 for _ in range(num_tasks)])
        pub.step()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["update", "marginal", "gradient"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_sparse_tables_balance_as_dense_tables_do(name: str, space: str) -> None:
    factory = FACTORIES[name]
    dense, sparse = Tables(False), Tables(True)
    pub_dense = PUB(factory(list(dense.parameters())), "pareto", space=space, diagnostics=True)  # type: ignore[arg-type]
    pub_sparse = PUB(factory(list(sparse.parameters())), "pareto", space=space, diagnostics=True)  # type: ignore[arg-type]
    for step in range(6):
        for model, pub in ((dense, pub_dense), (sparse, pub_sparse)):
            pub.zero_grad()
            pub.backward(model.losses(step))
            pub.step()
        assert pub_dense.weights is not None and pub_sparse.weights is not None
        torch.testing.assert_close(pub_sparse.weights, pub_dense.weights, rtol=1e-5, atol=1e-7)
    assert pub_sparse.weights is not None and abs(float(pub_sparse.weights[0]) - 0.5) > 1e-3
    for p, q in zip(dense.parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(p is sparse.table.weight for p in pub_sparse.shared_params)


class BagOnly(nn.Module):
    """Every parameter is a table: a shared bag with per-sample weights and a per-task table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.bag = nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True)
        self.tasks = nn.ModuleList(nn.Embedding(ROWS, DIM, sparse=True) for _ in range(2))

    def losses(self, step: int, identical: bool = False) -> list[Tensor]:
        g = torch.Generator().manual_seed(step)
        bags = torch.randint(0, ROWS, (16, 3), generator=g)
        w = torch.rand(16, 3, generator=g)
        ids = torch.randint(0, ROWS, (16,), generator=g)
        y = torch.randn(16, 2, generator=g)
        u = self.bag(bags, per_sample_weights=w)
        out = []
        for k in range(2):
            j = 0 if identical else k
            out.append(((u * self.tasks[j](ids)).sum(-1) - y[:, j]).pow(2).mean())
        return out


def test_sparse_adam_over_tables_equals_the_plain_optimizer_on_identical_tasks() -> None:
    reference, model = BagOnly(), BagOnly()
    ref_opt = torch.optim.SparseAdam(list(reference.parameters()), lr=1e-2)
    pub = PUB(torch.optim.SparseAdam(list(model.parameters()), lr=1e-2), "pareto")
    for step in range(8):
        ref_opt.zero_grad()
        reference.losses(step, identical=True)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(step, identical=True)[0]
        pub.backward([loss, loss * 1.0])
        pub.step()
        assert pub.weights is not None and pub.weights.tolist() == pytest.approx([0.5, 0.5])
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    ref_state = ref_opt.state[reference.bag.weight]
    state = pub.optimizer.state[model.bag.weight]
    assert int(state["step"]) == int(ref_state["step"]) == 8
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=1e-5, atol=1e-7)


def test_sparse_adam_balances_different_tasks() -> None:
    model = BagOnly()
    pub = PUB(torch.optim.SparseAdam(list(model.parameters()), lr=1e-2), "pareto", diagnostics=True)
    before = model.bag.weight.detach().clone()
    _train(pub, model, range(5))  # type: ignore[arg-type]
    assert pub.weights is not None and pub.last_stats is not None
    assert not torch.equal(before, model.bag.weight)
    assert pub.last_stats.diagnostics is not None


def test_state_dict_resume_is_bit_identical() -> None:
    def make() -> tuple[Tables, PUB]:
        model = Tables(True)
        return model, PUB(torch.optim.Adagrad(model.parameters(), lr=0.05))

    model, pub = make()
    _train(pub, model, range(3))
    saved, weights = copy.deepcopy(pub.state_dict()), copy.deepcopy(model.state_dict())
    _train(pub, model, range(3, 6))
    again_model, again = make()
    again_model.load_state_dict(weights)
    again.load_state_dict(saved)
    _train(again, again_model, range(3, 6))
    for p, q in zip(model.parameters(), again_model.parameters(), strict=True):
        assert torch.equal(p, q)


def _snapshot(model: nn.Module, pub: PUB) -> tuple[list[Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(pub.state_dict())


def _unchanged(model: nn.Module, pub: PUB, before: tuple[list[Tensor], dict]) -> None:
    for p, q in zip(model.parameters(), before[0], strict=True):
        assert torch.equal(p, q)
    assert_state_equal(pub.state_dict(), before[1])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m: PUB(torch.optim.Adam(m.parameters(), lr=1e-2)), TypeError, "SparseAdam"),
        (
            lambda m: PUB(torch.optim.Adagrad(m.parameters(), weight_decay=0.1)),
            ValueError,
            "weight_decay",
        ),
        (
            lambda m: PUB(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
            ValueError,
            "momentum",
        ),
        (
            lambda m: PUB(torch.optim.Adagrad(m.parameters()), state="per_task"),
            ValueError,
            "per_task",
        ),
    ],
    ids=["adam", "adagrad-weight-decay", "sgd-momentum", "per-task-state"],
)
def test_unsupported_sparse_combinations_are_refused_with_nothing_changed(
    make: object, error: type[Exception], match: str
) -> None:
    model = Tables(True)
    pub = make(model)  # type: ignore[operator]
    pub.zero_grad()
    pub.backward(model.losses(0))
    before = _snapshot(model, pub)
    with pytest.raises(error, match=match):
        pub.step()
    _unchanged(model, pub, before)


def test_sparse_tables_under_a_gradient_sync_hook_are_refused_at_backward() -> None:
    """DDP's hook (GradientAllReduce) averages dense per-task buffers: refused before it runs."""
    model = Tables(True)
    calls: list[object] = []
    pub = PUB(torch.optim.Adagrad(model.parameters()), gradient_sync=calls.append)
    before = [p.detach().clone() for p in model.parameters()]
    pub.zero_grad()
    with pytest.raises(ValueError, match="gradient_sync"):
        pub.backward(model.losses(0))
    assert calls == []
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
