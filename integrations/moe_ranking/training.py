"""Training with PyTorch Lightning: the LightningModule, the callbacks and ``run_training``.

The module follows the contract of ``pub_optim.lightning.UpdateBalancing`` (docs/api-contract.md):
automatic optimisation, ``training_step`` returns ``{"loss": total, "task_losses": {task: loss}}``
and ``shared_parameters()`` exposes the model's declared partition. Without the callback the same
module trains on the summed loss, i.e. equal weighting.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.callbacks import Callback, EarlyStopping
except ImportError as _exc:
    from ._extras import missing_extra

    raise missing_extra("pytorch_lightning", _exc, "training (PyTorch Lightning)") from _exc

from .data.base import BINARY, Batch, MultiTaskData, make_loader
from .errors import ConfigError
from .losses import task_losses
from .metrics import ExpertLoad, TaskMetrics, score_key
from .models import MultiTaskModel, build_model

#: Balancers in the space of updates (PUB) and their gradient-space counterparts (baselines).
UPDATE_BALANCERS = ("pareto", "min-norm", "equal-magnitude")
#: PUB pareto with one optimizer state per task, or in the marginal space (pub_optim.PUB).
VARIANT_BALANCERS: dict[str, dict[str, str]] = {
    "pareto-per-task": {"strategy": "pareto", "state": "per_task"},
    "pareto-marginal": {"strategy": "pareto", "space": "marginal"},
}
GRADIENT_BALANCERS = {"nash-mtl": "pareto", "mgda": "min-norm", "imtl-g": "equal-magnitude"}
BALANCERS = ("equal", *UPDATE_BALANCERS, *VARIANT_BALANCERS, *GRADIENT_BALANCERS)
#: What early stopping and the best-epoch restore follow: the mean over tasks of the validation AUC
#: (binary tasks) and R² (regression tasks); ``val/mean_auc`` on data with binary tasks only.
MONITOR = "val/mean_score"


@dataclass
class TrainConfig:
    """Everything that defines one training run (written into ``metrics.json``)."""

    data: str = "adult"
    model: str = "mmoe"
    balancer: str = "equal"
    esmm: bool = False
    seed: int = 0
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    patience: int = 3
    embed_dim: int = 8
    #: Lightning accelerator: "cpu" (default; deterministic), "gpu" or "auto". On CUDA the sparse
    #: model's gating runs the fused Triton kernel when triton is installed.
    accelerator: str = "cpu"
    #: Lightning devices (more than one trains with DDP).
    devices: int = 1
    model_options: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.balancer not in BALANCERS:
            raise ConfigError(
                f"unknown balancer {self.balancer!r}; choose one of {', '.join(BALANCERS)}"
            )
        for name in ("epochs", "batch_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.devices < 1:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")
        if self.accelerator not in ("cpu", "gpu", "auto"):
            raise ConfigError(f"accelerator must be cpu, gpu or auto, got {self.accelerator!r}")
        if self.accelerator == "gpu" and not torch.cuda.is_available():
            raise ConfigError("accelerator 'gpu' needs a CUDA device, and torch sees none")


def make_balancer_callback(balancer: str) -> Callback | None:
    """The ``UpdateBalancing`` callback for ``balancer`` (None for plain equal weighting)."""
    if balancer not in BALANCERS:
        raise ConfigError(f"unknown balancer {balancer!r}; choose one of {', '.join(BALANCERS)}")
    if balancer == "equal":
        return None
    try:
        from pub_optim.lightning import UpdateBalancing
    except ImportError as exc:
        raise ConfigError(
            f"balancer {balancer!r} needs pub_optim.lightning.UpdateBalancing, which could not be "
            f"imported ({exc}); use --balancer equal"
        ) from exc
    if balancer in GRADIENT_BALANCERS:
        return UpdateBalancing(strategy=GRADIENT_BALANCERS[balancer], space="gradient")  # type: ignore[no-any-return]
    if balancer in VARIANT_BALANCERS:
        return UpdateBalancing(**VARIANT_BALANCERS[balancer])  # type: ignore[no-any-return,arg-type]
    return UpdateBalancing(strategy=balancer)  # type: ignore[no-any-return]


class RankingModule(pl.LightningModule):
    """One loss per task (+ the model's per-task auxiliary losses), Adam, metrics.

    A binary task trains on the binary cross-entropy of its logit, a regression task on the
    squared error of its output (``task_kinds``, from ``MultiTaskData.kinds()``; default: every
    task binary).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        task_kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task_names = tuple(model.task_names)
        self.task_kinds = (
            tuple(task_kinds) if task_kinds is not None else (BINARY,) * len(self.task_names)
        )
        self.lr, self.weight_decay = lr, weight_decay
        self.val_metrics = TaskMetrics(self.task_names, "val", self.task_kinds)
        self.test_metrics = TaskMetrics(self.task_names, "test", self.task_kinds)
        self.expert_load = ExpertLoad()
        self.last_expert_load: dict[str, float] = {}
        self._loss_sums: dict[str, float] = {}
        self._loss_rows: dict[str, int] = {}

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The model's declared shared parameters (used by ``UpdateBalancing``)."""
        return self.model.shared_parameters()

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.model(batch)  # type: ignore[no-any-return]

    def task_losses(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(per-task losses incl. auxiliary terms, logits)."""
        logits = self.model(batch)
        losses = task_losses(
            logits, batch["labels"], self.task_names, batch.get("task_mask"), self.task_kinds
        )
        for t, aux in self.model.aux_losses().items():
            losses[t] = losses[t] + aux
        return losses, logits

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        losses, _ = self.task_losses(batch)
        total = torch.stack(list(losses.values())).sum()
        n = batch["labels"].shape[0]
        self.log("train/loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.expert_load.update(self.model.expert_usage())
        mask = batch.get("task_mask")
        rows = {"train/loss": n}
        for i, t in enumerate(self.task_names):  # a task's mean over its own rows (task mask)
            rows[f"train/loss/{t}"] = n if mask is None else int(mask[:, i].sum())
        values = {"train/loss": total, **{f"train/loss/{t}": v for t, v in losses.items()}}
        for key, value in values.items():
            self._loss_sums[key] = self._loss_sums.get(key, 0.0) + float(value.detach()) * rows[key]
            self._loss_rows[key] = self._loss_rows.get(key, 0) + rows[key]
        return {"loss": total, "task_losses": losses}

    def epoch_train_stats(self) -> dict[str, float]:
        """Mean training losses (per row; per task over the task's rows) and expert-load
        statistics of the current epoch so far."""
        stats = {k: v / max(self._loss_rows[k], 1) for k, v in self._loss_sums.items()}
        stats.update(self.expert_load.compute())
        return stats

    def on_train_epoch_start(self) -> None:
        self.expert_load.reset()
        self._loss_sums, self._loss_rows = {}, {}

    def on_train_epoch_end(self) -> None:
        stats = self.expert_load.compute()
        if stats:
            self.last_expert_load = stats
            self.log_dict(stats)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.model(batch), batch["labels"], batch.get("task_mask"))

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        score = results.pop(MONITOR)
        self.log_dict(results)
        self.log(MONITOR, score, prog_bar=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_metrics.update(self.model(batch), batch["labels"], batch.get("task_mask"))

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(results)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class BestWeights(Callback):
    """Keep (in memory) the weights of the best validation epoch and restore them at the end."""

    def __init__(self, monitor: str = MONITOR) -> None:
        self.monitor = monitor
        self.best_score = -float("inf")
        self.best_epoch = -1
        self.best_state: dict[str, Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and float(score) > self.best_score:
            self.best_score = float(score)
            self.best_epoch = trainer.current_epoch
            self.best_state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)


class History(Callback):
    """Record validation metrics per epoch and the task weights applied at every step.

    The weights come from the optimizer's ``last_stats.weights`` when the balancing callback has
    wrapped it in :class:`pub_optim.PUB`; without it the summed loss weighs every task equally,
    recorded as ``1 / K`` so that both runs plot on the same scale.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = tuple(task_names)
        self.epochs: list[dict[str, float]] = []
        self.weights: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        k = len(self.task_names)
        weights: Sequence[float] = [1.0 / k] * k
        for opt in trainer.optimizers:
            stats = getattr(opt, "last_stats", None)
            if stats is not None and getattr(stats, "weights", None) is not None:
                w = torch.as_tensor(stats.weights, dtype=torch.float64).flatten()
                weights = (w / w.sum()).tolist() if float(w.sum()) != 0 else w.tolist()
                break
        row = {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch)}
        row.update({t: float(w) for t, w in zip(self.task_names, weights, strict=True)})
        self.weights.append(row)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        row["elapsed_s"] = time.perf_counter() - self._start
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                row[key] = float(value)
        if isinstance(pl_module, RankingModule):
            # Validation runs after the epoch's last training batch and before the epoch-end
            # hooks, so these are exactly this epoch's training statistics.
            row.update(pl_module.epoch_train_stats())
        self.epochs.append(row)


@dataclass
class RunResult:
    """What one run produced (written out by :mod:`integrations.moe_ranking.outputs`)."""

    config: TrainConfig
    task_names: tuple[str, ...]
    test: dict[str, float]
    best_epoch: int
    best_val: float
    epochs_run: int
    wall_time_s: float
    history: list[dict[str, float]]
    weights: list[dict[str, float]]
    expert_load: dict[str, float]
    num_parameters: int
    data_summary: str
    #: Number of parameter entries PUB balanced (the model's shared parameters); 0 without it.
    balanced_numel: int = 0
    model: MultiTaskModel | None = field(default=None, repr=False)

    def test_auc(self, task: str) -> float:
        return self.test[f"test/auc/{task}"]

    def test_score(self, task: str) -> float:
        """The task's test AUC (binary task) or R² (regression task)."""
        return self.test[score_key(self.test, task)]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "task_names": list(self.task_names),
            "test": self.test,
            "best_epoch": self.best_epoch,
            "best_val_mean_score": self.best_val,
            "epochs_run": self.epochs_run,
            "wall_time_s": self.wall_time_s,
            "expert_load_last_epoch": self.expert_load,
            "num_parameters": self.num_parameters,
            "balanced_parameters": self.balanced_numel,
            "data": self.data_summary,
        }


def quiet_lightning() -> None:
    """Silence Lightning's informational banner and warnings that do not apply here.

    (``warnings.filterwarnings`` replaces an identical filter, so repeated calls do not pile up.)
    """
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def make_trainer(
    config: TrainConfig,
    callbacks: list[Callback],
    progress: bool = False,
    root_dir: str | Path | None = None,
) -> pl.Trainer:
    """The Trainer of :func:`run_training`: no logger or checkpoint files, no sanity check."""
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        max_epochs=config.epochs,
        # Bit-for-bit reproducible on one CPU machine (same CPU model and versions; across CPU
        # models float reductions differ and results move by ~1e-3 AUC); on GPU some scatter
        # kernels have no deterministic implementation, so only warn there.
        deterministic=True if config.accelerator == "cpu" else "warn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=str(root_dir) if root_dir is not None else None,
    )


def run_training(
    config: TrainConfig,
    data: MultiTaskData,
    progress: bool = False,
    root_dir: str | Path | None = None,
    module_factory: Callable[[MultiTaskModel], RankingModule] | None = None,
    extra_callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train ``config.model`` on ``data`` with early stopping, restore the best epoch, test.

    ``module_factory`` builds the LightningModule around the (seeded) model instead of
    :class:`RankingModule` (e.g. a module trained on a weighted loss); ``extra_callbacks`` join
    the Trainer's callbacks after the balancing callback (e.g. ``UpdateBalancing`` with a strategy
    instance). Neither changes anything else of the recipe.

    Deterministic on CPU for a given seed on one machine: the model is built after seeding,
    batches are shuffled by a generator seeded from ``config.seed`` and Lightning runs with
    ``deterministic=True``. Not bit-identical across CPU models: vectorised float reductions
    differ, early stopping can pick another epoch, and per-seed test AUC has been seen to move by
    up to 1.3e-3 between two x86 machines with identical python / torch / Lightning versions.
    """
    config.validate()
    balancer_cb = make_balancer_callback(config.balancer)
    quiet_lightning()
    start = time.perf_counter()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = build_model(
        config.model, data, esmm=config.esmm, embed_dim=config.embed_dim, **config.model_options
    )
    if module_factory is None:
        module = RankingModule(
            model, lr=config.lr, weight_decay=config.weight_decay, task_kinds=data.kinds()
        )
    else:
        module = module_factory(model)
        if module.task_kinds != data.kinds():
            raise ConfigError(
                f"the module factory built a module for task kinds {module.task_kinds}, but "
                f"{data.name!r} has {data.kinds()}; pass task_kinds=data.kinds() to RankingModule"
            )
    best, history = BestWeights(), History(model.task_names)
    callbacks: list[Callback] = [
        EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience),
        best,
        history,
    ]
    if balancer_cb is not None:
        callbacks.append(balancer_cb)
    callbacks.extend(extra_callbacks)
    try:
        trainer = make_trainer(config, callbacks, progress, root_dir)
    except MisconfigurationException as exc:
        raise ConfigError(f"cannot train with accelerator {config.accelerator!r}: {exc}") from exc
    train_loader = make_loader(data.train, config.batch_size, shuffle=True, seed=config.seed)
    eval_batch = max(config.batch_size, 4096)
    trainer.fit(module, train_loader, make_loader(data.val, eval_batch, shuffle=False))
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    balanced = getattr(optimizer, "shared_params", None)  # set when the callback wrapped it in PUB
    balanced_numel = sum(p.numel() for p in balanced) if balanced is not None else 0
    trainer.test(module, make_loader(data.test, eval_batch, shuffle=False), verbose=False)
    test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    return RunResult(
        config=config,
        task_names=tuple(model.task_names),
        test=test,
        best_epoch=best.best_epoch,
        best_val=best.best_score,
        epochs_run=trainer.current_epoch,
        wall_time_s=time.perf_counter() - start,
        history=history.epochs,
        weights=history.weights,
        expert_load=module.last_expert_load,
        num_parameters=model.num_parameters(),
        data_summary=data.describe(),
        balanced_numel=balanced_numel,
        model=model,
    )
