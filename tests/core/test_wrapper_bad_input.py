"""Bad input gets a clear error, and parameters and optimizer state stay exactly as they were."""

from __future__ import annotations

import pytest
import torch
from mtl_fixtures import OptimizerFactory, TwoTower, assert_unchanged, batch, snapshot

from pub_optim import PUB


def _trained(strategy: str = "pareto", **kwargs: object) -> tuple[TwoTower, PUB]:
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), strategy, **kwargs)  # type: ignore[arg-type]
    for step in range(3):
        x, y = batch(step)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
    return model, pub


def test_wrong_number_of_losses() -> None:
    model, pub = _trained()
    before = snapshot(model, pub)
    x, y = batch(5)
    pub.zero_grad()
    with pytest.raises(ValueError, match="same tasks"):
        pub.backward(model.losses(x, y)[:1])
    assert_unchanged(model, pub, before)


def test_renamed_tasks_are_refused() -> None:
    model = TwoTower()
    pub = PUB(torch.optim.Adam(model.parameters()))
    x, y = batch(0)
    pub.backward(dict(zip(["a", "b"], model.losses(x, y), strict=True)))
    pub.step()
    with pytest.raises(ValueError, match="same tasks"):
        pub.backward(dict(zip(["b", "a"], model.losses(x, y), strict=True)))


def test_non_scalar_loss() -> None:
    model, pub = _trained()
    before = snapshot(model, pub)
    x, y = batch(5)
    z = torch.tanh(model.trunk(x))
    per_example = (model.heads[0](z).squeeze(-1) - y[:, 0]).pow(2)
    with pytest.raises(ValueError, match="must be a scalar"):
        pub.backward([per_example, model.losses(x, y)[1]])
    assert_unchanged(model, pub, before)


def test_loss_without_graph() -> None:
    model, pub = _trained()
    before = snapshot(model, pub)
    x, y = batch(5)
    with torch.no_grad():
        detached = model.losses(x, y)[0]
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        pub.backward([detached, model.losses(x, y)[1]])
    assert_unchanged(model, pub, before)


def test_loss_reaching_no_parameter_of_the_optimizer() -> None:
    model = TwoTower()
    outsider = torch.nn.Parameter(torch.ones(2))
    pub = PUB(torch.optim.Adam(model.parameters()))
    x, y = batch(0)
    with pytest.raises(ValueError, match="reaches no parameter of the wrapped optimizer"):
        pub.backward([model.losses(x, y)[0], outsider.sum()])


def test_shared_params_missing_from_the_optimizer() -> None:
    model = TwoTower()
    with pytest.raises(ValueError, match="not a parameter of the wrapped optimizer"):
        PUB(torch.optim.Adam(model.heads.parameters()), shared_params=model.trunk.parameters())


def test_empty_shared_set() -> None:
    model = TwoTower()
    with pytest.raises(ValueError, match="shared_params is empty"):
        PUB(torch.optim.Adam(model.parameters()), shared_params=[])
    independent = torch.nn.ModuleList([torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)])
    pub = PUB(torch.optim.Adam(independent.parameters()))
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="nothing to balance"):
        pub.backward([independent[0](x).sum(), independent[1](x).sum()])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss(bad: float) -> None:
    model, pub = _trained()
    before = snapshot(model, pub)
    x, y = batch(5)
    losses = model.losses(x, y)
    with pytest.raises(FloatingPointError, match=r"non-finite loss for task\(s\) \['task1'\]"):
        pub.backward([losses[0], losses[1] * bad])
    assert_unchanged(model, pub, before)


@pytest.mark.parametrize("where", ["shared", "task-specific"])
@pytest.mark.parametrize("optimizer", ["adam", "nadam"])
@pytest.mark.parametrize("schedule", ["solve", "reuse-weights"])
def test_non_finite_gradient_skips_the_step_and_changes_nothing(
    where: str, optimizer: str, schedule: str
) -> None:
    # "reuse-weights": the bad step reuses the weights and computes no Gram matrix; the shared
    # gradients' norms (taken anyway, to detect changes to .grad) must catch it.
    model = TwoTower()
    factory = torch.optim.Adam if optimizer == "adam" else torch.optim.NAdam
    options = {"solve_every": 4, "between_solves": "reuse_weights"} if schedule != "solve" else {}
    pub = PUB(factory(model.parameters(), lr=1e-2), **options)  # type: ignore[arg-type]
    for step in range(2):
        x, y = batch(step)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        pub.step()
    before = snapshot(model, pub)
    weights = pub.weights.clone()  # type: ignore[union-attr]
    x, y = batch(5)
    pub.zero_grad()
    pub.backward(model.losses(x, y))
    target = model.trunk[0].weight if where == "shared" else model.heads[1].bias
    target.grad[0] = float("inf")  # type: ignore[index]
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        pub.step()
    assert_unchanged(model, pub, before)
    assert torch.equal(pub.weights, weights)  # type: ignore[arg-type]


class _ConvTwoTask(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))

    def losses(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.conv(x).mean((2, 3))
        return [head(z).pow(2).mean() for head in self.heads]


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    ],
    ids=["adam", "sgd-momentum"],
)
def test_channels_last_parameters_are_refused_by_the_exact_path(
    factory: OptimizerFactory, sync_free: bool
) -> None:
    """The exact look-ahead reads flat views of each parameter: a ``channels_last`` convolution
    gets a message that says what to do, after a step that worked, and nothing changes."""
    model = _ConvTwoTask()
    pub = PUB(factory(list(model.parameters())), sync_free=sync_free)
    x = torch.randn(4, 3, 8, 8)
    pub.backward(model.losses(x))
    pub.step()  # a contiguous model trains
    model.to(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    before = snapshot(model, pub.optimizer)
    pub.zero_grad()
    pub.backward(model.losses(x.to(memory_format=torch.channels_last)))
    with pytest.raises(ValueError, match="contiguous_format"):
        pub.step()
    assert_unchanged(model, pub.optimizer, before)


@pytest.mark.parametrize(
    ("factory", "space"),
    [
        (lambda p: torch.optim.NAdam(p, lr=1e-2), "update"),  # the generic path
        # the optimizer's own step (SGD: Adam's first step, ~lr * sign(g), would turn the two
        # layouts' last-bit gradient differences into lr-sized ones where g* nearly cancels)
        (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), "gradient"),
    ],
    ids=["nadam-generic", "sgd-gradient-space"],
)
def test_channels_last_parameters_train_where_the_optimizer_steps_them(
    factory: OptimizerFactory, space: str
) -> None:
    """Where the wrapped optimizer's own ``step()`` moves the parameters (the generic path, and
    ``space="gradient"``), any layout trains: a ``channels_last`` convolution matches the same
    model trained contiguous."""
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _ConvTwoTask().to(memory_format=layout)
        pub = PUB(factory(list(model.parameters())), space=space)  # type: ignore[arg-type]
        for step in range(3):
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
            pub.zero_grad()
            pub.backward(model.losses(x.to(memory_format=layout)))
            pub.step()
        results.append([p.detach().contiguous() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_step_without_backward_and_with_closure() -> None:
    model, pub = _trained()
    before = snapshot(model, pub)
    pub.zero_grad()
    with pytest.raises(RuntimeError, match="call backward"):
        pub.step()
    with pytest.raises(ValueError, match="takes no closure"):
        pub.step(lambda: 0.0)
    assert_unchanged(model, pub, before)


def test_constructor_validation() -> None:
    model = TwoTower()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer"):
        PUB(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already wrapped"):
        PUB(PUB(opt))
    with pytest.raises(ValueError, match="space"):
        PUB(opt, space="weights")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solve_every"):
        PUB(opt, solve_every=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        PUB(opt, "nash")
    with pytest.raises(ValueError, match="differentiable=True"):
        PUB(torch.optim.Adam(model.parameters(), differentiable=True))
    with pytest.raises(TypeError, match="sequence of scalar tensors"):
        PUB(opt).backward(torch.ones(2, requires_grad=True))  # type: ignore[arg-type]
