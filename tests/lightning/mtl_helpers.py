"""A small multi-task LightningModule and an independent manual PUB loop to compare against.

``MultiTask`` is a ``pytorch_lightning`` module; :func:`module_class` and :func:`trainer` give the
same module and trainer for the unified ``lightning`` package (``lightning.pytorch``) too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pub_optim import PUB

IN = 6


def make_data(n: int = 160, seed: int = 3) -> TensorDataset:
    """Inputs and three targets (task k learns target k % 3)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen)
    y = torch.stack(
        [x[:, 0] - 0.5 * x[:, 1], (x[:, 2] + x[:, 3] > 0).float(), x[:, 4] * x[:, 5]], 1
    )
    return TensorDataset(x, y)


def loader(batch_size: int = 16, **kw: Any) -> DataLoader:
    return DataLoader(make_data(**kw), batch_size=batch_size, shuffle=False)


#: The two Lightning distributions the callback supports.
PACKAGES = ("pytorch_lightning", "lightning.pytorch")


class _MultiTaskBody:
    """Shared trunk, one head per task; options cover the features under test."""

    def __init__(
        self,
        tasks: int = 2,
        lr: float = 1e-2,
        optimizer: str = "adam",
        param_groups: bool = False,
        scheduler: str | None = None,
        expose_shared: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))
        self.tasks = tasks
        self.lr = lr
        self.optimizer_name = optimizer
        self.param_groups = param_groups
        self.scheduler = scheduler
        self.expose_shared = expose_shared
        #: Optional hook to change the output of training_step (bad-input tests).
        self.mangle: Callable[[dict[str, Any], int], Any] | None = None

        if not expose_shared:  # no partition hook: PUB discovers the shared parameters
            self.shared_parameters = None  # type: ignore[assignment,method-assign]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        h = self.trunk(x)
        out: dict[str, Tensor] = {}
        for k, head in enumerate(self.heads):
            pred = head(h).squeeze(-1)
            target = y[:, k % 3].float()
            if k % 3 == 1:
                out[f"t{k}"] = nn.functional.binary_cross_entropy_with_logits(pred.float(), target)
            else:
                out[f"t{k}"] = (pred.float() - target).pow(2).mean()
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        losses = self.task_losses(batch)
        output: dict[str, Any] = {"loss": sum(losses.values()), "task_losses": losses}
        if self.mangle is not None:
            return self.mangle(output, batch_idx)
        return output

    def configure_optimizers(self) -> Any:
        return build_optimizer(self)


class MultiTask(_MultiTaskBody, pl.LightningModule):  # type: ignore[misc]
    """The test module, as a ``pytorch_lightning.LightningModule``."""


@functools.cache
def module_class(package: str = "pytorch_lightning") -> type[MultiTask]:
    """``MultiTask`` as a LightningModule of ``package`` (one of :data:`PACKAGES`)."""
    if package == "pytorch_lightning":
        return MultiTask
    base = importlib.import_module(package).LightningModule
    return type("MultiTask", (_MultiTaskBody, base), {"__module__": __name__})  # type: ignore[return-value]


def build_optimizer(module: _MultiTaskBody) -> Any:
    if module.param_groups:
        params: Any = [
            {"params": module.trunk.parameters()},
            {"params": module.heads.parameters(), "lr": module.lr * 0.5, "weight_decay": 1e-2},
        ]
    else:
        params = module.parameters()
    if module.optimizer_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=module.lr)
    elif module.optimizer_name == "adamw":
        opt = torch.optim.AdamW(params, lr=module.lr)
    else:
        opt = torch.optim.SGD(params, lr=module.lr, momentum=0.9)
    if module.scheduler == "step":
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}
    if module.scheduler == "per-step":
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    return opt


def trainer(package: str = "pytorch_lightning", **kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    defaults.update(kw)
    return importlib.import_module(package).Trainer(**defaults)  # type: ignore[no-any-return]


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def manual_pub_loop(
    module: _MultiTaskBody,
    data: DataLoader,
    epochs: int,
    *,
    strategy: str = "pareto",
    accumulate: int = 1,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    solve_every: int = 1,
) -> PUB:
    """What the callback must do, written out by hand with the plain wrapper."""
    configured = build_optimizer(module)
    if isinstance(configured, dict):
        inner = configured["optimizer"]
        sched_cfg = configured["lr_scheduler"]
        if isinstance(sched_cfg, dict):
            sched, interval = sched_cfg["scheduler"], sched_cfg.get("interval", "epoch")
        else:
            sched, interval = sched_cfg, "epoch"
    else:
        inner, sched, interval = configured, None, "epoch"
    shared = module.shared_parameters() if module.expose_shared else None
    opt = PUB(inner, strategy=strategy, shared_params=shared, solve_every=solve_every)
    batches = len(data)
    for _ in range(epochs):
        for i, batch in enumerate(data):
            if i % accumulate == 0:
                opt.zero_grad()
            with _autocast(autocast):
                losses = module.task_losses(batch)
            losses = {k: v / accumulate for k, v in losses.items()}
            if scaler is not None:
                losses = {k: scaler.scale(v) for k, v in losses.items()}
            opt.backward(losses)
            if (i + 1) % accumulate != 0 and i + 1 != batches:
                continue
            if scaler is not None:
                scaler.unscale_(opt)
            if clip is not None:
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if sched is not None and interval == "step":
                sched.step()
        if sched is not None and interval == "epoch":
            sched.step()
    return opt


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            yield
