"""Several optimizers as one PUB: SparseAdam for the sparse-gradient tables, Adam (or another
dense optimizer) for the dense layers; one Gram matrix over both.

References: torch's own optimizers stepped side by side (one task, K identical tasks, an LR
scheduler on one of them), and one balanced step rebuilt from deep copies of the two torch
optimizers (each task's look-ahead = what torch does with that task's gradient alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from mtl_fixtures import assert_state_equal
from test_sparse_embeddings import Tables
from torch import nn

from pub_optim import PUB, CombinedOptimizer, get_strategy


def _split(model: Tables) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    tables = [model.table.weight, model.bag.weight, *[e.weight for e in model.own]]
    ids = {id(p) for p in tables}
    return tables, [p for p in model.parameters() if id(p) not in ids]


def _pair(model: Tables, lr: float = 1e-2) -> list[torch.optim.Optimizer]:
    tables, dense = _split(model)
    return [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(dense, lr=lr)]


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_identical_tasks_equal_the_two_plain_optimizers_with_a_scheduler(num_tasks: int) -> None:
    reference, model = Tables(True, 1), Tables(True, 1)
    ref_opts = _pair(reference)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opts[1], step_size=2, gamma=0.5)
    opts = _pair(model)
    sched = torch.optim.lr_scheduler.StepLR(opts[1], step_size=2, gamma=0.5)
    pub = PUB(opts, "pareto", shared_params=list(model.parameters()))
    assert isinstance(pub.optimizer, CombinedOptimizer)
    for step in range(8):
        for o in ref_opts:
            o.zero_grad()
        reference.losses(step)[0].backward()
        for o in ref_opts:
            o.step()
        ref_sched.step()
        pub.zero_grad()
        loss = model.losses(step)[0]
        pub.backward([loss * 1.0 for _ in range(num_tasks)])
        pub.step()
        sched.step()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert pub.param_groups[-1]["lr"] == ref_opts[1].param_groups[0]["lr"] == 1e-2 * 0.5**4


def test_one_balanced_step_is_built_from_what_each_torch_optimizer_does_per_task() -> None:
    model = Tables(True)
    pub = PUB(_pair(model), "pareto")
    for step in range(3):
        pub.zero_grad()
        pub.backward(model.losses(step))
        pub.step()
    shared = pub.shared_params
    index = {id(p): i for i, p in enumerate(model.parameters())}
    losses = model.losses(3)
    grads = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    deltas = []
    for k in range(2):
        twin, twin_opt = copy.deepcopy((model, pub.optimizer))
        params = list(twin.parameters())
        for p in params:
            p.grad = None
        for p, g in zip(shared, grads[k], strict=True):
            params[index[id(p)]].grad = g.clone()
        twin_opt.step()
        deltas.append(
            torch.cat(
                [(params[index[id(p)]].detach() - p.detach()).reshape(-1).double() for p in shared]
            )
        )
    stacked = torch.stack(deltas)
    expected_weights = get_strategy("pareto")(stacked @ stacked.T)
    before = [p.detach().clone() for p in shared]
    pub.zero_grad()
    pub.backward(losses)
    pub.step()
    assert pub.weights is not None
    torch.testing.assert_close(pub.weights, expected_weights, rtol=1e-4, atol=1e-6)
    moved = torch.cat(
        [(p.detach() - b).reshape(-1).double() for p, b in zip(shared, before, strict=True)]
    )
    torch.testing.assert_close(moved, expected_weights @ stacked, rtol=1e-4, atol=1e-7)


def test_state_dict_resumes_bit_identically() -> None:
    def make() -> tuple[Tables, PUB]:
        model = Tables(True)
        return model, PUB(_pair(model), "pareto")

    def train(pub: PUB, model: Tables, steps: range) -> None:
        for step in steps:
            pub.zero_grad()
            pub.backward(model.losses(step))
            pub.step()

    model, pub = make()
    train(pub, model, range(3))
    saved, weights = copy.deepcopy(pub.state_dict()), copy.deepcopy(model.state_dict())
    assert {"state", "param_groups", "optimizers", "pub"} <= set(saved)
    train(pub, model, range(3, 6))
    again_model, again = make()
    again_model.load_state_dict(weights)
    again.load_state_dict(saved)
    train(again, again_model, range(3, 6))
    for p, q in zip(model.parameters(), again_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_state_equal(again.state_dict(), pub.state_dict())


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    model = Tables(True)
    with pytest.raises(ValueError, match="belong to one"):
        PUB([torch.optim.SparseAdam([model.table.weight]), torch.optim.Adam(model.parameters())])


def test_two_dense_optimizers_are_refused() -> None:
    model = Tables(False)
    tables, dense = _split(model)
    with pytest.raises(ValueError, match="one optimizer"):
        PUB([torch.optim.Adam(tables), torch.optim.SGD(dense, lr=0.1)])


def test_a_dense_parameter_of_the_sparse_optimizer_is_refused_with_nothing_changed() -> None:
    model = Tables(True)
    tables, dense = _split(model)
    pub = PUB([torch.optim.SparseAdam([*tables, dense[0]]), torch.optim.Adam(dense[1:])])
    pub.zero_grad()
    pub.backward(model.losses(0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="SparseAdam"):
        pub.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert len(pub.optimizer.state) == 0
