"""One callback for both Lightning distributions installed side by side.

``lightning`` (imported as ``lightning.pytorch``) depends on ``pytorch_lightning``: both are
installed together, with distinct classes for the same trainer, strategies and precision plugins.
The callback must train a ``lightning.pytorch`` module under a ``lightning.pytorch`` Trainer as it
trains a ``pytorch_lightning`` one, bit-identically to the hand-written PUB loop.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from mtl_helpers import PACKAGES, flat, loader, manual_pub_loop, module_class, trainer

from pub_optim.lightning import UpdateBalancing, _check_precision, _check_strategy

pytest.importorskip("lightning.pytorch", reason="the unified `lightning` package is not installed")


@pytest.mark.parametrize("package", PACKAGES)
def test_callback_is_a_callback_of_both_packages(package: str) -> None:
    callback_class = importlib.import_module(f"{package}.callbacks").Callback
    assert isinstance(UpdateBalancing(), callback_class)


@pytest.mark.parametrize("package", PACKAGES)
def test_trains_like_the_manual_loop_under_each_packages_trainer(
    package: str, tmp_path: Path
) -> None:
    cls = module_class(package)
    model = cls(optimizer="adamw", param_groups=True, scheduler="step")
    before = flat(model)
    cb = UpdateBalancing(solve_every=2)
    csv = importlib.import_module(f"{package}.loggers").CSVLogger(tmp_path)
    tr = trainer(
        package,
        max_epochs=2,
        callbacks=[cb],
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        logger=csv,
        log_every_n_steps=1,
    )
    tr.fit(model, loader())
    ref = cls(optimizer="adamw", param_groups=True, scheduler="step")
    ref_opt = manual_pub_loop(ref, loader(), 2, accumulate=2, clip=0.05, solve_every=2)
    assert not torch.equal(flat(model), before)
    assert torch.equal(flat(model), flat(ref))
    assert cb.optimizer is not None
    assert cb.optimizer.state_dict()["pub"] == ref_opt.state_dict()["pub"]
    assert {"pub/weight/t0", "pub/weight/t1"} <= set(tr.logged_metrics)


@pytest.mark.parametrize("package", PACKAGES)
def test_strategies_and_precision_plugins_of_each_package(package: str) -> None:
    strategies = importlib.import_module(f"{package}.strategies")
    precision = importlib.import_module(f"{package}.plugins.precision")
    _check_strategy(strategies.SingleDeviceStrategy("cpu"))
    _check_strategy(strategies.DDPStrategy())
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        _check_strategy(strategies.FSDPStrategy())
    for plugin in (precision.Precision(), precision.DoublePrecision()):
        _check_precision(plugin)
    with pytest.raises(ValueError, match="supports precision"):
        _check_precision(precision.HalfPrecision("16-true"))


def test_a_trainer_of_neither_package_is_refused() -> None:
    model = module_class("pytorch_lightning")()
    with pytest.raises(TypeError, match="Trainer"):
        UpdateBalancing().setup(object(), model, "fit")  # type: ignore[arg-type]
