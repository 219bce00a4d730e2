"""The ``gradient_sync`` hook of :class:`pub_optim.PUB` (single process)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pub_optim import PUB
from pub_optim.wrapper import GradientView


def _model(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"trunk": nn.Linear(5, 6), "a": nn.Linear(6, 1), "b": nn.Linear(6, 1)})


def _losses(model: nn.ModuleDict, x: Tensor, scale: float = 1.0) -> dict[str, Tensor]:
    h = torch.tanh(model["trunk"](x))
    return {
        "a": scale * (model["a"](h) - 1).pow(2).mean(),
        "b": scale * (model["b"](h) + x[:, :1]).pow(2).mean(),
    }


def _run(hook: object | None, scale: float = 1.0, steps: int = 3, **kw: object) -> nn.ModuleDict:
    model = _model()
    opt = PUB(torch.optim.SGD(model.parameters(), lr=0.1), gradient_sync=hook, **kw)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen)
        opt.zero_grad()
        opt.backward(_losses(model, x, scale))
        opt.step()
    return model


def test_hook_sees_the_per_task_gradients_once_per_backward() -> None:
    seen: list[GradientView] = []
    model = _model()
    opt = PUB(torch.optim.SGD(model.parameters(), lr=0.1), gradient_sync=seen.append)
    x = torch.randn(8, 5)
    opt.zero_grad()
    opt.backward(_losses(model, x))
    assert len(seen) == 1
    view = seen[0]
    trunk = list(model["trunk"].parameters())
    assert [id(p) for p in view.shared] == [id(p) for p in trunk]
    assert view.task_grads is not None
    assert [tuple(g.shape) for g in view.task_grads] == [(2, *p.shape) for p in trunk]
    assert view.reached == [True, True]
    heads = list(model["a"].parameters()) + list(model["b"].parameters())
    assert {id(p) for p in view.others} == {id(p) for p in heads}
    for p, g in zip(view.shared, view.task_grads, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g.sum(0), rtol=0, atol=0)
    # per-task rows are the gradients of each loss alone
    losses = _losses(model, x)
    ga = torch.autograd.grad(losses["a"], trunk)
    torch.testing.assert_close(view.task_grads[0][0], ga[0], rtol=0, atol=0)
    opt.backward(_losses(model, x))  # accumulation: called again
    assert len(seen) == 2


def test_hook_that_rewrites_grad_is_a_no_op_for_the_step() -> None:
    def identity(view: GradientView) -> None:
        assert view.task_grads is not None
        for p, g in zip(view.shared, view.task_grads, strict=True):
            p.grad = g.sum(0)  # a new tensor: the step must not mistake it for a user change

    ref = _run(None)
    got = _run(identity)
    for p, q in zip(ref.parameters(), got.parameters(), strict=True):
        assert torch.equal(p, q)


def test_hook_changes_are_used_by_the_step() -> None:
    def double(view: GradientView) -> None:
        assert view.task_grads is not None
        for p, g in zip(view.shared, view.task_grads, strict=True):
            g.mul_(2)
            p.grad = g.sum(0)
        for p in view.others:
            if p.grad is not None:
                p.grad.mul_(2)

    ref = _run(None, scale=2.0)  # every gradient doubled exactly
    got = _run(double)
    plain = _run(None)
    for p, q in zip(ref.parameters(), got.parameters(), strict=True):
        assert torch.equal(p, q)
    pairs = zip(got.parameters(), plain.parameters(), strict=True)
    assert any(not torch.equal(p, r) for p, r in pairs)


def test_hook_unreached_parameter_becomes_active_when_marked() -> None:
    model = _model()
    extra = nn.Parameter(torch.ones(3))
    opt = PUB(
        torch.optim.SGD([*model.parameters(), extra], lr=0.5),
        shared_params=[*model["trunk"].parameters(), extra],
    )

    def arrive(view: GradientView) -> None:  # as if another rank had reached ``extra``
        assert view.task_grads is not None
        i = next(j for j, p in enumerate(view.shared) if p is extra)
        assert view.reached[i] is False
        view.task_grads[i].fill_(1.0)
        view.reached[i] = True
        extra.grad = view.task_grads[i].sum(0)

    opt.gradient_sync = arrive
    opt.zero_grad()
    opt.backward(_losses(model, torch.randn(4, 5)))
    opt.step()
    assert opt.weights is not None
    torch.testing.assert_close(extra.detach(), torch.full((3,), 1.0 - 0.5 * 1.0))


def test_hook_after_weighted_backward_gets_no_task_grads() -> None:
    seen: list[bool] = []
    model = _model()
    opt = PUB(
        torch.optim.SGD(model.parameters(), lr=0.1),
        solve_every=2,
        gradient_sync=lambda v: seen.append(v.task_grads is None),
    )
    for _ in range(2):
        opt.zero_grad()
        opt.backward(_losses(model, torch.randn(4, 5)))
        opt.step()
    assert seen == [False, True]
