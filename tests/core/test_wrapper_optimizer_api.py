"""The ``torch.optim`` API around PUB: what torch's own optimizers accept works, what PUB cannot
do is refused at once and leaves nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from mtl_fixtures import TwoTower, assert_state_equal, batch

from pub_optim import PUB


def _step(pub: PUB, model: TwoTower, step: int, scale: float = 1.0) -> None:
    x, y = batch(step, 2)
    pub.zero_grad()
    pub.backward([loss * scale for loss in model.losses(x, y)])
    pub.step()


def test_closure_optimizers_are_refused_at_construction() -> None:
    model = TwoTower(2)
    with pytest.raises(TypeError, match="LBFGS"):
        PUB(torch.optim.LBFGS(model.parameters()))


def test_adagrad_trains_a_shared_parameter_added_mid_training_as_torch_does() -> None:
    """Adagrad creates the state of a parameter added by add_param_group at its first step; the
    look-ahead does the same (it raised KeyError: 'sum')."""
    ref, model = TwoTower(2), TwoTower(2)
    extra_ref = torch.nn.Parameter(torch.full((8,), 0.5))
    extra = torch.nn.Parameter(torch.full((8,), 0.5))
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.05, initial_accumulator_value=0.1)
    pub = PUB(torch.optim.Adagrad(model.parameters(), lr=0.05, initial_accumulator_value=0.1))
    for step in range(2):
        x, y = batch(step, 2)
        ref_opt.zero_grad()
        sum(ref.losses(x, y)).backward()  # type: ignore[union-attr]
        ref_opt.step()
        _step(pub, model, step)
    ref_opt.add_param_group({"params": [extra_ref]})
    pub.add_param_group({"params": [extra]})
    for step in range(2, 5):
        x, y = batch(step, 2)
        ref_opt.zero_grad()
        losses = ref.losses(x, y)
        (losses[0] + losses[1] + 0.5 * (extra_ref**2).sum()).backward()
        ref_opt.step()
        pub.zero_grad()
        own = model.losses(x, y)
        # The extra parameter reaches both tasks (shared) with the reference's gradient each:
        # whatever the weights (they sum to one), its step is plain Adagrad's on that gradient.
        pub.backward([own[0] + 0.5 * (extra**2).sum(), own[1] + 0.5 * (extra**2).sum()])
        pub.step()
    assert any(p is extra for p in pub.shared_params)
    assert float(pub.optimizer.state[extra]["step"]) == 3.0
    torch.testing.assert_close(extra, extra_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        pub.optimizer.state[extra]["sum"], ref_opt.state[extra_ref]["sum"], rtol=1e-6, atol=1e-7
    )
    assert torch.all(extra < 0.5)  # it trained


def test_a_refused_param_group_is_not_added() -> None:
    model = TwoTower(2)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _step(pub, model, 0)
    groups = len(pub.param_groups)
    before = copy.deepcopy(pub.state_dict())
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="differentiable"):
        pub.add_param_group({"params": [extra], "differentiable": True})
    assert len(pub.param_groups) == groups
    assert_state_equal(pub.state_dict(), before)
    _step(pub, model, 1)  # and training goes on


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize(
    "factory",
    [lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-20)],
    ids=["adam", "sgd"],
)
def test_finite_gradients_beyond_float32_norm_range_are_not_called_non_finite(
    factory: object, sync_free: bool
) -> None:
    """Losses x1e20: the shared gradient's 2-norm (7.5e19) is beyond float32's range, every value
    is finite (at most 1.9e19), and so are the updates: the step must take them (it was refused
    as non-finite)."""
    model = TwoTower(2)
    pub = PUB(factory(list(model.parameters())), sync_free=sync_free)  # type: ignore[operator]
    before = [p.detach().clone() for p in model.parameters()]
    _step(pub, model, 0, scale=1e20)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    if sync_free:
        assert pub.last_step_skipped is not None and not bool(pub.last_step_skipped)
