"""``state="per_task"``, ``space="marginal"`` and the diagnostics, against torch's own optimizers.

Invariants (``docs/method.md``): with one task, or K identical tasks, every ``state`` x ``space``
is the wrapped optimizer's own step; with SGD momentum the marginal space's weights are the
gradient space's; with one Adam state per task a task's loss scale does not change the trajectory;
in the marginal space a task with a zero gradient gets weight 0; per-task states resume
bit-identically. The diagnostics are checked against look-aheads taken by deep copies of the torch
optimizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mtl_fixtures import (
    OPTIMIZERS,
    OptimizerFactory,
    TwoTower,
    assert_state_equal,
    batch,
)
from torch import nn

from pub_optim import PUB

IDS = [name for name, _ in OPTIMIZERS]
FACTORIES = [factory for _, factory in OPTIMIZERS]
COMBINATIONS = [("shared", "marginal"), ("per_task", "update"), ("per_task", "marginal")]


def _close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("state", "space"), COMBINATIONS)
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_identical_tasks_equal_the_wrapped_optimizer(
    factory: OptimizerFactory, num_tasks: int, state: str, space: str
) -> None:
    reference, model = TwoTower(1), TwoTower(1)
    ref_opt = factory(list(reference.parameters()))
    pub = PUB(
        factory(list(model.parameters())),
        "pareto",
        state=state,  # type: ignore[arg-type]
        space=space,  # type: ignore[arg-type]
        shared_params=list(model.parameters()),  # the head too: every task reaches it
    )
    for step in range(8):
        x, y = batch(step, 1)
        ref_opt.zero_grad()
        reference.losses(x, y)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(x, y)[0]
        pub.backward([loss * 1.0 for _ in range(num_tasks)])
        pub.step()
        expected = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
        assert pub.weights is not None
        torch.testing.assert_close(pub.weights, expected)
    _close(reference, model)
    if state == "per_task":  # every task's state is the plain optimizer's state of the trunk
        assert pub._task_states is not None
        for store in pub._task_states.stores:
            for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
                for name, value in ref_opt.state[p_ref].items():
                    if isinstance(value, torch.Tensor):
                        torch.testing.assert_close(store[p][name], value, rtol=1e-5, atol=1e-6)
                    else:
                        assert store[p][name] == value


@pytest.mark.parametrize("strategy", ["pareto", "min-norm", "equal-magnitude"])
@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
    ],
    ids=["dampening", "nesterov-wd"],
)
def test_sgd_momentum_marginal_weights_are_gradient_weights(strategy: str, options: dict) -> None:
    """``d_k - d_0 = -lr (1 - dampening) g_k`` (times ``1 + momentum`` with Nesterov; ``-lr g_k``
    on the first step): a fixed multiple of the gradient, so the same weights and the same
    trajectory as the gradient space (plain SGD on the balanced gradient)."""
    marginal_model, gradient_model = TwoTower(2), TwoTower(2)
    marginal = PUB(
        torch.optim.SGD(marginal_model.parameters(), lr=0.05, **options), strategy, space="marginal"
    )
    gradient = PUB(
        torch.optim.SGD(gradient_model.parameters(), lr=0.05, **options), strategy, space="gradient"
    )
    for step in range(10):
        x, y = batch(step, 2)
        for model, pub in ((marginal_model, marginal), (gradient_model, gradient)):
            pub.zero_grad()
            pub.backward(model.losses(x, y))
            pub.step()
        assert marginal.weights is not None and gradient.weights is not None
        torch.testing.assert_close(marginal.weights, gradient.weights, rtol=1e-5, atol=1e-7)
    _close(marginal_model, gradient_model)


def _scaled_run(factor: float, state: str, steps: int = 6) -> tuple[list[torch.Tensor], list]:
    model = TwoTower(2).double()
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-30),
        "pareto",
        state=state,  # type: ignore[arg-type]
    )
    weights = []
    for step in range(steps):
        x, y = batch(step, 2)
        losses = model.losses(x.double(), y.double())
        pub.zero_grad()
        pub.backward([losses[0] * factor, losses[1]])
        pub.step()
        assert pub.weights is not None
        weights.append(pub.weights.clone())
    return [p.detach().clone() for p in model.parameters()], weights


@settings(max_examples=12, deadline=None)
@given(exponent=st.floats(-3.0, 3.0))
def test_per_task_adam_is_invariant_to_a_task_loss_scale(exponent: float) -> None:
    base_params, base_weights = _scaled_run(1.0, "per_task")
    params, weights = _scaled_run(10.0**exponent, "per_task")
    for p, q in zip(params, base_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for w, v in zip(weights, base_weights, strict=True):
        torch.testing.assert_close(w, v, rtol=1e-9, atol=1e-12)


def test_shared_adam_is_not_invariant_to_a_task_loss_scale() -> None:
    """The contrast that makes the invariance above a property of the per-task state: with the
    shared state, scaling one loss by 100 moves the weights."""
    _, base = _scaled_run(1.0, "shared")
    _, scaled = _scaled_run(100.0, "shared")
    assert max(float((w - v).abs().max()) for w, v in zip(scaled, base, strict=True)) > 1e-2


class _DeadTask(nn.Module):
    """Two tasks on a shared layer; the second task's loss reaches the shared layer with a zero
    gradient (multiplied by zero), and trains its own head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(5, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = torch.tanh(self.shared(x))
        live = (self.heads[0](z).squeeze(-1) - y[:, 0]).pow(2).mean()
        dead = (self.heads[1](z * 0.0).squeeze(-1) - y[:, 1]).pow(2).mean()
        return [live, dead]


@pytest.mark.parametrize("strategy", ["pareto", "min-norm", "equal-magnitude"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.NAdam(p, lr=1e-2),
    ],
    ids=["adam", "sgd-momentum", "nadam-generic"],
)
@pytest.mark.parametrize("state", ["shared", "per_task"])
def test_marginal_space_gives_a_task_with_zero_gradient_weight_zero(
    factory: OptimizerFactory, strategy: str, state: str
) -> None:
    model = _DeadTask()
    pub = PUB(
        factory(list(model.parameters())),
        strategy,
        space="marginal",
        state=state,  # type: ignore[arg-type]
        shared_params=list(model.shared.parameters()),
    )
    for step in range(6):
        x, y = batch(step, 2)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
        assert pub.weights is not None and pub.weights.tolist() == [1.0, 0.0]


def test_update_space_gives_the_zero_gradient_task_weight_under_momentum() -> None:
    """What the marginal space is for: with the shared state, from step 2 on the dead task's
    look-ahead is the momentum step, and the update space gives it weight."""
    model = _DeadTask()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), "pareto")
    for step in range(4):
        x, y = batch(step, 2)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
    assert pub.weights is not None and float(pub.weights[1]) > 0.1


# --------------------------------------------------------------------------- combinations
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state": "per_task", "space": "gradient"}, "space='update' or 'marginal'"),
        ({"state": "per_task", "sync_free": True}, "sync_free"),
        ({"state": "per_task", "solve_every": 5}, "reuse_weights"),
        ({"state": "both"}, "state must be one of"),
        ({"space": "updates"}, "space must be one of"),
    ],
)
def test_unsupported_combinations_are_refused_at_construction(kwargs: dict, match: str) -> None:
    model = TwoTower(2)
    with pytest.raises(ValueError, match=match):
        PUB(torch.optim.Adam(model.parameters()), **kwargs)


def test_per_task_with_solve_every_reuses_weights() -> None:
    model = TwoTower(2)
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        state="per_task",
        solve_every=3,
        between_solves="reuse_weights",
    )
    solved = []
    for step in range(6):
        x, y = batch(step, 2)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
        assert pub.last_stats is not None
        solved.append(pub.last_stats.solved)
    assert solved == [True, False, False, True, False, False]


@pytest.mark.parametrize("space", ["update", "marginal"])
def test_fused_kernels_give_the_eager_weights_in_every_space(space: str) -> None:
    runs = {}
    for fused in (False, True):
        model = TwoTower(2)
        pub = PUB(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            space=space,  # type: ignore[arg-type]
            diagnostics=True,
            fused=fused,
        )
        history = []
        for step in range(4):
            x, y = batch(step, 2)
            pub.zero_grad()
            pub.backward(model.losses(x, y))
            pub.step()
            assert pub.weights is not None and pub.last_stats is not None
            history.append((pub.weights.clone(), pub.last_stats))
        runs[fused] = (history, [p.detach().clone() for p in model.parameters()])
        assert pub._engine is not None and not pub._engine.fused_failed
    for (w_eager, s_eager), (w_fused, s_fused) in zip(runs[False][0], runs[True][0], strict=True):
        torch.testing.assert_close(w_eager, w_fused, rtol=1e-5, atol=1e-6)
        d_eager, d_fused = s_eager.diagnostics, s_fused.diagnostics
        assert d_eager is not None and d_fused is not None
        for name in ("drift_cosine", "attributable", "gradient_norms", "marginal_norms"):
            torch.testing.assert_close(
                getattr(d_eager, name), getattr(d_fused, name), rtol=1e-4, atol=1e-7
            )
    for p, q in zip(runs[False][1], runs[True][1], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- diagnostics
def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


@pytest.mark.parametrize("state", ["shared", "per_task"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.NAdam(p, lr=1e-2),
    ],
    ids=["adam", "sgd-momentum", "nadam-generic"],
)
def test_diagnostics_match_lookaheads_taken_by_torch(factory: OptimizerFactory, state: str) -> None:
    """Per task: ``d_k`` = a deep copy of the torch optimizer stepped on ``g_k`` (from task
    ``k``'s own state with ``per_task``), ``d_0`` = stepped on zeros; gradient norms and cosines
    from the gradients themselves."""
    model = TwoTower(2)
    pub = PUB(
        factory(list(model.parameters())),
        state=state,  # type: ignore[arg-type]
        diagnostics=True,
        shared_params=list(model.trunk.parameters()),
    )
    trunk = list(model.trunk.parameters())
    for step in range(3):
        x, y = batch(step, 2)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
    x, y = batch(3, 2)
    losses = model.losses(x, y)
    grads = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    updates, drifts = [], []
    for k in range(2):
        for target, g in ((updates, grads[k]), (drifts, [torch.zeros_like(t) for t in grads[k]])):
            twin_model, twin_opt = copy.deepcopy((model, pub.optimizer))
            twins = list(twin_model.parameters())
            if state == "per_task":  # task k's own state of the trunk
                assert pub._task_states is not None
                for p in trunk:
                    store = pub._task_states.stores[k][p]
                    twin_opt.state[twins[index[id(p)]]] = copy.deepcopy(store)
            for twin in twins:
                twin.grad = None
            for p, gp in zip(trunk, g, strict=True):
                twins[index[id(p)]].grad = gp.clone()
            twin_opt.step()
            target.append(_flat([twins[index[id(p)]].detach() - p.detach() for p in trunk]))
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    pub.step()
    assert pub.last_stats is not None
    diag = pub.last_stats.diagnostics
    assert diag is not None and diag.drift_cosine is not None and diag.attributable is not None
    g = [_flat(list(gk)) for gk in grads]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert diag.gradient_norms is not None and diag.gradient_cosines is not None
    torch.testing.assert_close(
        diag.gradient_norms, torch.stack([gk.norm() for gk in g]), rtol=1e-5, atol=0
    )
    assert abs(float(diag.gradient_cosines[0, 1]) - cos(g[0], g[1])) < 1e-5
    for k in range(2):
        assert abs(float(diag.drift_cosine[k]) - cos(updates[k], drifts[k])) < 1e-4
        expected = float((updates[k] - drifts[k]).norm() / updates[k].norm())
        assert abs(float(diag.attributable[k]) - expected) < 1e-4
    assert 0.0 <= diag.weights_from_equal <= 0.5
    logged = pub.last_stats.as_dict()
    assert {"pub/drift_cosine/task0", "pub/attributable/task1", "pub/weights_from_equal"} <= set(
        logged
    )


def test_diagnostics_show_the_drift_of_a_scaled_task() -> None:
    """The worked example of the docs: one task's loss x100 under Adam; the gradients are far
    apart in norm, the shared-state updates are mostly drift after a few steps."""
    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-3), diagnostics=True)
    for step in range(30):
        x, y = batch(step, 2)
        losses = model.losses(x, y)
        pub.zero_grad()
        pub.backward([losses[0] * 100.0, losses[1]])
        pub.step()
    assert pub.last_stats is not None and pub.last_stats.diagnostics is not None
    diag = pub.last_stats.diagnostics
    assert diag.gradient_norms is not None and diag.update_norms is not None
    assert diag.drift_cosine is not None
    gradient_ratio = float(diag.gradient_norms.max() / diag.gradient_norms.min())
    update_ratio = float(diag.update_norms.max() / diag.update_norms.min())
    assert gradient_ratio > 10 * update_ratio
    assert float(diag.drift_cosine.min()) > 0.5


# ------------------------------------------------------------------------------ state_dict
def _train(pub: PUB, model: TwoTower, steps: range) -> None:
    for step in steps:
        x, y = batch(step, 2)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()


@pytest.mark.parametrize("space", ["update", "marginal"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.Adagrad(p, lr=0.05),
        lambda p: torch.optim.NAdam(p, lr=1e-2),
    ],
    ids=["adam-amsgrad", "adagrad", "nadam-generic"],
)
def test_per_task_states_resume_bit_identically(factory: OptimizerFactory, space: str) -> None:
    def make() -> tuple[TwoTower, PUB]:
        model = TwoTower(2)
        return model, PUB(
            factory(list(model.parameters())),
            space=space,  # type: ignore[arg-type]
            state="per_task",
        )

    model, pub = make()
    _train(pub, model, range(4))
    saved = copy.deepcopy(pub.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    _train(pub, model, range(4, 8))
    resumed_model, resumed = make()
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    _train(resumed, resumed_model, range(4, 8))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_state_equal(pub.state_dict(), resumed.state_dict())


@pytest.mark.parametrize(("written", "loaded"), [("shared", "per_task"), ("per_task", "shared")])
def test_a_checkpoint_of_another_state_is_refused_with_nothing_changed(
    written: str, loaded: str
) -> None:
    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), state=written)  # type: ignore[arg-type]
    _train(pub, model, range(2))
    other_model = TwoTower(2)
    other = PUB(torch.optim.Adam(other_model.parameters(), lr=1e-2), state=loaded)  # type: ignore[arg-type]
    _train(other, other_model, range(3))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=f"state={written!r}"):
        other.load_state_dict(pub.state_dict())
    assert_state_equal(other.state_dict(), before)


def test_state_dict_is_in_torch_format_and_the_old_layout_still_loads() -> None:
    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(pub, model, range(3))
    state = pub.state_dict()
    assert {"state", "param_groups", "pub"} <= set(state)
    # A plain optimizer reads it.
    plain = torch.optim.Adam(TwoTower(2).parameters(), lr=1e-2)
    plain.load_state_dict(copy.deepcopy(state))  # the "pub" part is ignored by torch
    assert_state_equal(plain.state_dict()["state"], pub.optimizer.state_dict()["state"])
    # The layout written before: {"optimizer": ..., "pub": ...}.
    old = {"optimizer": pub.optimizer.state_dict(), "pub": state["pub"]}
    again = PUB(torch.optim.Adam(TwoTower(2).parameters(), lr=1e-2))
    again.load_state_dict(copy.deepcopy(old))
    assert_state_equal(again.state_dict(), pub.state_dict())


def test_torch_distributed_checkpoint_reads_the_state_dict() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(pub, model, range(2))
    state = get_optimizer_state_dict(model, pub)
    assert "trunk.0.weight" in state["state"]
    torch.testing.assert_close(
        state["state"]["trunk.0.weight"]["exp_avg"],
        pub.optimizer.state[model.trunk[0].weight]["exp_avg"],
    )


def test_state_dict_hooks_registered_on_pub_are_called() -> None:
    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(pub, model, range(1))
    calls: list[str] = []
    pub.register_state_dict_pre_hook(lambda opt: calls.append("pre"))

    def post(opt: object, state: dict) -> dict:
        calls.append("post")
        state["extra"] = 1
        return state

    pub.register_state_dict_post_hook(post)
    pub.register_load_state_dict_pre_hook(lambda opt, state: calls.append("load-pre"))
    pub.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    state = pub.state_dict()
    assert state["extra"] == 1
    pub.load_state_dict(state)
    assert calls == ["pre", "post", "load-pre", "load-post"]


def test_one_task_with_its_own_state_advances_with_its_own_gradient() -> None:
    """Unnormalised weights (the step is alpha_0 d_0): the task's state still advances with g_0,
    as every per-task state does; only the applied update is weighted."""
    from pub_optim.strategies import Fixed

    model = TwoTower(1)
    x, y = batch(0, 1)
    params = list(model.parameters())
    grads = torch.autograd.grad(model.losses(x, y)[0], params)
    pub = PUB(
        torch.optim.Adam(params, lr=1e-2),
        Fixed([0.5], normalization="none"),
        state="per_task",
        shared_params=params,
        fused=False,
    )
    before = [p.detach().clone() for p in params]
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    pub.step()
    assert pub._task_states is not None
    store = pub._task_states.stores[0]
    for p, g, b in zip(params, grads, before, strict=True):
        torch.testing.assert_close(store[p]["exp_avg"], 0.1 * g)  # (1 - beta1) g_0
        # the first Adam step is -lr sign(g) (to eps): half of it applied
        torch.testing.assert_close(p.detach() - b, -0.5e-2 * torch.sign(g), atol=1e-6, rtol=0)
