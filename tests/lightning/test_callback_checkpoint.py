"""Checkpoints: the wrapped optimizer's and the balancer's state are in the Lightning checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mtl_helpers import MultiTask, flat, loader, trainer

from pub_optim.lightning import UpdateBalancing

OPTS = {"scheduler": "step", "optimizer": "adamw", "param_groups": True}


def _callback() -> UpdateBalancing:
    # solve_every=3: the 10th step falls between solves, so resuming needs the stored weights
    return UpdateBalancing(strategy="pareto", solve_every=3)


def test_20_straight_equals_10_save_resume_10(tmp_path: Path) -> None:
    straight = MultiTask(**OPTS)
    cb_a = _callback()
    trainer(max_epochs=2, callbacks=[cb_a]).fit(straight, loader())

    first = MultiTask(**OPTS)
    cb_b = _callback()
    t1 = trainer(max_epochs=1, callbacks=[cb_b])
    t1.fit(first, loader())
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)

    # the checkpoint holds PUB's state: the inner optimizer's and the balancer's
    saved = torch.load(ckpt, weights_only=False)
    state = saved["optimizer_states"][0]
    assert set(state) == {"state", "param_groups", "pub"}  # torch's format, PUB's part beside
    assert state["pub"]["step"] == 10 and state["pub"]["task_names"] == ["t0", "t1"]
    assert len(state["pub"]["weights"]) == 2
    assert len(state["state"]) == len(list(first.parameters()))
    assert any("UpdateBalancing" in key for key in saved["callbacks"])

    resumed = MultiTask(**OPTS, seed=123)  # different initial parameters: all must come from ckpt
    cb_c = _callback()
    trainer(max_epochs=2, callbacks=[cb_c]).fit(resumed, loader(), ckpt_path=ckpt)

    assert torch.equal(flat(resumed), flat(straight))
    assert cb_a.optimizer is not None and cb_c.optimizer is not None
    assert cb_c.optimizer.state_dict()["pub"] == cb_a.optimizer.state_dict()["pub"]
    lr_a = [g["lr"] for g in cb_a.optimizer.param_groups]
    assert [g["lr"] for g in cb_c.optimizer.param_groups] == lr_a


def test_resume_without_the_stored_weights_differs(tmp_path: Path) -> None:
    """The previous test can fail: dropping the balancer's state changes the result."""
    straight = MultiTask(**OPTS)
    trainer(max_epochs=2, callbacks=[_callback()]).fit(straight, loader())
    first = MultiTask(**OPTS)
    t1 = trainer(max_epochs=1, callbacks=[_callback()])
    t1.fit(first, loader())
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    saved["optimizer_states"][0]["pub"] = {"step": 0, "task_names": None, "weights": None}
    torch.save(saved, ckpt)
    resumed = MultiTask(**OPTS)
    trainer(max_epochs=2, callbacks=[_callback()]).fit(resumed, loader(), ckpt_path=ckpt)
    assert not torch.equal(flat(resumed), flat(straight))


def test_resume_with_the_callback_from_a_plain_checkpoint(tmp_path: Path) -> None:
    """A run started without the callback can continue with it: the optimizer state is kept."""
    model = MultiTask()
    t1 = trainer(max_epochs=1)
    t1.fit(model, loader())
    ckpt = tmp_path / "plain.ckpt"
    t1.save_checkpoint(ckpt)
    cb = UpdateBalancing()
    with pytest.warns(UserWarning, match="plain optimizer state"):
        trainer(max_epochs=2, callbacks=[cb]).fit(MultiTask(seed=9), loader(), ckpt_path=ckpt)
    assert cb.optimizer is not None
    state = cb.optimizer.state_dict()
    assert state["pub"]["step"] == 10  # ten balanced steps after the resume
    first = next(iter(state["state"].values()))
    assert int(first["step"]) == 20  # Adam's step count carried on from the plain run
