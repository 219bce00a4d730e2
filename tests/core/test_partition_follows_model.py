"""The shared / task-specific partition follows the model as torch optimizers do: frozen
parameters are skipped, unfrozen ones train, parameters first reached later join the side their
reach puts them on, and a task that stops reaching any parameter is refused, not given weight 0."""

from __future__ import annotations

import pytest
import torch
from mtl_fixtures import batch
from torch import Tensor, nn

from pub_optim import PUB


class WarmUp(nn.Module):
    """A trunk, one head per task, and a ``late`` layer that joins the trunk after a warm-up
    (used by both tasks: shared) and a ``late_own`` layer only task 0 uses after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.late = nn.Linear(6, 6)
        self.late_own = nn.Linear(6, 1)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        self.warm = True

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = torch.tanh(self.trunk(x))
        if not self.warm:
            z = torch.tanh(self.late(z))
        out = [head(z).squeeze(-1) for head in self.heads]
        if not self.warm:
            out[0] = out[0] + self.late_own(z).squeeze(-1)
        return [(o - y[:, k]).pow(2).mean() for k, o in enumerate(out)]


def _step(pub: PUB, model: WarmUp, step: int) -> None:
    x, y = batch(step, 2)
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    pub.step()


def _values(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("explicit", [False, True])
def test_parameters_first_reached_after_a_warm_up_train_and_join_their_side(
    explicit: bool,
) -> None:
    model = WarmUp()
    shared = list(model.trunk.parameters()) + list(model.late.parameters()) if explicit else None
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), shared_params=shared)
    for step in range(2):
        _step(pub, model, step)
    late, own = _values(model.late), _values(model.late_own)
    model.warm = False
    for step in range(2, 5):
        _step(pub, model, step)
    after = [*model.late.parameters(), *model.late_own.parameters()]
    for before, p in zip(late + own, after, strict=True):
        assert not torch.equal(before, p.detach())  # both trained
    ids = {id(p) for p in pub.shared_params}
    assert all(id(p) in ids for p in model.late.parameters())  # reached by both tasks: shared
    assert not any(id(p) in ids for p in model.late_own.parameters())  # task 0's own
    assert pub.weights is not None and pub.weights.shape == (2,)


def test_a_parameter_frozen_mid_training_is_skipped_and_trains_again_when_unfrozen() -> None:
    model = WarmUp()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _step(pub, model, 0)
    model.trunk.weight.requires_grad_(False)
    frozen = model.trunk.weight.detach().clone()
    bias = model.trunk.bias.detach().clone()
    for step in range(1, 3):
        _step(pub, model, step)
    assert torch.equal(model.trunk.weight, frozen)
    assert not torch.equal(model.trunk.bias, bias)
    model.trunk.weight.requires_grad_(True)
    _step(pub, model, 3)
    assert not torch.equal(model.trunk.weight, frozen)


def test_a_frozen_parameter_in_shared_params_is_skipped() -> None:
    model = WarmUp()
    model.trunk.weight.requires_grad_(False)
    frozen = model.trunk.weight.detach().clone()
    pub = PUB(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        shared_params=list(model.trunk.parameters()),
    )
    for step in range(3):
        _step(pub, model, step)
    assert torch.equal(model.trunk.weight, frozen)


def test_a_parameter_frozen_before_the_first_step_trains_once_unfrozen() -> None:
    model = WarmUp()
    model.trunk.weight.requires_grad_(False)
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _step(pub, model, 0)
    frozen = model.trunk.weight.detach().clone()
    model.trunk.weight.requires_grad_(True)
    for step in range(1, 3):
        _step(pub, model, step)
    assert not torch.equal(model.trunk.weight, frozen)
    assert any(p is model.trunk.weight for p in pub.shared_params)


def test_a_task_that_stops_reaching_any_parameter_is_refused() -> None:
    model = WarmUp()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2))
    _step(pub, model, 0)
    for p in model.heads[1].parameters():
        p.requires_grad_(False)
    frozen_trunk = model.trunk.weight.detach().clone()
    x, y = batch(1, 2)
    z = torch.tanh(model.trunk(x)).detach()  # task 1 no longer reaches the trunk either
    outside = torch.ones((), requires_grad=True)  # not a parameter of the optimizer
    dead = (model.heads[1](z).squeeze(-1) * outside - y[:, 1]).pow(2).mean()
    pub.zero_grad()
    with pytest.raises(ValueError, match="reaches no trainable parameter"):
        pub.backward([model.losses(x, y)[0], dead])
    with pytest.raises(RuntimeError, match="without per-task gradients"):
        pub.step()
    assert torch.equal(model.trunk.weight, frozen_trunk)
