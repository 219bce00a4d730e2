"""The callback inside Lightning against an independent, hand-written loop with the plain wrapper.

Same seeds, same data, same order of operations: the parameters must be bit-identical on CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mtl_helpers import MultiTask, flat, loader, manual_pub_loop, trainer
from pytorch_lightning.plugins.precision import MixedPrecision

from pub_optim import PUB
from pub_optim.lightning import LightningPUB, UpdateBalancing

CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # name: (module options, trainer / callback options, manual-loop options)
    "adam": ({}, {}, {}),
    "sgd-3-tasks-auto-partition": (
        {"tasks": 3, "optimizer": "sgd", "expose_shared": False},
        {},
        {},
    ),
    "accumulate-clip-scheduler-groups": (
        {"optimizer": "adamw", "param_groups": True, "scheduler": "step"},
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05, "solve_every": 2},
        {"accumulate": 3, "clip": 0.05, "solve_every": 2},
    ),
    "per-step-scheduler-min-norm": (
        {"scheduler": "per-step"},
        {"strategy": "min-norm"},
        {"strategy": "min-norm"},
    ),
    "bf16-mixed": ({}, {"precision": "bf16-mixed"}, {"autocast": torch.bfloat16}),
}


def _fit(module: MultiTask, epochs: int, opts: dict[str, Any], **extra: Any) -> UpdateBalancing:
    opts = dict(opts)
    cb_keys = ("strategy", "solve_every")
    cb = UpdateBalancing(**{k: opts.pop(k) for k in cb_keys if k in opts})
    trainer(max_epochs=epochs, callbacks=[cb], **opts, **extra).fit(module, loader())
    return cb


@pytest.mark.parametrize("case", list(CASES))
def test_callback_equals_manual_pub_loop(case: str) -> None:
    module_opts, fit_opts, manual_opts = CASES[case]
    model = MultiTask(**module_opts)
    before = flat(model)
    cb = _fit(model, 2, fit_opts)
    ref = MultiTask(**module_opts)
    ref_opt = manual_pub_loop(ref, loader(), 2, **manual_opts)
    assert not torch.equal(flat(model), before)  # it trained
    assert torch.equal(flat(model), flat(ref))
    assert cb.optimizer is not None
    assert cb.optimizer.state_dict()["pub"] == ref_opt.state_dict()["pub"]
    assert isinstance(cb.optimizer, LightningPUB) and isinstance(cb.optimizer, PUB)


def test_without_the_callback_the_module_trains_on_the_summed_loss() -> None:
    """The contract's other half: same module, no callback, plain Adam on the total."""
    model = MultiTask()
    trainer(max_epochs=1).fit(model, loader())
    ref = MultiTask()
    opt = torch.optim.Adam(ref.parameters(), lr=ref.lr)
    for batch in loader():
        opt.zero_grad()
        sum(ref.task_losses(batch).values()).backward()  # type: ignore[union-attr]
        opt.step()
    assert torch.equal(flat(model), flat(ref))
    balanced = MultiTask()
    _fit(balanced, 1, {})
    assert not torch.equal(flat(balanced), flat(model))


def _fp16_plugin(init_scale: float) -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-12)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_16_mixed_with_grad_scaler_equals_manual_loop_including_skipped_steps() -> None:
    """Lightning's real 16-mixed path (MixedPrecision plugin with a CPU GradScaler): the per-task
    losses are scaled by the scaler's scale, unscale_ happens before clipping and the balancing,
    and steps with inf gradients (the first ones, with a huge initial scale) are skipped."""
    model = MultiTask()
    plugin = _fp16_plugin(2.0**40)
    cb = UpdateBalancing()
    trainer(max_epochs=2, callbacks=[cb], plugins=[plugin], gradient_clip_val=1.0).fit(
        model, loader()
    )
    ref = MultiTask()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-12)
    ref_opt = manual_pub_loop(ref, loader(), 2, autocast=torch.float16, scaler=scaler, clip=1.0)
    assert torch.equal(flat(model), flat(ref))
    assert plugin.scaler is not None
    assert plugin.scaler.get_scale() == scaler.get_scale() < 2.0**40  # it backed off
    assert cb.optimizer is not None
    pub_steps = cb.optimizer.state_dict()["pub"]["step"]
    assert pub_steps == ref_opt.state_dict()["pub"]["step"]
    assert 0 < pub_steps < 20  # some of the 20 steps were skipped by the scaler


def test_16_mixed_skipped_step_leaves_everything_untouched() -> None:
    model = MultiTask()
    before = flat(model)
    cb = UpdateBalancing()
    trainer(max_steps=1, callbacks=[cb], plugins=[_fp16_plugin(2.0**40)]).fit(model, loader())
    pub = cb.optimizer
    assert pub is not None
    assert torch.equal(flat(model), before)
    assert len(pub.optimizer.state) == 0  # Adam never stepped: no exp_avg, no step count
    assert pub.state_dict()["pub"] == {
        "step": 0,
        "task_names": ["t0", "t1"],
        "weights": None,
        "balancer": {},
        "state_mode": "shared",
    }
    assert pub.last_stats is None
