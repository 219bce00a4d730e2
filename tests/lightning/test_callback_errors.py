"""Bad input and unsupported setups: a clear error (or a documented skip), nothing corrupted."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from mtl_helpers import MultiTask, build_optimizer, flat, loader, trainer
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from pub_optim import PUB
from pub_optim.lightning import UpdateBalancing, _check_strategy


def _params_after(steps: int, **module_opts: Any) -> torch.Tensor:
    model = MultiTask(**module_opts)
    trainer(max_steps=steps, callbacks=[UpdateBalancing()]).fit(model, loader())
    return flat(model)


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "nash"}, ValueError, "unknown strategy"),
        ({"solve_every": 0}, ValueError, "solve_every"),
        ({"space": "params"}, ValueError, "space"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"prefix": ""}, ValueError, "prefix"),
        ({"check_total": "yes"}, TypeError, "check_total"),
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb"),
    ],
)
def test_arguments_are_validated_in_init(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        UpdateBalancing(**kwargs)


# ----------------------------------------------------------------------- the module contract
@pytest.mark.parametrize(
    ("mangle", "error", "match"),
    [
        (lambda out, i: out["loss"], TypeError, "single loss tensor"),
        (lambda out, i: {"loss": out["loss"]}, TypeError, "without 'task_losses'"),
        (lambda out, i: {**out, "task_losses": {}}, ValueError, "'task_losses' is empty"),
        (lambda out, i: {**out, "task_losses": 3.0}, TypeError, "dict name -> scalar loss"),
        (
            lambda out, i: {**out, "task_losses": {"a": torch.ones(2, requires_grad=True)}},
            TypeError,
            "must be a scalar tensor",
        ),
    ],
    ids=["tensor", "no-task-losses", "empty", "not-a-collection", "not-scalar"],
)
def test_module_breaking_the_contract_gets_the_fix(mangle: Any, error: type, match: str) -> None:
    model = MultiTask()
    model.mangle = mangle
    with pytest.raises(error, match=match) as info:
        trainer(max_steps=2, callbacks=[UpdateBalancing()]).fit(model, loader())
    if "empty" not in match and "scalar tensor" not in match:
        assert "'task_losses': losses" in str(info.value)  # the message shows the fix
    # the patched hooks were removed again
    assert "training_step" not in model.__dict__ and "backward" not in model.__dict__


def test_changing_tasks_raises_and_leaves_the_model_as_after_the_good_steps() -> None:
    model = MultiTask()

    def drop_a_task(out: dict[str, Any], i: int) -> dict[str, Any]:
        if i == 2:
            tasks = {"t0": out["task_losses"]["t0"]}
            return {"loss": tasks["t0"], "task_losses": tasks}
        return out

    model.mangle = drop_a_task
    with pytest.raises(ValueError, match="same tasks, in the same order"):
        trainer(max_steps=5, callbacks=[UpdateBalancing()]).fit(model, loader())
    assert torch.equal(flat(model), _params_after(2))


def test_total_that_is_not_the_sum_of_the_task_losses_is_refused() -> None:
    model = MultiTask()
    model.mangle = lambda out, i: {**out, "loss": out["loss"] + 0.1 * flat(model).pow(2).sum()}
    with pytest.raises(ValueError, match="check_total=False"):
        trainer(max_steps=1, callbacks=[UpdateBalancing()]).fit(model, loader())
    trainer(max_steps=1, callbacks=[UpdateBalancing(check_total=False)]).fit(model, loader())


def _nan_at(step: int) -> Any:
    def mangle(out: dict[str, Any], i: int) -> dict[str, Any]:
        if i == step:
            tasks = dict(out["task_losses"])
            tasks["t1"] = tasks["t1"] * math.nan
            return {"loss": sum(tasks.values()), "task_losses": tasks}
        return out

    return mangle


def test_nonfinite_task_loss_raises_and_changes_nothing() -> None:
    model = MultiTask()
    model.mangle = _nan_at(2)
    cb = UpdateBalancing()
    with pytest.raises(FloatingPointError, match=r"task\(s\) \['t1'\].*nonfinite='skip'"):
        trainer(max_steps=5, callbacks=[cb]).fit(model, loader())
    assert torch.equal(flat(model), _params_after(2))
    assert cb.optimizer is not None and cb.optimizer.state_dict()["pub"]["step"] == 2


def test_nonfinite_task_loss_skip_equals_dropping_that_batch() -> None:
    model = MultiTask()
    model.mangle = _nan_at(2)
    cb = UpdateBalancing(nonfinite="skip")
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader())
    assert cb.optimizer is not None and cb.optimizer.skipped_steps == 1
    # reference: the plain wrapper on the same batches without batch 2
    ref = MultiTask()
    opt = PUB(build_optimizer(ref), shared_params=ref.shared_parameters())
    for i, batch in enumerate(loader()):
        if i == 2:
            continue
        opt.zero_grad()
        opt.backward(ref.task_losses(batch))
        opt.step()
    assert torch.equal(flat(model), flat(ref))
    assert cb.optimizer.state_dict()["pub"] == opt.state_dict()["pub"]


def test_training_step_returning_none_skips_the_batch() -> None:
    model = MultiTask()
    model.mangle = lambda out, i: None if i == 1 else out
    cb = UpdateBalancing()
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader())
    ref = MultiTask()
    opt = PUB(build_optimizer(ref), shared_params=ref.shared_parameters())
    for i, batch in enumerate(loader()):
        if i != 1:
            opt.zero_grad()
            opt.backward(ref.task_losses(batch))
            opt.step()
    assert torch.equal(flat(model), flat(ref))


# ---------------------------------------------------------------------- unsupported set-ups
class Manual(MultiTask):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(MultiTask):
    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.trunk.parameters()),
            torch.optim.Adam(self.heads.parameters()),
        ]


class ReturnsPUB(MultiTask):
    def configure_optimizers(self) -> Any:
        return PUB(torch.optim.Adam(self.parameters()))


class OwnBackward(MultiTask):
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward()


class Lbfgs(MultiTask):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters())


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (Manual, "automatic optimization"),
        (ReturnsPUB, "return the plain optimizer"),
        (OwnBackward, "overrides `backward`"),
        (Lbfgs, "LBFGS"),
    ],
)
def test_unsupported_module_setups_are_refused(module: type, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        trainer(max_steps=1, callbacks=[UpdateBalancing()]).fit(module(), loader())


def test_several_optimizers_are_refused() -> None:
    # Lightning refuses them itself under automatic optimization, before the callback would
    with pytest.raises(RuntimeError, match="multiple optimizers"):
        trainer(max_steps=1, callbacks=[UpdateBalancing()]).fit(TwoOptimizers(), loader())


def test_unsupported_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="supports precision"):
        trainer(max_steps=1, precision="bf16-true", callbacks=[UpdateBalancing()]).fit(
            MultiTask(), loader()
        )


def test_two_callbacks_are_refused() -> None:
    # Lightning refuses two stateful callbacks with the same state key at construction
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(max_steps=1, callbacks=[UpdateBalancing(), UpdateBalancing()]).fit(
            MultiTask(), loader()
        )


def test_sharded_and_unknown_strategies_are_refused() -> None:
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*strategy='ddp'"):
        _check_strategy(FSDPStrategy())

    class Custom:  # stands for any other strategy
        pass

    with pytest.raises(ValueError, match="supports a single device and DDPStrategy"):
        _check_strategy(Custom())  # type: ignore[arg-type]
    _check_strategy(DDPStrategy())  # accepted
    _check_strategy(SingleDeviceStrategy("cpu"))
