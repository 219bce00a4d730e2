"""``PUB(sync_free=True)``: the step without host-device synchronisation.

Three things are pinned here. It trains like the default (host-solver) step: same parameters and
state over 20 steps for every exact transform and every strategy with a device solver. Neither
:meth:`PUB.backward` nor :meth:`PUB.step` reads a tensor value on the host once training is under
way (checked on CPU tensors with ``sync_guard.no_host_reads``, and on a GPU, when there is one,
with ``torch.cuda.set_sync_debug_mode("error")``). A non-finite loss or gradient skips the step on
the device: parameters and optimizer state keep their values (the step counters advance, as
documented).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from mtl_fixtures import OPTIMIZERS, TwoTower, assert_state_equal, batch
from sync_guard import no_host_reads

from pub_optim import PUB

EXACT = [(name, factory) for name, factory in OPTIMIZERS if "generic" not in name]
STRATEGIES = ["pareto", "min-norm", "equal-magnitude", "equal", (3.0, 1.0)]


def _host_values(pub: PUB) -> list[torch.Tensor]:
    """Tensors that stay on the host on CUDA too (torch's step counters): allowed reads."""
    return [s["step"] for s in pub.state.values() if isinstance(s.get("step"), torch.Tensor)]


def _train(pub: PUB, model: TwoTower, steps: int, first: int = 0, guard: bool = False) -> None:
    device = next(model.parameters()).device
    for step in range(first, first + steps):
        x, y = (t.to(device) for t in batch(step))
        pub.zero_grad()
        losses = model.losses(x, y)
        if guard:
            with no_host_reads(_host_values(pub)):
                pub.backward(losses)
                pub.step()
        else:
            pub.backward(losses)
            pub.step()


def _pair(factory, strategy, **kwargs) -> tuple[TwoTower, PUB, TwoTower, PUB]:
    host_model, free_model = TwoTower(), TwoTower()
    host = PUB(factory(list(host_model.parameters())), strategy, **kwargs)
    free = PUB(factory(list(free_model.parameters())), strategy, sync_free=True, **kwargs)
    return host_model, host, free_model, free


def _assert_close(model_a, pub_a, model_b, pub_b, atol: float) -> None:
    """Parameters within ``atol``; each state tensor within 1e-5 of its own largest magnitude
    (second moments are ~1e-4, momentum buffers cross zero: a fixed atol would be vacuous for the
    first and a relative one meaningless for the second). Measured: <= 3.5e-6 over the grid."""
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0.0, atol=atol)
    state_a, state_b = pub_a.optimizer.state_dict()["state"], pub_b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys()
        for name, value in state_a[key].items():
            other = state_b[key][name]
            if name == "step" or not isinstance(value, torch.Tensor):
                assert float(value) == float(other)
                continue
            scale = float(value.abs().max())
            torch.testing.assert_close(value, other, rtol=0.0, atol=1e-5 * scale + 1e-30)


@pytest.mark.parametrize(("name", "factory"), EXACT, ids=[n for n, _ in EXACT])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_trains_like_the_host_step(name, factory, strategy):
    host_model, host, free_model, free = _pair(factory, strategy)
    _train(host, host_model, 20)
    _train(free, free_model, 20)
    # float32 parameters (measured <= ~1e-7 apart); the device solvers agree with the host ones
    # to ~1e-9 in the weights, and the task-specific parameters step through the transform
    # rather than torch's kernel.
    _assert_close(host_model, host, free_model, free, atol=1e-6)
    torch.testing.assert_close(free.weights, host.weights, rtol=0.0, atol=1e-6)
    assert not bool(free.last_step_skipped)


@pytest.mark.parametrize("strategy", ["pareto", "min-norm"])
def test_gradient_space_trains_like_the_host_step(strategy):
    factory = dict(OPTIMIZERS)["adam-l2-amsgrad"]
    host_model, host, free_model, free = _pair(factory, strategy, space="gradient")
    _train(host, host_model, 20)
    _train(free, free_model, 20)
    _assert_close(host_model, host, free_model, free, atol=1e-6)


def test_accumulated_backward_calls_train_like_the_host_step():
    host_model, host, free_model, free = _pair(lambda p: torch.optim.Adam(p, lr=1e-2), "pareto")
    for model, pub in ((host_model, host), (free_model, free)):
        for step in range(0, 12, 2):
            pub.zero_grad()
            for micro in (step, step + 1):
                x, y = batch(micro)
                pub.backward(model.losses(x, y))
            pub.step()
    _assert_close(host_model, host, free_model, free, atol=1e-6)


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_resumed_run_continues_with_the_saved_weights(device):
    # Between solves the step reuses the weights: after load_state_dict they come from the
    # checkpoint (a CPU tensor, moved to the parameters' device once), and the resumed run
    # continues as the uninterrupted one.
    def make(seed: int = 0) -> tuple[TwoTower, PUB]:
        model = TwoTower(seed=seed).to(device)
        pub = PUB(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            solve_every=3,
            between_solves="reuse_weights",
            sync_free=True,
        )
        return model, pub

    straight_model, straight = make()
    _train(straight, straight_model, 8)
    first_model, first = make()
    _train(first, first_model, 4)
    saved = copy.deepcopy({"model": first_model.state_dict(), "opt": first.state_dict()})
    resumed_model, resumed = make(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    _train(resumed, resumed_model, 4, first=4)  # step 5 reuses the weights solved at step 4
    for p, q in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize(("name", "factory"), EXACT, ids=[n for n, _ in EXACT])
@pytest.mark.parametrize("space", ["update", "gradient"])
def test_backward_and_step_read_nothing_on_the_host(name, factory, space):
    model = TwoTower()
    pub = PUB(factory(list(model.parameters())), "pareto", space=space, sync_free=True)
    _train(pub, model, 1)  # the first step creates the state (and may copy constants once)
    _train(pub, model, 3, first=1, guard=True)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_every_device_strategy_reads_nothing_on_the_host(strategy):
    model = TwoTower(num_tasks=3)
    weights = (3.0, 1.0, 1.0) if isinstance(strategy, tuple) else strategy
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), weights, sync_free=True)
    x, y = batch(0, num_tasks=3)
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    pub.step()
    for step in range(1, 4):
        x, y = batch(step, num_tasks=3)
        pub.zero_grad()
        losses = model.losses(x, y)
        with no_host_reads(_host_values(pub)):
            pub.backward(losses)
            pub.step()
    assert not bool(pub.last_step_skipped)


def test_reuse_weights_between_solves_reads_nothing_on_the_host():
    model = TwoTower()
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        solve_every=3,
        between_solves="reuse_weights",
        sync_free=True,
    )
    _train(pub, model, 1)
    _train(pub, model, 5, first=1, guard=True)
    assert pub.last_stats is not None and pub.last_stats.solved is False


def test_the_guard_sees_the_default_step_read_the_host():
    # The check above can fail: the default step solves on the host.
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(pub, model, 1)
    with pytest.raises(AssertionError, match="host read"):
        _train(pub, model, 1, first=1, guard=True)


@pytest.mark.parametrize("where", ["loss", "shared", "task-specific"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum-dampening", "rmsprop-centered"])
def test_non_finite_values_skip_the_step_on_the_device(where, optimizer):
    factory = dict(OPTIMIZERS)[optimizer]
    model = TwoTower()
    pub = PUB(factory(list(model.parameters())), sync_free=True)
    _train(pub, model, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(pub.optimizer.state_dict())
    weights = pub.weights.clone()  # type: ignore[union-attr]
    x, y = batch(7)
    pub.zero_grad()
    losses = model.losses(x, y)
    if where == "loss":
        losses[1] = losses[1] * float("nan")
    with no_host_reads(_host_values(pub)):
        pub.backward(losses)
        target = model.trunk[0].weight if where == "shared" else model.heads[1].bias
        if where != "loss":
            with torch.no_grad():
                target.grad[0] = float("inf")  # type: ignore[index]
        pub.step()
    assert bool(pub.last_step_skipped)
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), q)
    # Everything but the step counters, which advance on the host (documented).
    def without_steps(saved: dict) -> dict:  # (state_dict() shares the live state's dicts)
        return {k: {n: v for n, v in s.items() if n != "step"} for k, s in saved["state"].items()}

    after = pub.optimizer.state_dict()
    assert_state_equal(without_steps(after), without_steps(state))
    assert_state_equal(after["param_groups"], state["param_groups"])
    assert torch.equal(pub.weights, weights)  # type: ignore[arg-type]
    _train(pub, model, 2, first=8)  # and training goes on
    assert not bool(pub.last_step_skipped)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("change", ["clip_grad_norm", "grad_scaler"])
def test_changes_to_grad_between_backward_and_step_are_carried_over(change):
    # GradScaler.unscale_ changes .grad without bumping its version: the norm ratio catches it.
    host_model, host, free_model, free = _pair(lambda p: torch.optim.Adam(p, lr=1e-2), "pareto")
    for model, pub in ((host_model, host), (free_model, free)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(8):
            x, y = batch(step)
            pub.zero_grad()
            losses = model.losses(x, y)
            if change == "grad_scaler":
                pub.backward([scaler.scale(loss) for loss in losses])
                scaler.unscale_(pub)
                scaler.step(pub)
                scaler.update()
            else:
                pub.backward(losses)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                pub.step()
    _assert_close(host_model, host, free_model, free, atol=1e-6)


def _amp_run(
    pub: PUB, model: TwoTower, scaler, steps: range, clip: bool, guard: bool, boost: float = 1.0
) -> None:
    for step in steps:
        x, y = batch(step)
        pub.zero_grad()
        with no_host_reads(_host_values(pub)) if guard else contextlib.nullcontext():
            losses = [scaler.scale(loss * boost) for loss in model.losses(x, y)]
            pub.backward(losses)
            if clip:
                scaler.unscale_(pub)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
            scaler.step(pub)
            scaler.update()


@pytest.mark.parametrize("clip", [False, True], ids=["scaler-unscales", "user-unscales-and-clips"])
def test_grad_scaler_hands_over_scale_and_overflow_without_host_reads(clip):
    # GradScaler.step gives a sync_free PUB the scale and the overflow flag as tensors (the
    # ``_step_supports_amp_scaling`` protocol of torch's fused optimizers) instead of reading the
    # flag to decide whether to call step(): the whole AMP iteration reads nothing on the host.
    host_model, host, free_model, free = _pair(lambda p: torch.optim.Adam(p, lr=1e-2), "pareto")
    host_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    free_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _amp_run(host, host_model, host_scaler, range(2), clip, guard=False)
    _amp_run(free, free_model, free_scaler, range(2), clip, guard=False)
    _amp_run(host, host_model, host_scaler, range(2, 8), clip, guard=False)
    _amp_run(free, free_model, free_scaler, range(2, 8), clip, guard=True)
    _assert_close(host_model, host, free_model, free, atol=1e-6)
    assert float(free_scaler.get_scale()) == float(host_scaler.get_scale())


def test_grad_scaler_overflow_skips_on_the_device_and_backs_off():
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), sync_free=True, check_finite=False)
    # float32 gradients overflow at this scale (x16 on the losses): the scaler finds inf, PUB
    # skips, the scale drops.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    before = [p.detach().clone() for p in model.parameters()]
    _amp_run(pub, model, scaler, range(1), clip=False, guard=False, boost=16.0)
    assert bool(pub.last_step_skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert float(scaler.get_scale()) == 2.0**126
    _amp_run(pub, model, scaler, range(1, 40), clip=False, guard=False, boost=16.0)
    assert not bool(pub.last_step_skipped)  # the scale came down far enough to train
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_overflow_flag_alone_skips_the_step():
    # The protocol itself: a flag set with finite gradients (the scaler saw an overflow that
    # this step's own checks cannot see) skips the step; a zero flag does not.
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), sync_free=True)
    assert pub._step_supports_amp_scaling
    _train(pub, model, 2)
    for flag, skipped in ((1.0, True), (0.0, False)):
        before = [p.detach().clone() for p in model.parameters()]
        x, y = batch(9)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.grad_scale, pub.found_inf = torch.ones(()), torch.full((), flag)  # type: ignore[attr-defined]
        try:
            pub.step()
        finally:
            del pub.grad_scale, pub.found_inf  # type: ignore[attr-defined]
        assert bool(pub.last_step_skipped) is skipped
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert unchanged is skipped


def test_configurations_without_a_sync_free_path_are_refused():
    model = TwoTower()
    with pytest.raises(ValueError, match="exact look-ahead transform"):
        PUB(torch.optim.NAdam(model.parameters()), sync_free=True)
    with pytest.raises(ValueError, match="device solver"):
        PUB(torch.optim.Adam(model.parameters()), "pcgrad", sync_free=True)
    with pytest.raises(ValueError, match="fused"):
        PUB(torch.optim.Adam(model.parameters()), sync_free=True, fused=True)
    with pytest.raises(ValueError, match="reuse_weights"):
        PUB(torch.optim.Adam(model.parameters()), sync_free=True, solve_every=4)
    pub = PUB(torch.optim.Adam(model.parameters()), sync_free=True)
    with pytest.raises(ValueError, match="fused"):
        pub.fused = True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["pareto", "min-norm", "equal-magnitude"])
def test_no_synchronisation_on_cuda(strategy):
    device = torch.device("cuda")
    model = TwoTower().to(device)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, sync_free=True)

    def one_step(step: int) -> None:
        x, y = batch(step)
        pub.zero_grad()
        pub.backward(model.losses(x.to(device), y.to(device)))
        pub.step()

    one_step(0)
    xs = [batch(step) for step in range(1, 4)]
    inputs = [(x.to(device), y.to(device)) for x, y in xs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in inputs:
            pub.zero_grad()
            pub.backward(model.losses(x, y))
            pub.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(pub.last_step_skipped)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_synchronisation_in_an_amp_iteration_on_cuda():
    device = torch.device("cuda")
    model = TwoTower().to(device)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), "pareto", sync_free=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    inputs = [tuple(t.to(device) for t in batch(step)) for step in range(4)]

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        pub.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            losses = model.losses(x, y)
        pub.backward([scaler.scale(loss.float()) for loss in losses])
        scaler.step(pub)
        scaler.update()

    one_step(*inputs[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in inputs[1:]:
            one_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(pub.last_step_skipped)
