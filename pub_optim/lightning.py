"""PyTorch Lightning integration: one callback turns an ordinary training into PUB training.

Works with ``pytorch_lightning`` and with the unified ``lightning`` package (``lightning.pytorch``),
installed side by side.

    trainer = Trainer(callbacks=[UpdateBalancing(strategy="pareto")])

Contract (automatic optimisation stays on): ``training_step`` returns the total loss and the
per-task losses::

    def training_step(self, batch, batch_idx):
        losses = {"ctr": loss_ctr, "cvr": loss_cvr}          # or a list of scalar tensors
        return {"loss": sum(losses.values()), "task_losses": losses}

Without the callback the same module trains on the summed loss. A module that knows its partition
defines ``shared_parameters()``; the callback passes it to :class:`~pub_optim.PUB` as
``shared_params`` (otherwise PUB discovers the shared parameters on the first step).

How it plugs in (``on_fit_start``, after the strategy has set up the model and optimizer, before a
checkpoint's optimizer state is restored):

* the configured optimizer is wrapped in :class:`LightningPUB` (a :class:`~pub_optim.PUB` whose
  ``step`` accepts Lightning's closure) and installed with the public ``trainer.optimizers``
  setter; LR schedulers keep driving the wrapped optimizer's ``param_groups``;
* the module's ``training_step`` is wrapped (on the instance, undone in ``teardown``) to capture
  the per-task losses, and its ``backward`` hook, which Lightning calls inside the optimizer
  closure with the total loss (divided by ``accumulate_grad_batches``, and multiplied by the
  GradScaler's scale under ``16-mixed``), is replaced by ``PUB.backward`` on the per-task losses
  with exactly the same division and scale;
* under DDP a :class:`~pub_optim.distributed.GradientAllReduce` averages the per-task gradients
  across ranks at the end of that backward (skipped inside Lightning's ``no_sync`` accumulation
  micro-batches, as DDP does);
* everything after the backward is Lightning's usual path: GradScaler ``unscale_``, gradient
  clipping, ``on_before_optimizer_step``, the scaler's skip rule, LR schedulers. PUB carries any
  change made to ``.grad`` between backward and step over to the per-task gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .distributed import GradientAllReduce, is_distributed
from .strategies import StrategyLike, UpdateBalancer, get_strategy
from .wrapper import PUB, BetweenSolves, Space, StateMode, split_task_losses


@dataclass(frozen=True)
class _Flavour:
    """The classes the callback needs from one Lightning distribution.

    ``pytorch_lightning`` and the unified ``lightning`` package (``lightning.pytorch``) are two
    copies of the same code with distinct classes: a ``lightning.pytorch`` trainer's strategy is
    not an instance of ``pytorch_lightning``'s ``DDPStrategy``. ``lightning`` depends on
    ``pytorch_lightning``, so both are usually installed side by side; the callback checks a
    trainer against the classes of the package that trainer comes from.
    """

    package: str
    trainer: type
    module: type
    callback: type
    precision: type
    double_precision: type
    mixed_precision: type
    ddp: type
    single_device: type
    is_overridden: Callable[..., bool]


def _load_flavour(package: str) -> _Flavour | None:
    try:
        root = import_module(package)
        precision = import_module(f"{package}.plugins.precision")
        strategies = import_module(f"{package}.strategies")
        helpers = import_module(f"{package}.utilities.model_helpers")
        callbacks = import_module(f"{package}.callbacks")
    except ImportError:
        return None
    return _Flavour(
        package=package,
        trainer=root.Trainer,
        module=root.LightningModule,
        callback=callbacks.Callback,
        precision=precision.Precision,
        double_precision=precision.DoublePrecision,
        mixed_precision=precision.MixedPrecision,
        ddp=strategies.DDPStrategy,
        single_device=strategies.SingleDeviceStrategy,
        is_overridden=helpers.is_overridden,
    )


_FLAVOURS: tuple[_Flavour, ...] = tuple(
    flavour
    for flavour in (_load_flavour("pytorch_lightning"), _load_flavour("lightning.pytorch"))
    if flavour is not None
)
if not _FLAVOURS:  # pragma: no cover - exercised by tests/lightning/test_import_guard.py
    raise ImportError(
        "pub_optim.lightning needs PyTorch Lightning: pip install 'pub-optim[lightning]'"
    )

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback as _CallbackBase
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies import Strategy
else:
    # An instance of every installed package's Callback class, so that either package's Trainer
    # takes it for one of its own (the two classes define the same hooks).
    _CallbackBase = (
        _FLAVOURS[0].callback
        if len(_FLAVOURS) == 1
        else type("Callback", tuple(f.callback for f in _FLAVOURS), {})
    )


def _flavour_of(trainer: object) -> _Flavour:
    for flavour in _FLAVOURS:
        if isinstance(trainer, flavour.trainer):
            return flavour
    packages = " or ".join(f"`{f.package}`" for f in _FLAVOURS)
    raise TypeError(
        f"UpdateBalancing needs a {packages} Trainer, got {type(trainer).__module__}."
        f"{type(trainer).__name__}"
    )


__all__ = ["LightningPUB", "UpdateBalancing"]

NonFinitePolicy = Literal["raise", "skip"]

_CONTRACT = (
    "return the total loss and the per-task losses from training_step, e.g.\n"
    "    losses = {'ctr': loss_ctr, 'cvr': loss_cvr}\n"
    "    return {'loss': sum(losses.values()), 'task_losses': losses}"
)


def _unwrapped_step(cls: type) -> Callable[..., Any]:
    """``cls.step`` without the profiling wrapper that torch installs on an optimizer class.

    ``torch.optim.Optimizer.__init__`` wraps ``type(self).step`` (marked ``hooked``) the first
    time an instance of that class is made; :class:`LightningPUB`'s own ``step`` is wrapped, so
    calling the wrapped ``PUB.step`` would run the step hooks twice. Whether ``PUB.step`` is
    wrapped depends on whether a plain ``PUB`` was made in this process (not in a worker of
    ``strategy="ddp_spawn"``, which unpickles the callback): only the profiling wrapper is
    removed, never ``PUB.step``'s own ``torch.no_grad()``.
    """
    step = cls.__dict__["step"]
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class LightningPUB(PUB):
    """The :class:`~pub_optim.PUB` that :class:`UpdateBalancing` installs in the trainer.

    Its :meth:`step` accepts the closure that Lightning's precision plugins pass (the closure runs
    ``training_step`` and the per-task backward), and skips the step when there is nothing to
    apply: ``training_step`` returned ``None``, or a non-finite task loss was seen with
    ``UpdateBalancing(nonfinite="skip")``. Its ``state_dict`` is PUB's: the wrapped optimizer's
    state and the balancer's state, both saved in the Lightning checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        #: A per-task backward ran since the last ``zero_grad`` / step.
        self.ready = False
        #: The next step is to be skipped (non-finite task loss, ``nonfinite="skip"``).
        self.skip_next = False
        #: Steps skipped by :attr:`skip_next`.
        self.skipped_steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.ready = False
        self.skip_next = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if not self.ready:
            return result  # training_step returned None: Lightning skips the batch
        if self.skip_next:
            self.skipped_steps += 1
            self.ready = False
            return result
        _unwrapped_step(PUB)(self)
        self.ready = False
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "pub" not in state_dict and "state" in state_dict and "param_groups" in state_dict:
            warnings.warn(
                "loading a plain optimizer state into UpdateBalancing's PUB: the balancer starts "
                "fresh (no task weights yet)",
                stacklevel=2,
            )
            self.optimizer.load_state_dict(state_dict)
            return
        super().load_state_dict(state_dict)


class UpdateBalancing(_CallbackBase):
    """Parameter Update Balancing for an ordinary Lightning training (automatic optimisation).

    Example::

        trainer = Trainer(callbacks=[UpdateBalancing(strategy="pareto")], max_epochs=5)
        trainer.fit(model)       # model.training_step returns {"loss": ..., "task_losses": ...}

    Args:
        strategy: ``"pareto"`` (default), ``"min-norm"``, ``"equal-magnitude"``, ``"equal"``, fixed
            weights, or an :class:`~pub_optim.UpdateBalancer`.
        space: ``"update"`` (PUB), ``"marginal"`` (the task-attributable parts ``d_k - d_0`` of
            the updates) or ``"gradient"`` (the MGDA / IMTL-G / Nash-MTL baselines); see
            :class:`~pub_optim.PUB`.
        state: ``"shared"`` (one optimizer state, the paper's) or ``"per_task"`` (every task its
            own state of the shared parameters); see :class:`~pub_optim.PUB`.
        diagnostics: measure and log, per task, how much of its update is momentum drift, and the
            gradients' norms and cosines beside the updates' (``docs/diagnostics.md``); costs one
            more look-ahead row per step.
        solve_every: re-solve the weights every N optimizer steps.
        between_solves: see :class:`~pub_optim.PUB`.
        chunk_size: see :class:`~pub_optim.PUB`.
        nonfinite: what a non-finite task loss does: ``"raise"`` (default) raises
            ``FloatingPointError`` before anything changes; ``"skip"`` skips that optimizer step
            (parameters, optimizer and balancer state untouched) and counts it in
            ``pub/skipped_steps``. Under DDP all ranks take the same decision. (Non-finite
            *gradients* from finite losses under ``16-mixed`` are the GradScaler's business: it
            skips the step and lowers the scale.)
        check_total: on the first step, check that ``"loss"`` equals the sum of the task losses
            (the gradients come from the task losses only: a regulariser in ``"loss"`` alone would
            be silently dropped).
        log_stats: log the task weights and per-task update norms (how and when: see
            ``log_every_n_steps``).
        log_cosines: also log the pairwise update cosines (``K (K - 1) / 2`` values).
        prog_bar: show the task weights in the progress bar.
        log_every_n_steps: ``None`` (default): log on the trainer's schedule (its
            ``log_every_n_steps``) through ``pl_module.log``, so the values also reach the
            progress bar and ``trainer.logged_metrics``. An integer N: write them every N
            optimizer steps, whatever the trainer's schedule, straight to ``trainer.loggers``
            (as Lightning's ``LearningRateMonitor`` does; with ``prog_bar=True`` the weights
            also go to the progress bar).
        prefix: prefix of the logged names (``"pub/weight/<task>"``, ``"pub/update_norm/<task>"``,
            ``"pub/cosine/<a>~<b>"``).
        bucket_cap_mb: largest single all-reduce under DDP.

    Supported: ``SingleDeviceStrategy`` and ``DDPStrategy`` (``"ddp"``, ``"ddp_spawn"``, ...);
    precision ``32-true``, ``64-true``, ``bf16-mixed``, ``16-mixed``; one optimizer (any
    parameter groups), LR schedulers, ``accumulate_grad_batches``, ``gradient_clip_val``.
    Refused with an error: manual optimisation, several optimizers, FSDP, DeepSpeed and other
    sharded or XLA strategies, other precision plugins, DDP ``static_graph``, a module that
    overrides ``backward``.
    """

    def __init__(
        self,
        strategy: StrategyLike = "pareto",
        *,
        space: Space = "update",
        state: StateMode = "shared",
        diagnostics: bool = False,
        solve_every: int = 1,
        between_solves: BetweenSolves = "weighted_gradient",
        chunk_size: int | None = None,
        nonfinite: NonFinitePolicy = "raise",
        check_total: bool = True,
        log_stats: bool = True,
        log_cosines: bool = True,
        prog_bar: bool = False,
        log_every_n_steps: int | None = None,
        prefix: str = "pub",
        bucket_cap_mb: float = 256.0,
    ) -> None:
        # Validate everything PUB validates, with PUB's own messages, on a throwaway instance.
        balancer: UpdateBalancer = get_strategy(strategy)
        PUB(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0),
            balancer,
            space=space,
            state=state,
            diagnostics=diagnostics,
            solve_every=solve_every,
            between_solves=between_solves,
            chunk_size=chunk_size,
        )
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        for name, flag in (
            ("check_total", check_total),
            ("log_stats", log_stats),
            ("log_cosines", log_cosines),
            ("prog_bar", prog_bar),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be a positive integer or None, got {log_every_n_steps!r}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        self.balancer = balancer
        self.space: Space = space
        self.state_mode: StateMode = state
        self.diagnostics = diagnostics
        self.solve_every = solve_every
        self.between_solves: BetweenSolves = between_solves
        self.chunk_size = chunk_size
        self.nonfinite: NonFinitePolicy = nonfinite
        self.check_total = check_total
        self.log_stats = log_stats
        self.log_cosines = log_cosines
        self.prog_bar = prog_bar
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.bucket_cap_mb = bucket_cap_mb
        self.optimizer: LightningPUB | None = None
        self.sync: GradientAllReduce | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._patched: list[str] = []
        self._captured: list[Tensor] | None = None
        self._captured_total: Tensor | None = None
        self._task_names: tuple[str, ...] | None = None
        self._scaler: Any = None
        self._nonfinite_local: Tensor | None = None
        self._bad_local: list[str] = []
        self._total_checked = False
        self._last_logged = -1
        self._restored_skipped = 0

    # ------------------------------------------------------------------------ trainer checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        flavour = _flavour_of(trainer)
        self._task_names = None  # a checkpoint being restored sets them again
        self._restored_skipped = 0
        mine = [cb for cb in trainer.callbacks if isinstance(cb, UpdateBalancing)]  # type: ignore[attr-defined]
        if len(mine) > 1:
            raise ValueError("only one UpdateBalancing callback can be used per Trainer")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "UpdateBalancing works with automatic optimization: remove "
                "`self.automatic_optimization = False` from the module and " + _CONTRACT
            )
        _check_strategy(trainer.strategy)
        _check_precision(trainer.strategy.precision_plugin)
        if flavour.is_overridden("backward", pl_module, flavour.module):
            raise ValueError(
                f"{type(pl_module).__name__} overrides `backward`: UpdateBalancing runs the "
                "per-task backward passes itself in place of `backward`; remove the override"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                "UpdateBalancing needs exactly one optimizer, configure_optimizers returned "
                f"{len(optimizers)}: put all parameters in one optimizer (parameter groups are "
                "fine)"
            )
        inner = optimizers[0]
        if isinstance(inner, PUB):
            raise ValueError(
                "configure_optimizers returned a PUB optimizer: return the plain optimizer "
                "(e.g. torch.optim.Adam(...)); UpdateBalancing wraps it"
            )
        if isinstance(inner, torch.optim.LBFGS):
            raise ValueError("UpdateBalancing does not support LBFGS (it re-evaluates closures)")
        if type(inner).__name__ == "ZeroRedundancyOptimizer":
            raise ValueError("UpdateBalancing does not support ZeroRedundancyOptimizer")
        shared = None
        if callable(getattr(pl_module, "shared_parameters", None)):
            shared = list(pl_module.shared_parameters())  # type: ignore[operator]
        sync = None
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            if getattr(model, "static_graph", False):
                raise ValueError(
                    "UpdateBalancing does not support DDP static_graph=True (its first-iteration "
                    "delayed all-reduce would run outside PUB's own synchronisation)"
                )
            sync = GradientAllReduce(model, bucket_cap_mb=self.bucket_cap_mb)
        self.sync = sync
        self.optimizer = LightningPUB(
            inner,
            strategy=self.balancer,
            space=self.space,
            state=self.state_mode,
            diagnostics=self.diagnostics,
            shared_params=shared,
            solve_every=self.solve_every,
            between_solves=self.between_solves,
            chunk_size=self.chunk_size,
            gradient_sync=sync,
        )
        self.optimizer.skipped_steps = self._restored_skipped
        trainer.optimizers = [self.optimizer]
        plugin = trainer.strategy.precision_plugin
        mixed = tuple(f.mixed_precision for f in _FLAVOURS)
        self._scaler = getattr(plugin, "scaler", None) if isinstance(plugin, mixed) else None
        self._trainer = trainer
        self._module = pl_module
        self._total_checked = not self.check_total
        self._last_logged = -1
        self._patch(pl_module)

    # ------------------------------------------------------------------ interception points
    def _patch(self, pl_module: pl.LightningModule) -> None:
        original_step = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original_step(*args, **kwargs)
            self._capture(output)
            return output

        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            self._backward(loss)

        training_step.__doc__ = original_step.__doc__
        pl_module.training_step = training_step  # type: ignore[method-assign]
        pl_module.backward = backward  # type: ignore[method-assign]
        self._patched = ["training_step", "backward"]

    def _unpatch(self) -> None:
        module = self._module
        if module is not None:
            for name in self._patched:
                if name in module.__dict__:
                    delattr(module, name)
        self._patched = []
        self._captured = None

    def _capture(self, output: Any) -> None:
        if output is None:
            self._captured = None  # Lightning skips the batch; so does the step
            return
        if isinstance(output, Tensor):
            raise TypeError(
                "training_step returned a single loss tensor, but UpdateBalancing needs the "
                "per-task losses: " + _CONTRACT
            )
        if not isinstance(output, Mapping) or "task_losses" not in output:
            keys = list(output) if isinstance(output, Mapping) else type(output).__name__
            raise TypeError(f"training_step returned {keys} without 'task_losses': " + _CONTRACT)
        tasks = output["task_losses"]
        named = split_task_losses(tasks)
        if named is None:
            raise TypeError(
                f"'task_losses' must be a dict name -> scalar loss or a list of scalar losses, got "
                f"{type(tasks).__name__}: " + _CONTRACT
            )
        names, losses = named
        if not losses:
            raise ValueError("'task_losses' is empty: " + _CONTRACT)
        for name, loss in zip(names, losses, strict=True):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                what = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise TypeError(
                    f"task loss {name!r} must be a scalar tensor, got {what} (reduce it with "
                    ".mean() or .sum())"
                )
        if self._task_names is not None and names != self._task_names:
            raise ValueError(
                f"training_step returned tasks {list(names)} but earlier steps returned "
                f"{list(self._task_names)}: return the same tasks, in the same order, at every "
                "step (a task with nothing to learn from in a batch can return a zero loss that "
                "is still connected to the graph, e.g. `0 * output.sum()`)"
            )
        self._task_names = names
        self._captured = losses
        total = output.get("loss")
        self._captured_total = total if isinstance(total, Tensor) else None

    def _backward(self, loss: Tensor) -> None:
        """Lightning's ``backward(loss)`` hook, replaced: PUB's per-task backward."""
        losses = self._captured
        self._captured = None
        pub, trainer = self.optimizer, self._trainer
        if losses is None or pub is None or trainer is None or self._task_names is None:
            raise RuntimeError(
                "UpdateBalancing: backward was called without per-task losses from training_step "
                "(was backward called outside Lightning's automatic optimization?)"
            )
        if not self._total_checked:
            self._check_total(losses)
        values = torch.stack([v.detach().reshape(()).float() for v in losses])
        bad = ~torch.isfinite(values)
        n = trainer.accumulate_grad_batches
        # as Lightning does with the total loss (dividing by 1 is exact: skipped)
        scaled = [v / n for v in losses] if n != 1 else list(losses)
        if self._scaler is not None:
            scaled = [self._scaler.scale(v) for v in scaled]
        named = dict(zip(self._task_names, scaled, strict=True))
        sync = self.sync
        if sync is None or not is_distributed(sync.process_group):
            if bool(bad.any()):
                self._remember_bad(bad)
                self._on_nonfinite(pub, total_bad=int(bad.sum()))  # raises, or marks a skip
            self._run_backward(pub, named)
            return
        # DDP: the ranks decide together. The non-finite count of the micro-batches since the
        # last step travels in the gradients' all-reduce (no extra collective).
        count = bad.sum().float().reshape(1)
        self._nonfinite_local = (
            count if self._nonfinite_local is None else self._nonfinite_local + count
        )
        self._remember_bad(bad)
        if not sync.enabled:  # a no_sync accumulation micro-batch: nothing is communicated
            self._run_backward(pub, named)
            return
        sync.extra = self._nonfinite_local
        self._nonfinite_local = None
        self._run_backward(pub, named)
        total_bad = 0 if sync.last_extra is None else int(sync.last_extra.sum())
        if total_bad:
            self._on_nonfinite(pub, total_bad)
        self._bad_local = []

    def _run_backward(self, pub: LightningPUB, losses: dict[str, Tensor]) -> None:
        # the losses were checked above (together across ranks under DDP)
        saved = pub.check_finite
        pub.check_finite = False
        try:
            pub.backward(losses)
        finally:
            pub.check_finite = saved
        pub.ready = True

    def _remember_bad(self, bad: Tensor) -> None:
        assert self._task_names is not None
        if bool(bad.any()):
            self._bad_local += [n for n, b in zip(self._task_names, bad.tolist(), strict=True) if b]

    def _on_nonfinite(self, pub: LightningPUB, total_bad: int) -> None:
        trainer = self._trainer
        assert trainer is not None
        where = (
            f"task(s) {sorted(set(self._bad_local))}"
            if self._bad_local
            else f"{total_bad} task loss(es) on another rank"
        )
        self._bad_local = []
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss for {where} at global step {trainer.global_step}: the step was "
                "not taken and nothing was changed; check the inputs and the learning rate, or "
                "use UpdateBalancing(nonfinite='skip') to skip such steps"
            )
        pub.skip_next = True

    def _check_total(self, losses: list[Tensor]) -> None:
        self._total_checked = True
        total = self._captured_total
        if total is None:
            raise ValueError("training_step returned no 'loss': " + _CONTRACT)
        values = torch.stack([v.detach().reshape(()).double() for v in losses])
        got = float(total.detach().double())
        want = float(values.sum())
        if not (math.isfinite(got) and math.isfinite(want)):
            return
        low = total.dtype in (torch.float16, torch.bfloat16) or any(
            v.dtype in (torch.float16, torch.bfloat16) for v in losses
        )
        tol = (1e-2 if low else 1e-5) * float(values.abs().sum()) + 1e-8
        if abs(got - want) > tol:
            raise ValueError(
                f"training_step's 'loss' ({got:.6g}) is not the sum of its 'task_losses' "
                f"({want:.6g}). UpdateBalancing computes the gradients from the task losses only, "
                "so a term that is only in 'loss' (a regulariser, an auxiliary loss) would be "
                "dropped: add it to one of the task losses (or to every task's share), or pass "
                "UpdateBalancing(check_total=False) if 'loss' is only for logging"
            )

    # -------------------------------------------------------------------------------- logging
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        pub = self.optimizer
        if pub is None or not self.log_stats or pub.last_stats is None:
            return
        stats = pub.last_stats
        if stats.step == self._last_logged:
            return  # no new step (accumulating, skipped, or the scaler skipped it)
        # At on_train_batch_end the step is taken: ``global_step`` counts it, and the logger
        # writes this batch's values under step ``global_step - 1`` (Lightning's 0-based row).
        own = self.log_every_n_steps
        every = own or int(getattr(trainer, "log_every_n_steps", 50))
        if every <= 0 or trainer.global_step % every != 0:
            return
        self._last_logged = stats.step
        names = stats.task_names
        weights = {
            f"{self.prefix}/weight/{n}": w
            for n, w in zip(names, stats.weights.tolist(), strict=True)
        }
        values: dict[str, float] = {}
        for name, norm in zip(names, stats.update_norms.tolist(), strict=True):
            values[f"{self.prefix}/update_norm/{name}"] = norm
        if self.log_cosines:
            cos = stats.cosines.tolist()
            for i, name in enumerate(names):
                for j in range(i + 1, len(names)):
                    values[f"{self.prefix}/cosine/{name}~{names[j]}"] = cos[i][j]
        if stats.diagnostics is not None:
            extra = stats.diagnostics.as_dict(names, self.prefix)
            if not self.log_cosines:
                extra = {key: value for key, value in extra.items() if "~" not in key}
            values.update(extra)
        if self.nonfinite == "skip":
            values[f"{self.prefix}/skipped_steps"] = float(pub.skipped_steps)
        kwargs: dict[str, Any] = {"on_step": True, "on_epoch": False, "batch_size": 1}
        if own is None:
            # On the trainer's schedule: through pl_module.log (loggers, progress bar,
            # trainer.logged_metrics), fresh at every step the logger writes.
            pl_module.log_dict(weights, prog_bar=self.prog_bar, **kwargs)
            pl_module.log_dict(values, prog_bar=False, **kwargs)
            return
        # On the callback's own schedule: straight to the loggers, as Lightning's
        # LearningRateMonitor does. (Values logged through pl_module.log stay in Lightning's
        # results until logged again, so the logger would write them again, stale, at each of
        # its own steps in between.)
        if self.prog_bar:
            pl_module.log_dict(weights, prog_bar=True, logger=False, **kwargs)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**weights, **values}, step=trainer.global_step - 1)

    # ----------------------------------------------------------------------- state and cleanup
    def state_dict(self) -> dict[str, Any]:
        skipped = self.optimizer.skipped_steps if self.optimizer is not None else 0
        return {
            "task_names": None if self._task_names is None else list(self._task_names),
            "skipped_steps": skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = state_dict.get("task_names")
        self._task_names = None if names is None else tuple(names)
        self._restored_skipped = int(state_dict.get("skipped_steps", 0))
        if self.optimizer is not None:
            self.optimizer.skipped_steps = self._restored_skipped

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unpatch()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unpatch()


def _check_strategy(strategy: Strategy) -> None:
    name = type(strategy).__name__
    unsupported = {
        "FSDPStrategy": "FSDP shards the parameters, so per-task updates of the full shared "
        "parameters are never materialised on one rank",
        "DeepSpeedStrategy": "DeepSpeed runs its own backward and optimizer step",
        "ModelParallelStrategy": "the parameters are sharded (DTensor)",
        "XLAStrategy": "XLA devices are not supported",
        "SingleDeviceXLAStrategy": "XLA devices are not supported",
    }
    for cls in type(strategy).__mro__:
        if cls.__name__ in unsupported:
            raise ValueError(
                f"UpdateBalancing does not support {name}: {unsupported[cls.__name__]}. Use "
                "strategy='ddp' (or a single device)"
            )
    supported = tuple(cls for f in _FLAVOURS for cls in (f.single_device, f.ddp))
    if not isinstance(strategy, supported):
        raise ValueError(f"UpdateBalancing supports a single device and DDPStrategy, not {name}")
    if getattr(strategy, "_model_averaging_period", None) is not None:
        raise ValueError("UpdateBalancing does not support DDP post-local-SGD model averaging")
    if getattr(strategy, "_ddp_comm_hook", None) is not None:
        raise ValueError(
            "UpdateBalancing does not support DDP communication hooks: PUB averages the "
            "per-task gradients itself (see pub_optim.distributed)"
        )


def _check_precision(plugin: Precision) -> None:
    supported = [
        cls for f in _FLAVOURS for cls in (f.precision, f.double_precision, f.mixed_precision)
    ]
    if type(plugin) in supported:
        return
    raise ValueError(
        f"UpdateBalancing supports precision '32-true', '64-true', 'bf16-mixed' and '16-mixed', "
        f"not {type(plugin).__name__}"
    )
