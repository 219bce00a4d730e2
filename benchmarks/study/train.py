"""Training one (dataset, model, method, seed) of the study and caching its result as JSON.

Every method trains through the reference integration's ``run_training``, the same recipe for
all (seeding, model construction, loaders, Trainer arguments, early stopping, best-epoch restore,
test). Methods it names as balancers (equal weighting, PUB with its three strategies, MGDA /
IMTL-G / Nash-MTL) go in as ``TrainConfig.balancer``; the others use its two hooks: an extra
``UpdateBalancing`` callback (PCGrad, CAGrad, per-task state, marginal space, fixed weights) or a
module factory (uncertainty weighting and FAMO train a weighted loss; scenarios with loss scales
scale the task losses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from integrations.moe_ranking.data import MultiTaskData, Split, load_data
from integrations.moe_ranking.models import MultiTaskModel
from integrations.moe_ranking.training import (
    RankingModule,
    TrainConfig,
    run_training,
)
from pub_optim.lightning import UpdateBalancing
from pub_optim.loss_weighting import FAMO, UncertaintyWeighting
from pub_optim.strategies import CAGrad, Fixed, PCGrad, UpdateBalancer

from .methods import Method, get_method, unavailable
from .model_transforms import apply_transforms
from .provenance import provenance
from .scenarios import get_scenario

#: 2: records carry ``provenance`` (commit, dirty flag, code id, versions, CPU model) and the
#: run's real ``started_utc`` / ``finished_utc``.
SCHEMA = 2


# --------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything besides (dataset, model, method, seed) that defines a run."""

    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    patience: int = 3
    embed_dim: int = 8
    #: Keep only this many training rows (a fixed random subset, the same for every run).
    max_train_rows: int | None = None
    #: Keep only this many validation and test rows (fixed random subsets).
    max_eval_rows: int | None = None
    cagrad_c: float = 0.5
    #: Per-model keyword options for ``build_model`` (e.g. ``{"mmoe": {"num_experts": 8}}``).
    model_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Per-dataset keyword options for ``load_data``; the key is the run's dataset name, and an
    #: option ``"_loader"`` names the loader when it differs (``{"aliexpress-NL": {"_loader":
    #: "aliexpress", "country": "NL", "root": ...}}``).
    data_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Keep the task weights of every N-th step in the cached JSON.
    weights_every: int = 10
    #: Re-solve the balancing weights every N optimizer steps (callback methods).
    solve_every: int = 1
    #: Changes to the built model (``model_transforms.TRANSFORMS``: "batchnorm",
    #: "xavier-embedding").
    model_transforms: tuple[str, ...] = ()
    #: Lightning accelerator ("cpu", "gpu", "auto") and number of devices.
    accelerator: str = "cpu"
    devices: int = 1

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_options"] = {k: dict(v) for k, v in self.model_options.items()}
        out["model_transforms"] = list(self.model_transforms)
        out["data_options"] = {
            k: {n: str(x) if isinstance(x, Path) else x for n, x in v.items()}
            for k, v in self.data_options.items()
        }
        return out

    def identity(self) -> str:
        """Short hash of the settings: runs cached under other settings are never mixed in."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True, order=True)
class RunKey:
    dataset: str
    model: str
    method: str
    seed: int

    def path(self, root: Path) -> Path:
        return root / self.dataset / self.model / self.method / f"seed{self.seed}.json"

    def label(self) -> str:
        return f"{self.dataset}/{self.model}/{self.method}/seed{self.seed}"


# ------------------------------------------------------------------------------------- data
_DATA_CACHE: dict[str, MultiTaskData] = {}


def _subset(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:n].sort().values
    return split.rows(index)  # every tensor: history, text and the task mask too


def get_data(dataset: str, settings: Settings) -> MultiTaskData:
    """Load (once per process) and subsample a dataset as the settings say."""
    scenario = get_scenario(dataset) if dataset not in settings.data_options else None
    options = dict(settings.data_options.get(dataset, {}))
    key = json.dumps(
        [dataset, options, settings.max_train_rows, settings.max_eval_rows],
        sort_keys=True,
        default=str,
    )
    if key not in _DATA_CACHE:
        if scenario is not None:
            data = scenario.load()
        else:
            loader = str(options.pop("_loader", dataset))
            data = load_data(loader, **options)
        if settings.max_train_rows is not None or settings.max_eval_rows is not None:
            data = dataclasses.replace(
                data,
                train=_subset(data.train, settings.max_train_rows, 0),
                val=_subset(data.val, settings.max_eval_rows, 1),
                test=_subset(data.test, settings.max_eval_rows, 2),
            )
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


# ------------------------------------------------------------------------ loss weighting
class ScaledLossModule(RankingModule):
    """The integration's ``RankingModule`` with each task's loss multiplied by a fixed factor
    (the loss-scale scenarios); validation and test metrics are unchanged."""

    def __init__(
        self,
        model: MultiTaskModel,
        lr: float,
        weight_decay: float,
        loss_scales: Sequence[float] | None = None,
        task_kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay, task_kinds=task_kinds)
        scales = tuple(loss_scales) if loss_scales is not None else (1.0,) * len(self.task_names)
        if len(scales) != len(self.task_names) or not all(x > 0 for x in scales):
            raise ValueError(
                f"need one positive loss scale per task {self.task_names}, got {scales}"
            )
        self.loss_scales = dict(zip(self.task_names, scales, strict=True))

    def task_losses(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        losses, logits = super().task_losses(batch)
        if all(x == 1.0 for x in self.loss_scales.values()):
            return losses, logits
        return {t: loss * self.loss_scales[t] for t, loss in losses.items()}, logits


class LossWeightedModule(ScaledLossModule):
    """The integration's ``RankingModule`` trained on a weighted loss (one backward pass).

    ``weighting="uw"``: uncertainty weighting; its log-variances are parameters of this module,
    so the module's Adam trains them with the model. ``weighting="famo"``: FAMO; after every
    optimizer step the task losses of the same batch are re-evaluated without gradients (one
    extra forward pass, as in the reference code) and FAMO updates its logits.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        lr: float,
        weight_decay: float,
        weighting: str,
        loss_scales: Sequence[float] | None = None,
        task_kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, lr, weight_decay, loss_scales, task_kinds)
        k = len(self.task_names)
        self.weighting_name = weighting
        self.uw: UncertaintyWeighting | None = None
        self.famo: FAMO | None = None
        if weighting == "uw":
            self.uw = UncertaintyWeighting(k)
        elif weighting == "famo":
            self.famo = FAMO(k)
        else:
            raise ValueError(f"unknown loss weighting {weighting!r}")
        #: ``[step, w_1..w_K]`` after every optimizer step (weights on the task gradients,
        #: normalised to sum to one).
        self.weight_log: list[list[float]] = []

    def current_weights(self) -> Tensor:
        w = self.uw.weights() if self.uw is not None else self.famo.weights()  # type: ignore[union-attr]
        w = w.double()
        return w / w.sum()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        out = super().training_step(batch, batch_idx)
        losses = out["task_losses"]
        weighting = self.uw if self.uw is not None else self.famo
        assert weighting is not None
        return {"loss": weighting.combine(losses), "task_losses": losses}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.famo is not None:
            with torch.no_grad():
                new_losses, _ = self.task_losses(batch)
            self.famo.update(torch.stack([new_losses[t].detach() for t in self.task_names]))
        step = float(self.trainer.global_step)
        self.weight_log.append([step, *self.current_weights().tolist()])


# ----------------------------------------------------------------------------- training
@dataclass
class Outcome:
    """What one run produced."""

    task_names: tuple[str, ...]
    test: dict[str, float]
    best_epoch: int
    best_val: float
    epochs_run: int
    wall_time_s: float
    history: list[dict[str, float]]
    #: ``[step, w_1..w_K]`` rows, one per optimizer step.
    weights: list[list[float]]
    path: str


def _weights_rows(task_names: Sequence[str], rows: list[dict[str, float]]) -> list[list[float]]:
    return [[row["step"], *(row[t] for t in task_names)] for row in rows]


def make_config(key: RunKey, settings: Settings, balancer: str = "equal") -> TrainConfig:
    return TrainConfig(
        data=key.dataset,
        model=key.model,
        balancer=balancer,
        seed=key.seed,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        patience=settings.patience,
        embed_dim=settings.embed_dim,
        model_options=dict(settings.model_options.get(key.model, {})),
        accelerator=settings.accelerator,
        devices=settings.devices,
    )


def strategy_for(method: Method, seed: int, settings: Settings) -> UpdateBalancer:
    if method.strategy == "pcgrad":
        return PCGrad(seed=seed)
    if method.strategy == "cagrad":
        return CAGrad(c=settings.cagrad_c)
    raise ValueError(f"no study-side strategy for {method.name!r}")


def balancing_callback(method: Method, seed: int, settings: Settings, k: int) -> Callback:
    """The ``UpdateBalancing`` callback of a callback method the integration does not name."""
    strategy: Any
    if method.strategy in ("pcgrad", "cagrad"):
        strategy = strategy_for(method, seed, settings)
    elif method.fixed_ones:
        strategy = Fixed([1.0] * k, normalization="none")
    else:
        strategy = method.strategy
    return UpdateBalancing(  # type: ignore[no-any-return]
        strategy=strategy,
        space=method.space,  # type: ignore[arg-type]
        solve_every=settings.solve_every,
        **method.callback_options(),
    )


def train_method(
    key: RunKey, settings: Settings, data: MultiTaskData, loss_scales: Sequence[float] | None = None
) -> Outcome:
    """Train one run through ``run_training`` (see the module docstring)."""
    method = get_method(key.method)
    reason = unavailable(method)
    if reason is not None:
        raise ValueError(reason)
    k = len(data.task_names)
    scales = tuple(float(x) for x in loss_scales) if loss_scales is not None else None
    if scales is not None and len(scales) != k:
        raise ValueError(f"{len(scales)} loss scales for {k} tasks of {key.dataset!r}")
    named = method.balancer is not None and (
        method.balancer == "equal" or settings.solve_every == 1
    )
    config = make_config(key, settings, balancer=method.balancer if named else "equal")
    built: list[RankingModule] = []
    kinds = data.kinds()
    factory: Callable[[MultiTaskModel], RankingModule] | None = None
    if method.kind == "loss-weighting" or scales is not None or settings.model_transforms:

        def factory(model: MultiTaskModel) -> RankingModule:
            apply_transforms(model, settings.model_transforms)
            module: RankingModule
            if method.kind == "loss-weighting":
                module = LossWeightedModule(
                    model, settings.lr, settings.weight_decay, method.name, scales, kinds
                )
            elif scales is not None:
                module = ScaledLossModule(
                    model, settings.lr, settings.weight_decay, scales, task_kinds=kinds
                )
            else:
                module = RankingModule(
                    model, lr=settings.lr, weight_decay=settings.weight_decay, task_kinds=kinds
                )
            built.append(module)
            return module

    extra: list[Callback] = []
    if method.kind == "callback" and not named:
        extra.append(balancing_callback(method, key.seed, settings, k))
    result = run_training(config, data, module_factory=factory, extra_callbacks=extra)
    module_log = built[0].weight_log if built and isinstance(built[0], LossWeightedModule) else None
    return Outcome(
        task_names=tuple(result.task_names),
        test=dict(result.test),
        best_epoch=result.best_epoch,
        best_val=result.best_val,
        epochs_run=result.epochs_run,
        wall_time_s=result.wall_time_s,
        history=list(result.history),
        weights=module_log
        if module_log is not None
        else _weights_rows(result.task_names, result.weights),
        path="integration.run_training"
        if factory is None and not extra
        else "integration.run_training+hooks",
    )


# -------------------------------------------------------------------------------- caching
def environment() -> dict[str, str]:
    import pytorch_lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-12-02T19:40:03Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def result_json(
    key: RunKey,
    settings: Settings,
    outcome: Outcome,
    started_utc: str,
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's record; ``origin`` is its :func:`~benchmarks.study.provenance.provenance`
    (taken now when None) and ``started_utc`` when training began."""
    every = max(1, settings.weights_every)
    rows = outcome.weights
    kept = rows[::every]
    if rows and kept[-1] is not rows[-1]:
        kept.append(rows[-1])
    return {
        "schema": SCHEMA,
        "key": dataclasses.asdict(key),
        "settings_id": settings.identity(),
        "settings": settings.to_json(),
        "task_names": list(outcome.task_names),
        "test": outcome.test,
        "best_epoch": outcome.best_epoch,
        "best_val_mean_score": outcome.best_val,
        "epochs_run": outcome.epochs_run,
        "wall_time_s": outcome.wall_time_s,
        "history": outcome.history,
        "weights": {"every": every, "rows": kept},
        "training_path": outcome.path,
        "environment": environment(),
        "provenance": dict(origin) if origin is not None else provenance(),
        "started_utc": started_utc,
        "finished_utc": utc_now(),
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n")
    tmp.replace(path)


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def load_cached(
    path: Path, settings: Settings, code_id: str | None = None, accept_dirty: bool = False
) -> dict[str, Any] | None:
    """The cached result at ``path`` if it exists, is readable, has these settings and (when
    ``code_id`` is given) ran at that code state, on a clean checkout unless ``accept_dirty``."""
    payload = read_record(path)
    if payload is None:
        return None
    if payload.get("schema") != SCHEMA or payload.get("settings_id") != settings.identity():
        return None
    if code_id is not None:
        origin = payload.get("provenance", {})
        if origin.get("code_id") != code_id or (origin.get("dirty", True) and not accept_dirty):
            return None
    return payload


def run_one(
    key: RunKey,
    settings: Settings,
    root: str,
    code_id: str | None = None,
    accept_dirty: bool = False,
) -> tuple[RunKey, str, float]:
    """Train ``key`` unless cached; returns ``(key, "cached" | "done", seconds)``.

    Runs in a worker process: torch uses one thread (the models are small and the cores shared).
    The record's provenance is taken when the run starts.
    """
    path = key.path(Path(root))
    if load_cached(path, settings, code_id, accept_dirty) is not None:
        return key, "cached", 0.0
    torch.set_num_threads(1)
    started = utc_now()
    origin = provenance()
    data = get_data(key.dataset, settings)
    scenario = get_scenario(key.dataset) if key.dataset not in settings.data_options else None
    outcome = train_method(key, settings, data, scenario.loss_scales if scenario else None)
    write_json_atomic(path, result_json(key, settings, outcome, started, origin))
    return key, "done", outcome.wall_time_s
