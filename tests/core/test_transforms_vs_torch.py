"""The look-ahead transforms reproduce torch's own optimizers exactly where they must.

Invariants from pub-method.md: with K = 1 the applied step is the wrapped optimizer's own step, and
with K tasks whose gradients are identical it is the wrapped optimizer's step on that gradient,
for every supported optimizer and option (50 steps against torch itself). Beyond the identities,
one balanced step with *different* tasks is checked against an oracle built from deep copies of
the torch optimizer (the look-ahead d_k = what torch would do with g_k alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from mtl_fixtures import OPTIMIZERS, OptimizerFactory, TwoTower, batch, torch_step

from pub_optim import PUB, get_strategy

STEPS = 50
IDS = [name for name, _ in OPTIMIZERS]
FACTORIES = [factory for _, factory in OPTIMIZERS]


def _assert_close_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_single_task_equals_wrapped_optimizer(factory: OptimizerFactory) -> None:
    reference, model = TwoTower(1), TwoTower(1)
    ref_opt = factory(list(reference.parameters()))
    pub = PUB(
        factory(list(model.parameters())), "pareto", shared_params=list(model.trunk.parameters())
    )
    for step in range(STEPS):
        x, y = batch(step, 1)
        ref_opt.zero_grad()
        reference.losses(x, y)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
        assert pub.weights is not None and pub.weights.tolist() == [1.0]
    _assert_close_params(reference, model)


@pytest.mark.parametrize("strategy", ["pareto", "min-norm", "equal-magnitude", "equal"])
@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_identical_tasks_equal_wrapped_optimizer(factory: OptimizerFactory, strategy: str) -> None:
    """Three tasks with the same loss through the same head: the plain step on that gradient."""
    reference, model = TwoTower(1), TwoTower(1)
    ref_opt = factory(list(reference.parameters()))
    pub = PUB(factory(list(model.parameters())), strategy)
    for step in range(STEPS if strategy == "pareto" else 10):
        x, y = batch(step, 1)
        ref_opt.zero_grad()
        reference.losses(x, y)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(x, y)[0]
        pub.backward([loss, loss * 1.0, loss + 0.0])
        pub.step()
        assert pub.weights is not None
        torch.testing.assert_close(pub.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    _assert_close_params(reference, model)
    # The state the wrapped optimizer keeps is torch's, tensor for tensor.
    ref_state, pub_state = ref_opt.state_dict()["state"], pub.optimizer.state_dict()["state"]
    assert ref_state.keys() == pub_state.keys()
    for key in ref_state:
        assert ref_state[key].keys() == pub_state[key].keys()
        for name, value in ref_state[key].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == pub_state[key][name].dtype
                assert value.device == pub_state[key][name].device
                torch.testing.assert_close(value, pub_state[key][name], rtol=1e-5, atol=1e-6)
            else:
                assert value == pub_state[key][name]


def _per_task_shared_grads(model: TwoTower, losses: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    shared = list(model.trunk.parameters())
    return [list(torch.autograd.grad(loss, shared, retain_graph=True)) for loss in losses]


@pytest.mark.parametrize("space", ["update", "gradient"])
@pytest.mark.parametrize("strategy", ["pareto", "min-norm", "equal-magnitude"])
@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_balanced_step_matches_torch_oracle(
    factory: OptimizerFactory, strategy: str, space: str
) -> None:
    """Different tasks, a few warm-up steps, then one step checked against torch-built oracles."""
    num_tasks = 3
    model = TwoTower(num_tasks)
    pub = PUB(factory(list(model.parameters())), strategy, space=space)  # type: ignore[arg-type]
    for step in range(4):
        x, y = batch(step, num_tasks)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
    x, y = batch(99, num_tasks)
    losses = model.losses(x, y)
    task_grads = _per_task_shared_grads(model, losses)
    head_grads = [
        torch.autograd.grad(loss, list(model.heads[k].parameters()), retain_graph=True)
        for k, loss in enumerate(losses)
    ]
    params = list(model.parameters())
    n_shared = len(list(model.trunk.parameters()))
    inner = pub.optimizer
    # Oracle look-ahead: what torch does with each task's gradient alone (shared params only).
    vectors = []
    for k in range(num_tasks):
        grads: list[torch.Tensor | None] = [*task_grads[k], *([None] * (len(params) - n_shared))]
        after, _ = torch_step(model, inner, grads)
        delta = [a - p.detach() for a, p in zip(after[:n_shared], params[:n_shared], strict=True)]
        # AdamW decays decoupled; older torch has no "decoupled_weight_decay" key to say so
        decoupled = inner.defaults.get(
            "decoupled_weight_decay", isinstance(inner, torch.optim.AdamW)
        )
        if decoupled and inner.defaults["weight_decay"]:
            lr, wd = inner.defaults["lr"], inner.defaults["weight_decay"]
            delta = [d + lr * wd * p.detach() for d, p in zip(delta, params, strict=False)]
        vectors.append(delta if space == "update" else task_grads[k])
    flat = torch.stack([torch.cat([v.reshape(-1) for v in vec]) for vec in vectors]).double()
    expected_weights = get_strategy(strategy)(flat @ flat.T)
    combined = [
        sum(float(expected_weights[k]) * task_grads[k][i] for k in range(num_tasks))
        for i in range(n_shared)
    ]
    # Oracle state and (for the gradient space) parameters: torch stepped on g* and own heads.
    all_grads: list[torch.Tensor | None] = [*combined]  # type: ignore[list-item]
    for k in range(num_tasks):
        all_grads.extend(head_grads[k])
    expected_params, expected_opt = torch_step(model, inner, all_grads)
    if space == "update":
        # theta + sum_k alpha_k d_k, plus the decoupled weight decay once.
        theta = [p.detach() for p in params[:n_shared]]
        after_plain = expected_params[:n_shared]
        for i in range(n_shared):
            d = sum(float(expected_weights[k]) * (vectors[k][i]) for k in range(num_tasks))
            decay = 0.0
            if decoupled:
                decay = -inner.defaults["lr"] * inner.defaults["weight_decay"] * theta[i]
            expected_params[i] = theta[i] + d + decay
        assert len(after_plain) == n_shared
    pub.zero_grad()
    pub.backward(losses)
    pub.step()
    assert pub.weights is not None
    torch.testing.assert_close(pub.weights, expected_weights, rtol=1e-4, atol=1e-6)
    for p, q in zip(model.parameters(), expected_params, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-6)
    ref_state = expected_opt.state_dict()["state"]
    got_state = pub.optimizer.state_dict()["state"]
    for key in ref_state:
        for name, value in ref_state[key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got_state[key][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("factory", FACTORIES[:14], ids=IDS[:14])
def test_chunking_does_not_change_the_result(factory: OptimizerFactory) -> None:
    a, b = TwoTower(2, width=16), TwoTower(2, width=16)
    pa = PUB(factory(list(a.parameters())), "pareto", chunk_size=7)
    pb = PUB(factory(list(b.parameters())), "pareto")
    for step in range(5):
        x, y = batch(step)
        for model, opt in ((a, pa), (b, pb)):
            opt.zero_grad()
            opt.backward(model.losses(x, y))
            opt.step()
    _assert_close_params(a, b)


def test_task_specific_parameters_take_their_own_plain_step() -> None:
    """SGD, fixed weights: shared moves by -lr sum_k a_k g_k, head k by -lr g_k (own gradient)."""
    model = TwoTower(2)
    before = copy.deepcopy(model)
    pub = PUB(torch.optim.SGD(model.parameters(), lr=0.1), [3.0, 1.0])
    x, y = batch(0)
    losses = model.losses(x, y)
    shared = list(model.trunk.parameters())
    g = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    h = [
        torch.autograd.grad(loss, list(model.heads[k].parameters()), retain_graph=True)
        for k, loss in enumerate(losses)
    ]
    pub.zero_grad()
    pub.backward(losses)
    pub.step()
    for p, p0, g0, g1 in zip(
        model.trunk.parameters(), before.trunk.parameters(), g[0], g[1], strict=True
    ):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * (0.75 * g0 + 0.25 * g1))
    for k in range(2):
        for p, p0, gk in zip(
            model.heads[k].parameters(), before.heads[k].parameters(), h[k], strict=True
        ):
            torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * gk)
