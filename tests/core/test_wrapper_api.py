"""PUB behaves like a torch optimizer: state_dict, schedulers, clipping, param groups, stats."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mtl_fixtures import OptimizerFactory, TwoTower, batch, torch_step
from torch import Tensor

from pub_optim import PUB, BalanceStats


def _train(model: TwoTower, opt: PUB, steps: range, num_tasks: int = 2) -> None:
    for step in steps:
        x, y = batch(step, num_tasks)
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()


def test_is_a_torch_optimizer_proxying_groups_and_state() -> None:
    model = TwoTower()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    pub = PUB(inner)
    assert isinstance(pub, torch.optim.Optimizer)
    assert pub.param_groups is inner.param_groups
    assert pub.state is inner.state
    assert pub.defaults is inner.defaults
    _train(model, pub, range(2))
    assert len(pub.state) == len(list(model.parameters()))


@pytest.mark.parametrize("solve_every", [1, 3])
def test_save_and_load_mid_training_continues_identically(solve_every: int) -> None:
    straight = TwoTower()
    opt = PUB(torch.optim.AdamW(straight.parameters(), lr=1e-2), "pareto", solve_every=solve_every)
    _train(straight, opt, range(10))

    resumed = TwoTower()
    first = PUB(torch.optim.AdamW(resumed.parameters(), lr=1e-2), "pareto", solve_every=solve_every)
    _train(resumed, first, range(5))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = TwoTower(seed=123)
    fresh.load_state_dict(saved["model"])
    second = PUB(torch.optim.AdamW(fresh.parameters(), lr=1e-2), "pareto", solve_every=solve_every)
    second.load_state_dict(saved["opt"])
    _train(fresh, second, range(5, 10))
    for p, q in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.weights is not None and second.weights is not None
    assert torch.equal(opt.weights, second.weights)


def test_save_and_load_continues_pcgrad_random_sequence() -> None:
    """PCGrad's visiting orders are random for K >= 3: its generator is saved with PUB's state,
    so a resumed run draws the same orders (dropping it would restart the sequence from the
    seed, and the weights would differ, as the last lines check)."""
    from pub_optim.strategies import PCGrad

    k = 4

    def run(model: TwoTower, opt: PUB, steps: range) -> list[Tensor]:
        weights = []
        for step in steps:
            _train(model, opt, range(step, step + 1), k)
            assert opt.weights is not None
            weights.append(opt.weights.clone())
        return weights

    straight = TwoTower(k)
    opt = PUB(torch.optim.SGD(straight.parameters(), lr=0.1), PCGrad(seed=7), space="gradient")
    expected = run(straight, opt, range(8))

    resumed = TwoTower(k)
    first = PUB(torch.optim.SGD(resumed.parameters(), lr=0.1), PCGrad(seed=7), space="gradient")
    run(resumed, first, range(4))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": first.state_dict()}, buffer)

    def resume(keep_generator: bool) -> list[Tensor]:
        buffer.seek(0)
        saved = torch.load(buffer)
        if not keep_generator:
            del saved["opt"]["pub"]["balancer"]
        model = TwoTower(k, seed=123)
        model.load_state_dict(saved["model"])
        second = PUB(torch.optim.SGD(model.parameters(), lr=0.1), PCGrad(seed=7), space="gradient")
        second.load_state_dict(saved["opt"])
        return run(model, second, range(4, 8))

    for got, want in zip(resume(keep_generator=True), expected[4:], strict=True):
        assert torch.equal(got, want)
    restarted = resume(keep_generator=False)
    assert any(not torch.equal(a, b) for a, b in zip(restarted, expected[4:], strict=True))


def test_load_state_dict_of_another_strategy_changes_nothing() -> None:
    from pub_optim.strategies import PCGrad

    model = TwoTower(3)
    saver = PUB(torch.optim.Adam(model.parameters()), PCGrad(), space="gradient")
    _train(model, saver, range(2), 3)
    loader = PUB(torch.optim.Adam(model.parameters()), "pareto")
    with pytest.raises(ValueError, match="keeps no state"):
        loader.load_state_dict(saver.state_dict())
    assert len(loader.optimizer.state) == 0 and loader.state_dict()["pub"]["step"] == 0


def test_load_state_dict_rejects_a_plain_optimizer_state() -> None:
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="not a PUB state_dict"):
        pub.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def test_lr_scheduler_drives_the_wrapped_optimizer() -> None:
    model = TwoTower()
    pub = PUB(torch.optim.SGD(model.parameters(), lr=0.1), "equal")
    scheduler = torch.optim.lr_scheduler.StepLR(pub, step_size=1, gamma=0.5)
    for step in range(3):
        x, y = batch(step)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        before = [p.detach().clone() for p in model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        lr = pub.param_groups[0]["lr"]
        pub.step()
        scheduler.step()
        # "equal" on SGD = SGD on the mean of the per-task gradients for the shared trunk.
        trunk = list(model.trunk.parameters())
        for p, p0, g in zip(model.parameters(), before, grads, strict=True):
            expected = p0 - lr * (g / 2 if any(p is t for t in trunk) else g)
            torch.testing.assert_close(p.detach(), expected)
    assert pub.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_gradient_clipping_between_backward_and_step_is_honoured() -> None:
    """clip_grad_norm_ scales every .grad by c: shared and task-specific steps scale by c."""
    model = TwoTower()
    pub = PUB(torch.optim.SGD(model.parameters(), lr=0.1), [0.5, 0.5])
    x, y = batch(0)
    losses = model.losses(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    pub.zero_grad()
    pub.backward(losses)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    total = torch.sqrt(sum((g**2).sum() for g in grads))
    max_norm = float(total) / 10
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    pub.step()
    scale = max_norm / (float(total) + 1e-6)
    trunk_ids = {id(p) for p in model.trunk.parameters()}
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        weight = 0.5 if id(p) in trunk_ids else 1.0
        torch.testing.assert_close(p.detach(), p0 - 0.1 * scale * weight * g)


def test_add_param_group_is_stepped() -> None:
    model = TwoTower()
    extra = torch.nn.Parameter(torch.ones(3))
    pub = PUB(torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, pub, range(1))
    pub.add_param_group({"params": [extra], "lr": 0.5})
    x, y = batch(1)
    losses = model.losses(x, y)
    pub.zero_grad()
    pub.backward([losses[0] + extra.sum(), losses[1]])
    pub.step()
    torch.testing.assert_close(extra.detach(), torch.full((3,), 0.5))


def test_accumulating_two_backward_calls_equals_one_on_summed_losses() -> None:
    a, b = TwoTower(), TwoTower()
    pa = PUB(torch.optim.Adam(a.parameters(), lr=1e-2))
    pb = PUB(torch.optim.Adam(b.parameters(), lr=1e-2))
    x1, y1 = batch(0)
    x2, y2 = batch(1)
    pa.zero_grad()
    pa.backward(a.losses(x1, y1))
    pa.backward(a.losses(x2, y2))
    pa.step()
    pb.zero_grad()
    la, lb = b.losses(x1, y1), b.losses(x2, y2)
    pb.backward([la[0] + lb[0], la[1] + lb[1]])
    pb.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_stats_are_readable_for_logging() -> None:
    model = TwoTower(3)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), "min-norm")
    x, y = batch(0, 3)
    pub.zero_grad()
    pub.backward(
        {"a": model.losses(x, y)[0], "b": model.losses(x, y)[1], "c": model.losses(x, y)[2]}
    )
    pub.step()
    stats = pub.last_stats
    assert isinstance(stats, BalanceStats)
    assert stats.task_names == ("a", "b", "c")
    assert stats.solved and stats.step == 1
    torch.testing.assert_close(stats.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(torch.diagonal(stats.cosines), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(stats.update_norms**2, torch.diagonal(stats.gram))
    logged = stats.as_dict()
    assert set(logged) == {
        "pub/weight/a",
        "pub/weight/b",
        "pub/weight/c",
        "pub/update_norm/a",
        "pub/update_norm/b",
        "pub/update_norm/c",
        "pub/cosine/a~b",
        "pub/cosine/a~c",
        "pub/cosine/b~c",
    }
    assert all(-1.0 - 1e-9 <= logged[k] <= 1.0 + 1e-9 for k in logged if "cosine" in k)


def test_solve_every_weighted_gradient_mode_is_the_plain_step_on_the_weighted_gradient() -> None:
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), "pareto", solve_every=4)
    _train(model, pub, range(1))
    assert pub.weights is not None
    weights = pub.weights.clone()
    x, y = batch(1)
    losses = model.losses(x, y)
    shared = list(model.trunk.parameters())
    g = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    heads = [
        torch.autograd.grad(loss, list(model.heads[k].parameters()), retain_graph=True)
        for k, loss in enumerate(losses)
    ]
    combined = [float(weights[0]) * a + float(weights[1]) * b for a, b in zip(*g, strict=True)]
    expected, _ = torch_step(model, pub.optimizer, [*combined, *heads[0], *heads[1]])
    pub.zero_grad()
    pub.backward(losses)
    pub.step()
    assert torch.equal(pub.weights, weights)
    assert pub.last_stats is not None and not pub.last_stats.solved
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_solve_every_reuse_mode_keeps_weights_and_resolves_on_schedule() -> None:
    model = TwoTower()
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        "pareto",
        solve_every=3,
        between_solves="reuse_weights",
    )
    history = []
    for step in range(7):
        _train(model, pub, range(step, step + 1))
        assert pub.last_stats is not None
        history.append((pub.last_stats.solved, pub.weights.clone()))  # type: ignore[union-attr]
    assert [solved for solved, _ in history] == [True, False, False, True, False, False, True]
    assert torch.equal(history[0][1], history[2][1])
    assert not torch.equal(history[2][1], history[3][1])


@settings(max_examples=15, deadline=None)
@given(num_tasks=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_min_norm_joint_update_never_opposes_a_task_update(num_tasks: int, seed: int) -> None:
    """MGDA on updates: <sum_k alpha_k d_k, d_j> >= 0 for every task j (pub-method.md)."""
    model = TwoTower(num_tasks, seed=seed)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), "min-norm")
    _train(model, pub, range(seed % 3), num_tasks)
    x, y = batch(seed, num_tasks)
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    before = [p.detach().clone() for p in model.trunk.parameters()]
    pub.step()
    stats = pub.last_stats
    assert stats is not None
    projections = stats.gram @ stats.weights
    assert bool((projections >= -1e-9 * stats.gram.diagonal().max()).all())
    # And the applied shared step really is sum_k alpha_k d_k: its squared norm is a^T G a.
    applied = torch.cat(
        [
            (p.detach() - b).reshape(-1)
            for p, b in zip(model.trunk.parameters(), before, strict=True)
        ]
    ).double()
    torch.testing.assert_close(applied @ applied, stats.weights @ projections, rtol=1e-3, atol=0)


def test_deepcopy_and_repr() -> None:
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters()), "equal-magnitude", space="gradient")
    assert "equal-magnitude" in repr(pub).lower() or "EqualMagnitude" in repr(pub)
    twin = copy.deepcopy(pub)
    assert twin.optimizer is not pub.optimizer


def test_uniform_grad_change_reaches_per_task_gradients_that_cancel() -> None:
    """A GradScaler-style unscale (grad *= 1/S) must also rescale per-task gradients that sum to
    exactly zero (their sum gives no elementwise ratio)."""
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    pub = PUB(torch.optim.SGD([shared], lr=1.0), [0.75, 0.25], shared_params=[shared])
    scale = 1024.0
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])  # the two tasks cancel on the last two entries
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    losses = [scale * (shared * x).sum(), scale * (shared * (x * mask - x * (1 - mask))).sum()]
    before = shared.detach().clone()
    pub.zero_grad()
    pub.backward(losses)
    assert shared.grad is not None
    shared.grad.mul_(1.0 / scale)  # what GradScaler.unscale_ does to .grad
    pub.step()
    g1, g2 = x, x * mask - x * (1 - mask)
    expected = before - (0.75 * g1 + 0.25 * g2)
    torch.testing.assert_close(shared.detach(), expected)


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_grad_scaler_unscale_reaches_the_per_task_gradients(factory: OptimizerFactory) -> None:
    """torch's GradScaler unscales ``.grad`` with a kernel that does not bump the version counter
    (``_amp_foreach_non_finite_check_and_unscale_``); the per-task gradients must be unscaled
    all the same. Power-of-two scales (growing every 2 steps here) are exact, so training with
    the scaler is bit-identical to training without it, parameters and optimizer state."""
    plain_model, scaled_model = TwoTower(2), TwoTower(2)
    plain = PUB(factory(list(plain_model.parameters())), "pareto")
    scaled = PUB(factory(list(scaled_model.parameters())), "pareto")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for step in range(6):
        x, y = batch(step)
        plain.zero_grad()
        plain.backward(plain_model.losses(x, y))
        plain.step()
        scaled.zero_grad()
        scaled.backward([scaler.scale(loss) for loss in scaled_model.losses(x, y)])
        scaler.step(scaled)
        scaler.update()
    assert scaler.get_scale() == 2.0**13  # it grew: several scales were exercised
    for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, state in plain.optimizer.state_dict()["state"].items():
        other = scaled.optimizer.state_dict()["state"][key]
        for field, value in state.items():
            assert torch.equal(other[field], value), field


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05, amsgrad=True),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
        lambda p: torch.optim.NAdam(p, lr=1e-2),  # the generic path
    ],
    ids=["sgd-nesterov-wd", "adam-l2-amsgrad", "rmsprop-centered", "nadam"],
)
def test_gradient_space_is_the_optimizers_own_step_on_the_weighted_gradient(
    factory: OptimizerFactory,
) -> None:
    """``space="gradient"``: the shared parameters step on ``sum_k alpha_k g_k`` and the heads
    on their own gradients, exactly as the plain optimizer does when handed those gradients
    (per-task gradients from separate autograd calls on a twin model); ``.grad`` still holds the
    per-task sum afterwards."""
    model = TwoTower(3, width=6).double()
    twin = copy.deepcopy(model)
    opt = PUB(factory(list(model.parameters())), "min-norm", space="gradient")
    plain = factory(list(twin.parameters()))
    shared = list(twin.trunk.parameters())
    for step in range(4):
        x, y = batch(step, 3)
        opt.zero_grad()
        opt.backward(model.losses(x.double(), y.double()))
        opt.step()
        assert opt.weights is not None
        alpha = opt.weights.tolist()
        per_task = [
            torch.autograd.grad(loss, shared, retain_graph=True)
            for loss in twin.losses(x.double(), y.double())
        ]
        plain.zero_grad()
        for i, p in enumerate(shared):
            p.grad = sum(a * g[i] for a, g in zip(alpha, per_task, strict=True))  # type: ignore[assignment]
        for k, head in enumerate(twin.heads):
            own = list(head.parameters())
            loss = twin.losses(x.double(), y.double())[k]
            for p, g in zip(own, torch.autograd.grad(loss, own), strict=True):
                p.grad = g
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for p, grads in zip(model.trunk.parameters(), zip(*per_task, strict=True), strict=True):
            torch.testing.assert_close(p.grad, sum(grads), rtol=1e-12, atol=1e-14)
