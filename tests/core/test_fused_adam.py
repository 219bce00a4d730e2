"""The compiled (fused) Adam path gives the eager path's result (which is pinned against torch)."""

from __future__ import annotations

import pytest
import torch
from mtl_fixtures import TwoTower, batch

from pub_optim import PUB

pytestmark = pytest.mark.slow  # each flag combination compiles once (~10-20 s on 2 cores)

CONFIGS = {
    "adam-l2-amsgrad-maximize": lambda p: torch.optim.Adam(
        p, lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pub_optim.transforms import fused as kernels

    calls = []
    compiled = kernels.adam_apply

    def counting(*args: object) -> None:
        calls.append(args[0].shape)  # type: ignore[attr-defined]
        compiled(*args)

    monkeypatch.setattr(kernels, "adam_apply", counting)
    factory = CONFIGS[name]
    # width 160: the 160 x 160 trunk weight is above FUSED_MIN_TENSOR, its biases are below.
    eager_model, fused_model = TwoTower(3, width=160), TwoTower(3, width=160)
    eager = PUB(factory(list(eager_model.parameters())), "pareto", fused=False)
    fused = PUB(factory(list(fused_model.parameters())), "pareto", fused=True)
    for step in range(6):
        x, y = batch(step, 3)
        for model, opt in ((eager_model, eager), (fused_model, fused)):
            opt.zero_grad()
            opt.backward(model.losses(x, y))
            opt.step()
        assert not fused._fused_failed
        assert eager.last_stats is not None and fused.last_stats is not None
        torch.testing.assert_close(fused.last_stats.gram, eager.last_stats.gram, rtol=1e-5, atol=0)
        torch.testing.assert_close(fused.weights, eager.weights, rtol=1e-5, atol=1e-7)
    assert calls and all(shape == (3, 160 * 160) for shape in calls)  # the kernel really ran
    for p, q in zip(eager_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key, state in eager.optimizer.state_dict()["state"].items():
        other = fused.optimizer.state_dict()["state"][key]
        assert state.keys() == other.keys()
        for field, value in state.items():
            torch.testing.assert_close(other[field], value, rtol=1e-5, atol=1e-6)


def test_auto_mode_stays_eager_for_small_models() -> None:
    model = TwoTower(2)
    opt = PUB(torch.optim.Adam(model.parameters()), "pareto")
    assert opt.fused is None
    x, y = batch(0)
    opt.backward(model.losses(x, y))
    assert not opt._fused_enabled(opt._task_grads)


def test_compile_failure_falls_back_to_the_exact_eager_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pub_optim.transforms import fused as kernels

    def broken(*args: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "adam_apply", broken)
    reference, model = TwoTower(2, width=160), TwoTower(2, width=160)
    eager = PUB(torch.optim.Adam(reference.parameters(), lr=1e-2), fused=False)
    opt = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), fused=True)
    x, y = batch(0)
    eager.backward(reference.losses(x, y))
    eager.step()
    opt.backward(model.losses(x, y))
    with pytest.warns(RuntimeWarning, match="using the eager path"):
        opt.step()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
