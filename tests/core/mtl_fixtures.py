"""Small multi-task models and torch-based oracles shared by the wrapper tests."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class SignMomentum(torch.optim.Optimizer):
    """A user-defined elementwise optimizer (sign of a momentum buffer) for the generic path."""

    def __init__(self, params: object, lr: float = 1e-2, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                    state["count"] = 0
                state["buf"].mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                state["count"] += 1
                p.add_(torch.sign(state["buf"]), alpha=-group["lr"])


#: Every optimizer/option combination the issue names, as (id, factory).
OPTIMIZERS: list[tuple[str, OptimizerFactory]] = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.05)),
    ("sgd-momentum-dampening", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3)),
    (
        "sgd-nesterov-wd",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    ),
    ("sgd-maximize", lambda p: torch.optim.SGD(p, lr=0.005, momentum=0.5, maximize=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
    ("adam-l2-amsgrad", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05, amsgrad=True)),
    ("adam-maximize-foreach", lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True, foreach=True)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    (
        "adamw-amsgrad-betas",
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.5, 0.9), amsgrad=True, eps=1e-6),
    ),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-3)),
    (
        "rmsprop-centered-momentum-wd",
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.7, centered=True, weight_decay=0.01),
    ),
    ("rmsprop-centered", lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, maximize=True)),
    ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.05)),
    (
        "adagrad-decay-wd-init",
        lambda p: torch.optim.Adagrad(
            p, lr=0.05, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1
        ),
    ),
    ("nadam-generic", lambda p: torch.optim.NAdam(p, lr=1e-2)),
    ("user-defined-generic", lambda p: SignMomentum(p, lr=1e-2)),
]


class TwoTower(nn.Module):
    """A shared trunk and one head per task: the smallest multi-task model."""

    def __init__(self, num_tasks: int = 2, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = torch.tanh(self.trunk(x))
        return [(head(z).squeeze(-1) - y[:, k]).pow(2).mean() for k, head in enumerate(self.heads)]


def batch(step: int, num_tasks: int = 2, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 5, generator=g), torch.randn(n, num_tasks, generator=g)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """Deep copy of parameters and optimizer state, to check that nothing changed."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": copy.deepcopy(optimizer.state_dict()),
    }


def assert_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer, before: dict) -> None:
    for p, q in zip(model.parameters(), before["params"], strict=True):  # type: ignore[call-overload]
        assert torch.equal(p.detach(), q)
    assert_state_equal(optimizer.state_dict(), before["state"])  # type: ignore[arg-type]


def assert_state_equal(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b)
    else:
        assert a == b


def torch_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, grads: list[Tensor | None]
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Oracle: a deep copy of (model, optimizer) stepped by torch itself on ``grads``.

    Returns the copy's parameters after the step and the stepped copy of the optimizer; the
    originals are untouched.
    """
    twin_model, twin_opt = copy.deepcopy((model, optimizer))
    for p, g in zip(twin_model.parameters(), grads, strict=True):
        p.grad = None if g is None else g.clone()
    twin_opt.step()
    return [p.detach() for p in twin_model.parameters()], twin_opt
