"""What differs between the torch releases that pyproject.toml accepts.

The oldest one is tested by ``make test-oldest-torch`` (scripts/test_oldest_torch.sh), which runs
tests/core and tests/lightning under it; the tests here pin the differences that matter and also
run, emulated, under the newest torch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pub_optim import PUB
from pub_optim.transforms.adam import decoupled_weight_decay


def _two_identical_tasks(
    make: type[torch.optim.Optimizer], *, drop_key: bool = False, steps: int = 5
) -> tuple[nn.Module, nn.Module]:
    """``(plain, balanced)``: the wrapped optimizer's own steps, and PUB's with two tasks whose
    losses are the same (so PUB's step must be the optimizer's step on that gradient)."""
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    balanced = nn.Linear(4, 3)
    balanced.load_state_dict(plain.state_dict())
    opt = make(plain.parameters(), lr=0.1, weight_decay=0.5)  # type: ignore[call-arg]
    inner = make(balanced.parameters(), lr=0.1, weight_decay=0.5)  # type: ignore[call-arg]
    if drop_key:  # AdamW's groups as torch 2.6 makes them: no "decoupled_weight_decay"
        for group in inner.param_groups:
            group.pop("decoupled_weight_decay", None)
    pub = PUB(inner, "pareto")
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        plain(x).pow(2).mean().backward()
        opt.step()
        loss = balanced(x).pow(2).mean()
        pub.zero_grad()
        pub.backward({"a": loss, "b": loss})
        pub.step()
    return plain, balanced


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_weight_decay_of_adam_and_adamw_matches_torch(make: type[torch.optim.Optimizer]) -> None:
    # L2 decay for Adam, decoupled decay for AdamW: a mix-up is ~1e-1 away after 5 steps.
    plain, balanced = _two_identical_tasks(make)
    for p, q in zip(plain.parameters(), balanced.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_adamw_without_the_group_key_of_newer_torch_is_still_decoupled() -> None:
    # torch 2.6 and older: AdamW is not a subclass of Adam and its groups carry no
    # "decoupled_weight_decay" key; its decay is decoupled all the same.
    plain, balanced = _two_identical_tasks(torch.optim.AdamW, drop_key=True)
    for p, q in zip(plain.parameters(), balanced.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_follows_the_key_where_it_exists() -> None:
    param = [nn.Parameter(torch.zeros(2))]
    adam, adamw = torch.optim.Adam(param), torch.optim.AdamW(param)
    assert not decoupled_weight_decay(adam, {})
    assert decoupled_weight_decay(adamw, {})
    assert decoupled_weight_decay(adam, {"decoupled_weight_decay": True})
    assert not decoupled_weight_decay(adamw, {"decoupled_weight_decay": False})
