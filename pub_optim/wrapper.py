"""``PUB``: wrap any ``torch.optim`` optimizer so that it balances tasks on its own updates.

Yuan, Cai, Dong, "A Parameter Update Balancing Algorithm for Multi-task Ranking Models in
Recommendation Systems", arXiv:2410.05806. One step, K tasks, shared parameters theta:

1. per-task gradients ``g_k`` of the shared parameters (:meth:`PUB.backward`);
2. per-task look-ahead updates ``d_k = T(g_k; S)`` from the shared optimizer state ``S``,
   without changing it;
3. Gram matrix ``G = [<d_i, d_j>]`` (accumulated in float64);
4. weights ``alpha = strategy(G)``, normalised to sum to one by default;
5. ``theta <- theta + sum_k alpha_k d_k`` (decoupled weight decay exactly once);
6. the state advances as if the optimizer had received ``g* = sum_k alpha_k g_k``.

Task-specific parameters (reached by one task) take the wrapped optimizer's ordinary step on their
own gradient. ``space="gradient"`` runs the same strategies on the gradients' Gram matrix followed
by an ordinary step on ``g*``: the MGDA / IMTL-G / Nash-MTL baselines; ``space="marginal"``
balances ``d_k - d_0``, the part of each update that the task's gradient accounts for
(:mod:`pub_optim.spaces`). ``state="per_task"`` gives every task its own optimizer state
(:mod:`pub_optim.task_states`).

This module is the ``torch.optim`` facade; a step goes one way through the package, one module
per axis:

* losses -> per-task gradients: :mod:`pub_optim.task_gradients` (the partition, the per-task
  backward passes, the carry-over of ``.grad`` edits);
* -> look-ahead updates from which state: :mod:`pub_optim.transforms` (one transform per optimizer
  family) reading the shared state or :mod:`pub_optim.task_states`;
* -> Gram matrices in which space: :mod:`pub_optim.exact_step` (eager blocks or the compiled
  kernels) and :mod:`pub_optim.spaces`;
* -> weights: :mod:`pub_optim.strategies` (on the device with ``sync_free``:
  :mod:`pub_optim.solvers.device`);
* -> apply: :mod:`pub_optim.exact_step` again, or, for optimizers without an exact transform and
  for the gradient space, the wrapped optimizer's own ``step()`` (:meth:`PUB._combined_step`,
  :mod:`pub_optim.transforms.generic`);
* -> what was seen: :mod:`pub_optim.stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .combined import CombinedOptimizer
from .exact_step import ExactStepEngine, TaskGrads
from .facade import init_facade
from .rowsparse import SparseContext, SparseRowTransform, TaskRows, sparse_transform_for
from .rowsparse import gram as sparse_gram
from .spaces import SPACES, Space, StepGrams, drift_weight
from .stats import BalanceStats
from .strategies import StrategyLike, UpdateBalancer, get_strategy
from .task_gradients import NONFINITE_SHARED, TaskGradients, dense_view, max_abs
from .task_states import TaskStates
from .transforms import UpdateTransform, exact_transform_for
from .transforms.base import ParamContext
from .transforms.generic import GenericLookahead

StateMode = Literal["shared", "per_task"]
STATE_MODES: tuple[StateMode, ...] = ("shared", "per_task")
BetweenSolves = Literal["weighted_gradient", "reuse_weights"]
TaskLosses = Sequence[Tensor] | Mapping[str, Tensor]


@dataclass(frozen=True)
class GradientView:
    """What a ``gradient_sync`` hook sees at the end of :meth:`PUB.backward` (live objects).

    The hook may change the tensors and ``reached`` in place (e.g. average them across ranks, see
    :class:`pub_optim.distributed.GradientAllReduce`); :meth:`PUB.step` then uses what it left.

    Attributes:
        shared: the balanced parameters.
        task_grads: per shared parameter, its ``[K, *p.shape]`` per-task gradients (accumulated
            since ``zero_grad``); ``None`` after a between-solves weighted backward, where the
            shared parameters' ``.grad`` hold ``sum_k alpha_k g_k`` instead. A hook that changes
            ``task_grads`` must leave each shared ``.grad`` equal to ``task_grads[i].sum(0)``.
        reached: per shared parameter, whether any task reached it (a parameter that no task
            reached is skipped by the step); a hook sets it when gradients arrive from elsewhere.
        others: every other parameter of the wrapped optimizer (they step on their ``.grad``).
    """

    shared: list[Tensor]
    task_grads: list[Tensor] | None
    reached: list[bool]
    others: list[Tensor]


GradientSync = Callable[[GradientView], None]


class PUB(torch.optim.Optimizer):
    """Parameter Update Balancing around an existing optimizer.

    Example::

        opt = PUB(torch.optim.Adam(model.parameters(), lr=1e-3), strategy="pareto")
        opt.zero_grad()
        opt.backward({"ctr": loss_ctr, "cvr": loss_cvr})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional
        opt.step()

    Args:
        optimizer: the wrapped optimizer. Exact look-ahead transforms exist for ``SGD``, ``Adam``,
            ``AdamW``, ``RMSprop`` and ``Adagrad``; any other elementwise optimizer takes the
            generic snapshot-and-restore path (K extra ``step()`` calls per step). A list of
            optimizers over disjoint parameters is wrapped as one
            (:class:`~pub_optim.CombinedOptimizer`: e.g. ``SparseAdam`` for the sparse-gradient
            embedding tables and ``Adam`` for the dense layers, one Gram matrix over both).
        strategy: ``"pareto"`` (default, the paper's choice), ``"min-norm"``,
            ``"equal-magnitude"``, ``"equal"``, a sequence of fixed weights, or an
            :class:`~pub_optim.UpdateBalancer`.
        space: ``"update"`` balances the look-ahead updates (PUB); ``"marginal"`` balances their
            task-attributable parts ``d_k - d_0`` (``d_0``: the update of a zero gradient, the
            momentum drift every task shares) and applies ``d_0 + sum_k alpha_k (d_k - d_0)``;
            ``"gradient"`` balances the raw gradients and steps on their weighted sum (MGDA,
            IMTL-G, Nash-MTL). See :mod:`pub_optim.spaces`.
        state: ``"shared"`` (default, the paper's): one state of the wrapped optimizer, advanced
            with ``g* = sum_k alpha_k g_k``. ``"per_task"``: every task keeps its own state for
            the shared parameters (AdaTask, Yang et al., AAAI 2023): ``d_k = T(g_k; S_k)``, the
            parameters move by ``sum_k alpha_k d_k`` and each ``S_k`` advances with its own
            ``g_k``; task-specific parameters keep the ordinary state. The compiled Adam kernels
            (``fused``) run it as they run the shared state, each task's look-ahead and drift from
            its own state (eager for a step whose tasks' states differ in step count, and for the
            drift term of weights that do not sum to one). Not with ``space="gradient"`` (one
            ordinary step on ``g*``: one state), ``sync_free``, or ``solve_every > 1`` with
            ``between_solves="weighted_gradient"``.
        diagnostics: also measure, in the same pass, the gradients' Gram matrix and the drift
            ``d_0`` of each task's update (:class:`pub_optim.stats.BalanceDiagnostics` in
            :attr:`last_stats`); costs one more look-ahead row per step (always on in the
            marginal space, which computes the drift anyway, but for the gradients' matrix).
        shared_params: the parameters to balance. ``None``: every optimizer parameter that more
            than one task's loss reaches, discovered from the autograd graph on the first
            :meth:`backward` (pass them explicitly when the graph changes between steps, e.g.
            with routed experts).
        solve_every: re-solve the weights every N steps (the paper: 10). In between, see
            ``between_solves``.
        between_solves: ``"weighted_gradient"`` (default): between solves the step costs what a
            plain step costs: :meth:`backward` runs one backward pass of ``sum_k alpha_k L_k``
            with the last weights and the wrapped optimizer steps on it. This applies
            ``T(sum_k alpha_k g_k)`` where a solve step applies ``sum_k alpha_k T(g_k)``: exact for
            SGD, an approximation for adaptive optimizers (task-specific gradients are rescaled
            by ``1/alpha_k`` so they still take their own ordinary step). ``"reuse_weights"``:
            K backward passes and K look-aheads as usual, only the Gram matrix and the solve are
            skipped (``sum_k alpha_k T(g_k)`` with the last weights).
        check_finite: raise ``FloatingPointError`` on non-finite losses or gradients, leaving
            parameters and state untouched (costs one host sync per step on CUDA).
        chunk_size: columns per block of the elementwise work (default 65536 on CPU, whole
            tensors on CUDA).
        fused: compile the Adam/AdamW Gram pass (look-ahead reduced straight into the Gram
            matrix) and apply pass (look-ahead again, weighted sums, state and parameter update)
            into one loop each with ``torch.compile`` (:mod:`pub_optim.transforms.fused`).
            ``None`` (default): on for Adam/AdamW in the update space on CPU once ``K x P``
            reaches 2**20 values (the first step then compiles, taking seconds); ``False``:
            never; ``True``: whenever the optimizer is Adam/AdamW. If compiling fails the step
            falls back to the eager path with a warning.
        gradient_sync: called with a :class:`GradientView` at the end of every :meth:`backward`,
            before the step sees the gradients: the place to average them across processes
            (:class:`pub_optim.distributed.GradientAllReduce`). Also settable as an attribute.
        sync_free: no host-device synchronisation in :meth:`backward` and :meth:`step` (for CUDA
            tensors; see ``docs/method.md``). The weights are solved on the device
            (:meth:`UpdateBalancer.device_weights`), and a step whose losses, gradients or
            updates are not finite is *skipped on the device* instead of raising: parameters
            and optimizer state keep their values (the step counters still advance) and
            :attr:`last_step_skipped` says so. The task-specific parameters then step through
            the same exact transform (with one task it is the wrapped optimizer's own step).
            A ``torch.amp.GradScaler`` hands the step its scale and overflow flag as tensors
            (``_step_supports_amp_scaling``), so an AMP iteration reads nothing either.
            Needs an exact transform (SGD, Adam, AdamW, RMSprop, Adagrad), a strategy with a
            device solver (pareto, min-norm up to 12 tasks, equal-magnitude, equal, fixed), the
            eager elementwise path (``fused`` is off) and, with ``solve_every > 1``,
            ``between_solves="reuse_weights"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        strategy: StrategyLike = "pareto",
        *,
        space: Space = "update",
        state: StateMode = "shared",
        diagnostics: bool = False,
        shared_params: Iterable[Tensor] | None = None,
        solve_every: int = 1,
        between_solves: BetweenSolves = "weighted_gradient",
        check_finite: bool = True,
        chunk_size: int | None = None,
        gradient_sync: GradientSync | None = None,
        fused: bool | None = None,
        sync_free: bool = False,
    ) -> None:
        if isinstance(optimizer, list | tuple):
            optimizer = CombinedOptimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PUB wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, PUB):
            raise TypeError("the optimizer is already wrapped in PUB")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "PUB cannot wrap LBFGS: its step() re-evaluates the loss through a closure, and "
                "PUB steps on per-task gradients it already holds (no closure); use an "
                "elementwise optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, ...)"
            )
        if space not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")
        if state not in STATE_MODES:
            raise ValueError(f"state must be one of {list(STATE_MODES)}, got {state!r}")
        if state == "per_task":
            _check_per_task(space, sync_free, solve_every, between_solves)
        if not isinstance(solve_every, int) or solve_every < 1:
            raise ValueError(f"solve_every must be a positive integer, got {solve_every!r}")
        if between_solves not in ("weighted_gradient", "reuse_weights"):
            raise ValueError(
                "between_solves must be 'weighted_gradient' or 'reuse_weights', "
                f"got {between_solves!r}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if sync_free and fused:
            raise ValueError(
                "sync_free=True runs the eager elementwise path: the fused kernels take their "
                "constants from the host at every step; pass fused=None or fused=False"
            )
        if sync_free and solve_every > 1 and between_solves == "weighted_gradient":
            raise ValueError(
                "sync_free=True with solve_every > 1 needs between_solves='reuse_weights' (the "
                "weighted backward reads the weights on the host)"
            )
        self.optimizer = optimizer
        self.balancer: UpdateBalancer = get_strategy(strategy)
        self.space: Space = space
        self.state_mode: StateMode = state
        self.diagnostics = bool(diagnostics)
        self.solve_every = solve_every
        self.between_solves: BetweenSolves = between_solves
        self.check_finite = check_finite
        self.gradient_sync: GradientSync | None = gradient_sync
        self.defaults = optimizer.defaults
        init_facade(self)
        self._transform: UpdateTransform | None = _dense_transform(optimizer)
        if sync_free and self._transform is None:
            raise ValueError(
                f"sync_free=True needs an exact look-ahead transform (SGD, Adam, AdamW, RMSprop, "
                f"Adagrad); {type(optimizer).__name__} takes the generic snapshot path, which "
                "runs the optimizer's own step K + 1 times"
            )
        if sync_free and not self.balancer.supports_sync_free:
            raise ValueError(
                f"sync_free=True needs a strategy with a device solver; {self.balancer!r} has "
                "none (pareto, min-norm, equal-magnitude, equal and fixed weights have one)"
            )
        self._sync_free = sync_free
        self._engine: ExactStepEngine | None = None
        if self._transform is not None:
            for group in self._transform.optimizer.param_groups:
                self._transform.validate_group(group)
            self._engine = ExactStepEngine(
                self._transform,
                space,
                chunk_size,
                False if sync_free else fused,
                per_task=state == "per_task",
                diagnostics=self.diagnostics,
            )
            # Finding a table's touched rows reads their indices on the host.
            self._engine.untouched_rows = not sync_free
        # Per (inner) optimizer id: its look-ahead for row-sparse tables, made when one appears.
        self._sparse_transforms: dict[int, SparseRowTransform] = {}
        self._task_states: TaskStates | None = (
            TaskStates(optimizer) if state == "per_task" else None
        )
        self._chunk_size = chunk_size
        self._fused = fused
        self._explicit_shared: list[Tensor] | None = None
        if shared_params is not None:
            self._explicit_shared = list(dict.fromkeys(shared_params))
            known = {id(p) for p in self._all_params()}
            missing = [i for i, p in enumerate(self._explicit_shared) if id(p) not in known]
            if missing:
                shape = tuple(self._explicit_shared[missing[0]].shape)
                raise ValueError(
                    f"shared_params[{missing[0]}] (shape {shape}) is not a parameter of the "
                    "wrapped optimizer: add it to the optimizer's "
                    "param_groups first"
                )
            if not self._explicit_shared:
                raise ValueError("shared_params is empty: PUB needs at least one shared parameter")
        # Balancer state (persisted by state_dict).
        self._task_names: tuple[str, ...] | None = None
        self._weights: Tensor | None = None
        self._step_count = 0
        self.last_stats: BalanceStats | None = None
        # Step 1: the per-task gradients and the partition (not persisted: dropped by zero_grad
        # and step; the partition is kept).
        self._grads = TaskGradients(optimizer, self._explicit_shared, sync_free)
        self._losses_finite: Tensor | None = None  # sync_free: all losses since zero_grad
        self.last_step_skipped: Tensor | None = None
        """``sync_free=True``: whether the last step was skipped for non-finite values (a 0-d
        bool tensor on the parameters' device; reading it synchronises). ``None`` otherwise."""

    @property
    def sync_free(self) -> bool:
        """The ``sync_free`` setting (fixed at construction: it decides the solver and the path)."""
        return self._sync_free

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # With sync_free, torch.amp.GradScaler hands the step its scale and overflow flag as
        # tensors (``grad_scale``, ``found_inf``) instead of reading the flag on the host.
        return self._sync_free

    @property
    def fused(self) -> bool | None:
        """The ``fused`` setting (see the class docstring); assignable."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | None) -> None:
        if self.sync_free and value:
            raise ValueError("sync_free=True runs the eager elementwise path: fused cannot be on")
        self._fused = value
        if self._engine is not None:
            self._engine.fused = value

    @property
    def chunk_size(self) -> int | None:
        """Columns per block of the eager elementwise work; assignable."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError(f"chunk_size must be positive, got {value}")
        self._chunk_size = value
        if self._engine is not None:
            self._engine.chunk_size = value

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"PUB({type(self.optimizer).__name__}, strategy={self.balancer!r}, "
            f"space={self.space!r}, state={self.state_mode!r}, solve_every={self.solve_every})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (as ``torch.optim.Optimizer.add_param_group``);
        refused, with the group not added, if the look-ahead cannot reproduce its options."""
        self.optimizer.add_param_group(param_group)
        if self._transform is not None:
            try:
                self._transform.validate_group(self.optimizer.param_groups[-1])
            except Exception:
                self.optimizer.param_groups.pop()  # nothing changed
                raise
        self._grads.forget_partition()  # rediscover the partition on the next backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grads.reset()
        self._losses_finite = None

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` (``state``, ``param_groups``: torch's format, so
        ``torch.distributed.checkpoint`` and plain optimizers read it) with PUB's own part beside
        them under ``"pub"``: the step count, task names, last weights, the balancer's state and,
        with ``state="per_task"``, each task's optimizer state of the shared parameters (by
        parameter index, as ``state``). State-dict hooks registered on PUB are called as torch
        calls them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        out: dict[str, Any] = dict(self.optimizer.state_dict())
        pub: dict[str, Any] = {
            "step": self._step_count,
            "task_names": None if self._task_names is None else list(self._task_names),
            "weights": None if self._weights is None else self._weights.cpu().tolist(),
            "balancer": self.balancer.state_dict(),
            "state_mode": self.state_mode,
        }
        if self._task_states is not None:
            pub["task_states"] = self._task_states.state_dict()
        out["pub"] = pub
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one written by pub-optim 0.x, with the optimizer's part
        under ``"optimizer"``). Refused, with nothing changed, for a plain optimizer's state (load
        it with ``pub.optimizer.load_state_dict``) and for a checkpoint of another ``state``."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "pub" in state_dict and "optimizer" in state_dict:  # the 0.x layout
            inner = state_dict["optimizer"]
        elif "pub" in state_dict and "state" in state_dict and "param_groups" in state_dict:
            inner = {key: value for key, value in state_dict.items() if key != "pub"}
        else:
            raise ValueError(
                "not a PUB state_dict (expected 'state', 'param_groups' and 'pub'); to load a "
                "plain optimizer's state use pub.optimizer.load_state_dict(...)"
            )
        pub = state_dict["pub"]
        saved_mode = pub.get("state_mode", "shared")
        if saved_mode != self.state_mode:
            raise ValueError(
                f"this checkpoint was written by PUB(state={saved_mode!r}) and this optimizer "
                f"has state={self.state_mode!r}: its optimizer state does not carry over; build "
                f"PUB with state={saved_mode!r} to resume it. Nothing was changed."
            )
        task_states = pub.get("task_states")
        if self._task_states is not None:
            TaskStates.check_loadable(self.optimizer, task_states or [])
        previous = self.balancer.state_dict()
        self.balancer.load_state_dict(pub.get("balancer", {}))
        try:
            self.optimizer.load_state_dict(inner)
        except Exception:
            self.balancer.load_state_dict(previous)  # nothing changed
            raise
        if self._task_states is not None:
            self._task_states.load_state_dict(task_states or [])
        self._step_count = int(pub["step"])
        names = pub.get("task_names")
        self._task_names = None if names is None else tuple(names)
        weights = pub.get("weights")
        self._weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self._grads.reset()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------------------- backward
    def backward(self, losses: TaskLosses, *, retain_graph: bool = False) -> None:
        """Compute and keep the per-task gradients of the shared parameters.

        Args:
            losses: one scalar loss per task, as a sequence or a ``{name: loss}`` mapping (the
                same tasks, in the same order, at every step).
            retain_graph: keep the graph after the last task's backward pass.

        Task-specific parameters receive their gradient in ``.grad`` as usual; shared parameters
        receive the sum of the per-task gradients in ``.grad`` (so that clipping, GradScaler and
        logging work on them as on any optimizer; see :meth:`step` for how changes to it are
        carried over). Calling it several times before :meth:`step` accumulates.
        """
        names, tensors = self._check_losses(losses)
        grads = self._grads
        grads.task_names = names
        if grads.shared is None:
            grads.discover(tensors)
        assert grads.shared is not None
        weighted = grads.pending != "full" and self._use_weighted_backward()
        with torch.enable_grad():
            if weighted:
                assert self._weights is not None
                grads.backward_weighted(tensors, self._weights.tolist())
            else:
                grads.backward_per_task(tensors, retain_graph, self._keeps_rows(len(tensors)))
        full = grads.pending == "full"
        if self.gradient_sync is not None and grads.sparse:
            raise ValueError(
                "sparse-gradient tables (nn.Embedding/EmbeddingBag(sparse=True)) are not "
                "supported with a gradient_sync hook (DDP) yet: under DDP use dense-gradient "
                "tables (sparse=False), or train on one process. The parameters and optimizer "
                "state are unchanged; call zero_grad() before the next backward"
            )
        if self.gradient_sync is not None:
            shared_ids = {id(p) for p in grads.shared}
            others = [p for p in self._all_params() if id(p) not in shared_ids]
            self.gradient_sync(
                GradientView(
                    list(grads.shared), grads.buffers if full else None, grads.reached, others
                )
            )
        if full:  # once, after the hook: what step() compares against
            grads.record_marks()

    def _check_losses(self, losses: TaskLosses) -> tuple[tuple[str, ...], list[Tensor]]:
        named = split_task_losses(losses)
        if named is None:
            raise TypeError(
                "losses must be a sequence of scalar tensors or a {name: loss} mapping, "
                f"got {type(losses).__name__}"
            )
        names, tensors = named
        if not tensors:
            raise ValueError("backward() got no losses: pass one scalar loss per task")
        for name, loss in zip(names, tensors, strict=True):
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f"the loss of task {name!r} is a {type(loss).__name__}, not a Tensor"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"the loss of task {name!r} has shape {tuple(loss.shape)}; each task loss must "
                    "be a scalar (reduce it with .mean() or .sum())"
                )
            if not loss.requires_grad or loss.grad_fn is None:
                raise ValueError(
                    f"the loss of task {name!r} does not depend on any parameter that requires "
                    "grad (was it computed under torch.no_grad() or from detached tensors?)"
                )
        if self._task_names is not None and names != self._task_names:
            raise ValueError(
                f"backward() got tasks {list(names)} but this optimizer balances "
                f"{list(self._task_names)}: pass the same tasks, in the same order, at every step"
            )
        if self.check_finite:
            values = torch.stack([loss.detach().reshape(()).float() for loss in tensors])
            finite = torch.isfinite(values)
            if self.sync_free:  # checked on the device: the step is skipped
                seen = self._losses_finite
                self._losses_finite = finite.all() if seen is None else seen & finite.all()
            elif not bool(finite.all()):
                bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
                raise FloatingPointError(
                    f"non-finite loss for task(s) {bad}: nothing was changed; check the inputs and "
                    "the learning rate, or skip this batch"
                )
        self._task_names = names
        return names, tensors

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _keeps_rows(self, num_tasks: int) -> bool:
        """Whether this backward keeps each task's gradients as autograd returned them, instead of
        copying them into ``[K, *shape]`` buffers: when the step reads them with the compiled
        kernels, and no ``gradient_sync`` hook needs the buffers."""
        if self.sync_free or self.gradient_sync is not None or self._engine is None:
            return False
        assert self._grads.shared is not None
        return self._engine.fused_enabled(self._grads.shared, num_tasks)

    def _use_weighted_backward(self) -> bool:
        if self.solve_every == 1 or self.between_solves != "weighted_gradient":
            return False
        if self._weights is None or self._step_count % self.solve_every == 0:
            return False
        if not bool((self._weights > 0).all()):
            return False  # a zero weight would lose that task's own parameters' gradient
        return self._grads.only_own_nonshared()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Apply one balanced step (after :meth:`backward`).

        Changes made to the shared parameters' ``.grad`` between :meth:`backward` and
        :meth:`step` (gradient clipping, ``GradScaler.unscale_``, a user hook) are carried over to
        the per-task gradients as an elementwise rescaling ``g_k <- g_k * grad / sum_j g_j``
        (exact for any uniform rescaling such as norm clipping or unscaling). A shared parameter
        whose ``.grad`` is ``None`` at step time is skipped, as torch optimizers do.
        """
        if closure is not None:
            raise ValueError(
                "PUB.step() takes no closure: compute the task losses, call backward(losses), "
                "then step()"
            )
        grads = self._grads
        if grads.pending is None:
            raise RuntimeError(
                "PUB.step() called without per-task gradients: call backward(losses) after "
                "zero_grad() and before step()"
            )
        assert grads.shared is not None and self._task_names is not None
        if grads.pending == "weighted":
            self._check_finite_grads(self._all_params())
            self.optimizer.step()
            self._finish_step(solved=False)
            return
        overflow = self._unscale_for_grad_scaler() if self.sync_free else None
        active = grads.active()
        grads_finite = grads.carry_over(active)
        if overflow is not None and grads_finite is not None:
            grads_finite = grads_finite & ~overflow.to(grads_finite.device)
        solve = self._weights is None or self._step_count % self.solve_every == 0
        num_tasks = len(self._task_names)
        params = [grads.shared[i] for i in active]
        task_grads = grads.for_step(active)
        nonshared = grads.nonshared_with_grad()
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        # Row-sparse tables (sparse COO gradients): their own look-ahead on the touched rows,
        # added into the same Gram matrix (checked before anything changes).
        sparse = self._sparse_parts(grads.sparse_active(), group_of)
        if sparse and self._transform is None and not params and self.space != "gradient":
            self._sparse_only_step(sparse, nonshared, solve)
            return
        if self._transform is None or (self.space == "gradient" and not self.sync_free):
            self._combined_step(params, task_grads.all_stacked(), nonshared, solve, sparse)
            return
        self._check_contiguous(params + nonshared if self.sync_free else params)
        self._check_dense_owner(params)
        contexts = self._contexts(params, group_of, num_tasks)
        engine = self._engine
        assert engine is not None
        if self.sync_free:
            assert grads_finite is not None
            self._sync_free_step(
                contexts, task_grads.all_stacked(), nonshared, group_of, solve, grads_finite
            )
            return
        items = engine.fused_items(contexts, task_grads)
        if items is None and grads.rows is not None:  # eager after all: it reads buffers
            grads.stack_rows()
            task_grads = grads.for_step(active)
        grams: StepGrams | None = None
        if solve:
            grams = engine.gram(contexts, task_grads, num_tasks, items)
            _add_sparse_grams(grams, sparse)
            self._raise_if_nonfinite(grams.balanced)
            weights = self.balancer(grams.balanced)
        else:
            assert self._weights is not None
            weights = self._weights
        self._check_finite_grads(nonshared)
        engine.apply(contexts, task_grads, weights, items, self._drift_weight(weights))
        self._apply_sparse(sparse, weights)
        self._step_nonshared(nonshared)
        self._weights = weights
        self._finish_step(solved=solve, grams=grams)

    def _sparse_parts(
        self, sparse: list[tuple[int, TaskRows]], group_of: dict[int, dict[str, Any]]
    ) -> list[_SparsePart]:
        """Contexts and per-task look-ahead updates of this step's row-sparse tables (the
        transform of the wrapped optimizer for sparse gradients); every refusal happens here,
        before anything changes."""
        if not sparse:
            return []
        if self._task_states is not None or self.sync_free:  # (a gradient_sync hook: backward)
            what = "state='per_task'" if self._task_states is not None else "sync_free=True"
            raise ValueError(
                f"sparse-gradient parameters (nn.Embedding/EmbeddingBag(sparse=True)) are not "
                f"supported with {what} yet: use state='shared', sync_free=False and one "
                "process, or dense-gradient tables (sparse=False). Nothing was changed."
            )
        assert self._grads.shared is not None
        params = [self._grads.shared[i] for i, _ in sparse]
        transforms = [self._sparse_transform_of(p) for p in params]  # TypeError if none
        for p, transform in zip(params, transforms, strict=True):
            transform.validate_group(group_of[id(p)])
        looks = self.space != "gradient"
        parts: list[_SparsePart] = []
        for p, transform, (_, rows) in zip(params, transforms, sparse, strict=True):
            ctx = transform.begin(p, group_of[id(p)])
            updates = transform.lookahead(ctx, rows) if looks else None
            parts.append(_SparsePart(transform, ctx, rows, updates))
        return parts

    def _owner(self, param: Tensor) -> torch.optim.Optimizer:
        """The (inner) optimizer that steps ``param``."""
        if isinstance(self.optimizer, CombinedOptimizer):
            return self.optimizer.owner(param)
        return self.optimizer

    def _sparse_transform_of(self, param: Tensor) -> SparseRowTransform:
        owner = self._owner(param)
        transform = self._sparse_transforms.get(id(owner))
        if transform is None:
            transform = sparse_transform_for(owner)
            self._sparse_transforms[id(owner)] = transform
        return transform

    def _check_dense_owner(self, params: list[Tensor]) -> None:
        """With several optimizers, the dense shared parameters are looked ahead by the one
        optimizer with an exact transform: refuse others before anything changes."""
        if not isinstance(self.optimizer, CombinedOptimizer) or self._transform is None:
            return
        for p in params:
            owner = self.optimizer.owner(p)
            if owner is not self._transform.optimizer:
                raise TypeError(
                    f"a shared parameter of shape {tuple(p.shape)} with a dense gradient belongs "
                    f"to {type(owner).__name__}, and the dense parameters are balanced through "
                    f"{type(self._transform.optimizer).__name__}: give every dense parameter to "
                    "that optimizer (the others take sparse-gradient tables). Nothing was changed."
                )

    def _apply_sparse(self, parts: list[_SparsePart], weights: Tensor) -> None:
        """The row-sparse tables' balanced update ``sum_k alpha_k d_k`` on their touched rows,
        their state advanced with ``sum_k alpha_k g_k``."""
        for part in parts:
            assert part.updates is not None
            grad = part.rows.combine(weights)
            update = TaskRows(part.rows.shape, part.rows.rows, part.updates, part.rows.touched)
            part.transform.commit(part.ctx, part.rows, grad, update.combine(weights))
            part.transform.finish(part.ctx)

    def _sparse_only_step(
        self, parts: list[_SparsePart], nonshared: list[Tensor], solve: bool
    ) -> None:
        """A step whose balanced parameters are all row-sparse tables (``SparseAdam``)."""
        k = len(self._task_names or ())
        if solve:
            device = parts[0].rows.values.device

            def zeros() -> Tensor:
                return torch.zeros((k, k), dtype=torch.float64, device=device)

            marginal = self.space == "marginal" or self.diagnostics
            grams = StepGrams(
                self.space,
                lookahead=zeros() if self.space == "update" or self.diagnostics else None,
                marginal=zeros() if marginal else None,
                gradient=zeros() if self.diagnostics else None,
            )
            _add_sparse_grams(grams, parts)
            self._raise_if_nonfinite(grams.balanced)
            weights = self.balancer(grams.balanced)
        else:
            assert self._weights is not None
            weights, grams = self._weights, None
        self._check_finite_grads(nonshared)
        self._apply_sparse(parts, weights)
        self._step_nonshared(nonshared)
        self._weights = weights
        self._finish_step(solved=solve, grams=grams)

    def _contexts(
        self, params: list[Tensor], group_of: dict[int, dict[str, Any]], num_tasks: int
    ) -> list[list[ParamContext]]:
        """Per shared parameter, the transform's context on the shared state, or one per task on
        the task's own state (``state="per_task"``)."""
        assert self._transform is not None
        if self._task_states is None:
            return [[self._transform.begin(p, group_of[id(p)])] for p in params]
        stores = self._task_states.ensure(num_tasks, params)
        return [
            [self._transform.begin(p, group_of[id(p)], store) for store in stores] for p in params
        ]

    def _drift_weight(self, weights: Tensor) -> float | Tensor:
        """The extra weight of the drift ``d_0`` in the applied update (the marginal space with
        weights that do not sum to one)."""
        if self.space != "marginal":
            return 0.0
        return drift_weight(weights, self.balancer.normalization == "sum")

    def _unscale_for_grad_scaler(self) -> Tensor | None:
        """Under ``torch.amp.GradScaler.step`` with ``sync_free``: divide every ``.grad`` by the
        scale it hands over (unless ``scaler.unscale_`` did already) and return its overflow
        flag; ``None`` outside it. The per-task gradients follow through the norm ratio (the
        unscaling kernel, like the scaler's own, keeps the version counters)."""
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is None:
            return None
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in self._all_params():
                if p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            for (device, _), grads in groups.items():
                inverse = grad_scale.to(device=device, dtype=torch.float64).reciprocal().float()
                ignored = torch.zeros(1, dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, ignored, inverse)
        return found_inf.reshape(()) > 0

    def _sync_free_step(
        self,
        contexts: list[list[ParamContext]],
        task_grads: list[Tensor],
        nonshared: list[Tensor],
        group_of: dict[int, dict[str, Any]],
        solve: bool,
        grads_finite: Tensor,
    ) -> None:
        """The exact step with every decision on the device (``sync_free=True``)."""
        engine = self._engine
        assert engine is not None and self._task_names is not None
        num_tasks = len(self._task_names)
        device = task_grads[0].device if task_grads else self._shared_device()
        ok = grads_finite.to(device)
        if self._losses_finite is not None:
            ok = ok & self._losses_finite.to(device)
        if self.check_finite and nonshared:
            norms = max_abs([p.grad for p in nonshared])  # type: ignore[misc]
            ok = ok & torch.isfinite(torch.stack(norms)).all()
        previous = self._weights
        if previous is None:
            previous = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=device)
        elif previous.device != device:  # loaded by load_state_dict: copied once
            previous = previous.to(device)
        grams: StepGrams | None = None
        weights = previous
        if solve:
            grams = engine.gram(contexts, TaskGrads(task_grads), num_tasks)
            solved, valid = self.balancer.device_weights(grams.balanced)
            ok = ok & valid
            weights = torch.where(ok, solved, previous)
        engine.apply_eager(contexts, task_grads, weights, ok, self._drift_weight(weights))
        if nonshared:
            assert self._transform is not None
            own = [[self._transform.begin(p, group_of[id(p)])] for p in nonshared]
            grads = [p.grad.unsqueeze(0) for p in nonshared]  # type: ignore[union-attr]
            one = torch.ones(1, dtype=torch.float64, device=device)
            engine.apply_eager(own, grads, one, keep=ok)  # one task: either space is the plain step
        self._weights = weights
        self.last_step_skipped = ~ok
        self._losses_finite = None
        self._finish_step(solved=solve, grams=grams)

    def _shared_device(self) -> torch.device:
        assert self._grads.shared is not None
        return self._grads.shared[0].device

    def _combined_step(
        self,
        params: list[Tensor],
        task_grads: list[Tensor],
        nonshared: list[Tensor],
        solve: bool,
        sparse: list[_SparsePart] | None = None,
    ) -> None:
        """The step that goes through the wrapped optimizer's own ``step()``: the generic path
        (update and marginal spaces: the snapshot look-ahead, then the shared parameters set to
        the weighted update; the state advanced by one real step on ``g*``, or, per task, each
        task's state taken from its own look-ahead step), and ``space="gradient"`` on every path
        but ``sync_free`` (the balanced gradient is an ordinary gradient: exactly the optimizer's
        step on it, any optimizer, task-specific parameters included)."""
        k = len(self._task_names or ())
        if sparse and self.space != "gradient":
            raise TypeError(
                f"{type(self.optimizer).__name__} has no exact look-ahead for its dense "
                "parameters beside sparse-gradient tables: wrap SGD or Adagrad (tables and dense "
                "layers in one optimizer), or SparseAdam over the tables only. Nothing was changed."
            )
        look = GenericLookahead(self.optimizer, params) if self.space != "gradient" else None
        stores = None
        if look is not None and self._task_states is not None:
            stores = self._task_states.ensure(k, params)
        updates: list[Tensor] | None = None
        drifts: list[Tensor] | None = None
        new_states = None
        if look is not None:
            updates, new_states = look.updates(task_grads, stores)
            if self.space == "marginal" or self.diagnostics:
                zeros = [
                    torch.zeros_like(g[:1]).expand_as(g if stores else g[:1]) for g in task_grads
                ]
                drifts, _ = look.updates(zeros, stores)
        grams: StepGrams | None = None
        if solve:
            grams = _generic_grams(self.space, task_grads, updates, drifts, self.diagnostics, k)
            _add_sparse_grams(grams, sparse or [])
            self._raise_if_nonfinite(grams.balanced)
            weights = self.balancer(grams.balanced)
        else:
            assert self._weights is not None
            weights = self._weights
        self._check_finite_grads(nonshared)
        extra = self._drift_weight(weights)
        if look is None:
            # Combined in place (the per-task values are not read again): no copy. A sparse
            # table's balanced gradient is a sparse gradient: the optimizer's own sparse step.
            combined = [_combine_into_first_row(g, weights) for g in task_grads]
            tables = [part.ctx.param for part in sparse or []]
            combined += [part.rows.to_sparse(part.rows.combine(weights)) for part in sparse or []]
            self._step_with(params + tables, combined)
        else:
            assert updates is not None
            applied = [_combine_into_first_row(u, weights) for u in updates]
            if drifts is not None and not (isinstance(extra, float) and extra == 0.0):
                share = weights / weights.sum()  # per task: the weighted mean of their drifts
                for u, d0 in zip(applied, drifts, strict=True):
                    mix = d0[0] if d0.shape[0] == 1 else torch.tensordot(share.to(d0), d0, 1)
                    u.add_(mix * extra)
            if new_states is None:
                combined = [_combine_into_first_row(g, weights) for g in task_grads]
                look.commit(combined, applied)  # also steps the task-specific parameters
            else:
                assert self._task_states is not None
                look.set_parameters(applied)
                for store, states in zip(self._task_states.stores, new_states, strict=True):
                    store.update(states)
                self._step_nonshared(nonshared)
        self._weights = weights
        self._finish_step(solved=solve, grams=grams)

    def _step_with(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """The wrapped optimizer's own step with ``grads`` as the gradients of ``params`` (the
        other shared parameters hidden: skipped), the task-specific ones on their ``.grad``."""
        shared = self._grads.shared
        assert shared is not None
        saved = [p.grad for p in shared]
        given = {id(p): g for p, g in zip(params, grads, strict=True)}
        try:
            for p in shared:
                p.grad = given.get(id(p))
            self.optimizer.step()
        finally:
            for p, g in zip(shared, saved, strict=True):
                p.grad = g

    def _step_nonshared(self, nonshared: list[Tensor]) -> None:
        """The wrapped optimizer's ordinary step on the parameters that are not balanced."""
        if nonshared:
            self._step_with([], [])

    def _check_contiguous(self, params: list[Tensor]) -> None:
        """The exact look-ahead works on flat views of each parameter and its state: refuse a
        non-contiguous layout (``channels_last``) before anything is touched."""
        for p in params:
            if not p.is_contiguous():
                raise ValueError(
                    f"PUB's exact {type(self.optimizer).__name__} look-ahead needs contiguous "
                    f"parameters, and one of shape {tuple(p.shape)} has strides {p.stride()} "
                    "(channels_last?): convert the model with "
                    "model.to(memory_format=torch.contiguous_format) before building the "
                    "optimizer. Nothing was changed."
                )

    def _raise_if_nonfinite(self, gram: Tensor) -> None:
        if not bool(torch.isfinite(gram).all()):
            raise FloatingPointError(NONFINITE_SHARED)

    def _check_finite_grads(self, params: list[Tensor]) -> None:
        if not self.check_finite or not params:
            return
        norms = max_abs([dense_view(p.grad) for p in params if p.grad is not None])
        if norms and not bool(torch.isfinite(torch.stack(norms)).all()):
            raise FloatingPointError(
                "non-finite gradients on the task-specific parameters: the step was skipped and "
                "nothing was changed"
            )

    def _finish_step(self, solved: bool, grams: StepGrams | None = None) -> None:
        self._step_count += 1
        self._grads.reset()
        assert self._task_names is not None
        if grams is not None and self._weights is not None:
            self.last_stats = BalanceStats.from_grams(
                grams,
                self._weights,
                solved,
                self._step_count,
                self._task_names,
                diagnostics=self.diagnostics or self.space == "marginal",
            )
        elif self.last_stats is not None:
            self.last_stats = dataclasses.replace(
                self.last_stats, solved=False, step=self._step_count
            )

    @property
    def weights(self) -> Tensor | None:
        """The last task weights (float64, ``[K]``), or ``None`` before the first step."""
        return self._weights

    @property
    def shared_params(self) -> list[Tensor]:
        """The balanced parameters (after the first :meth:`backward`)."""
        if self._grads.shared is None:
            raise RuntimeError("the shared parameters are known after the first backward()")
        return list(self._grads.shared)


@dataclasses.dataclass
class _SparsePart:
    """One row-sparse table in a step: its context, its tasks' rows, their look-ahead updates
    ``[K, n, *row]`` (``None`` in the gradient space)."""

    transform: SparseRowTransform
    ctx: SparseContext
    rows: TaskRows
    updates: Tensor | None


def _add_sparse_grams(grams: StepGrams, parts: Sequence[_SparsePart]) -> None:
    """Add the row-sparse tables' terms to the Gram matrices: over their touched rows (the
    updates are zero elsewhere). A sparse optimizer's update for an empty gradient is zero, so
    the tables add no drift: their marginal parts are their updates."""
    for part in parts:
        if part.updates is not None:
            g = sparse_gram(part.updates).to(grams.balanced.device)
            if grams.lookahead is not None:
                grams.lookahead.add_(g)
            if grams.marginal is not None:
                grams.marginal.add_(g)
        if grams.gradient is not None:
            grams.gradient.add_(sparse_gram(part.rows.values).to(grams.gradient.device))


def _dense_transform(optimizer: torch.optim.Optimizer) -> UpdateTransform | None:
    """The exact look-ahead of the optimizer's dense parameters (``None``: the generic path).
    For several optimizers: the one with an exact transform (the others, such as ``SparseAdam``,
    take only sparse-gradient tables); more than one is refused."""
    if not isinstance(optimizer, CombinedOptimizer):
        return exact_transform_for(optimizer)
    found = [(o, t) for o in optimizer.optimizers if (t := exact_transform_for(o)) is not None]
    found = [(o, t) for o, t in found if not isinstance(o, torch.optim.SparseAdam)]
    if len(found) > 1:
        names = ", ".join(type(o).__name__ for o, _ in found)
        raise ValueError(
            f"PUB over several optimizers balances the dense parameters through one of them, and "
            f"{names} all take dense gradients: give the dense layers one optimizer (the others "
            "hold the sparse-gradient tables, e.g. SparseAdam)"
        )
    return found[0][1] if found else None


def _check_per_task(
    space: Space,
    sync_free: bool,
    solve_every: int,
    between_solves: BetweenSolves,
) -> None:
    """Refuse, before anything is built, what ``state="per_task"`` does not support."""
    if space == "gradient":
        raise ValueError(
            "state='per_task' needs space='update' or 'marginal': space='gradient' takes one "
            "ordinary optimizer step on the balanced gradient, with one state"
        )
    if sync_free:
        raise ValueError(
            "state='per_task' is not supported with sync_free=True; use state='shared'"
        )
    if solve_every > 1 and between_solves == "weighted_gradient":
        raise ValueError(
            "state='per_task' with solve_every > 1 needs between_solves='reuse_weights': the "
            "weighted backward steps one state on sum_k alpha_k g_k"
        )


def _generic_grams(
    space: Space,
    task_grads: list[Tensor],
    updates: list[Tensor] | None,
    drifts: list[Tensor] | None,
    diagnostics: bool,
    k: int,
) -> StepGrams:
    """The Gram matrices of the combined step's vectors (float32 products, float64 sums)."""
    device = task_grads[0].device if task_grads else torch.device("cpu")

    def gram_of(vectors: Sequence[Tensor]) -> Tensor:
        gram = torch.zeros((k, k), dtype=torch.float64, device=device)
        for v in vectors:
            flat = v.reshape(k, -1)
            gram.add_(torch.mm(flat, flat.T))
        return gram

    out = StepGrams(space=space)
    if space == "gradient" or diagnostics:
        out.gradient = gram_of(task_grads)
    if updates is None:
        return out
    if space == "update" or diagnostics:
        out.lookahead = gram_of(updates)
    if drifts is not None:
        out.marginal = gram_of([u - d0 for u, d0 in zip(updates, drifts, strict=True)])
        dots = torch.zeros(k, dtype=torch.float64, device=device)
        sq = torch.zeros(k, dtype=torch.float64, device=device)
        for u, d0 in zip(updates, drifts, strict=True):
            flat_d0 = d0.reshape(d0.shape[0], -1)
            dots.add_((u.reshape(k, -1) * flat_d0).sum(1, dtype=torch.float64))
            sq.add_((flat_d0 * flat_d0).sum(1, dtype=torch.float64).expand(k))
        out.drift_dots, out.drift_sq = dots, sq
    return out


def split_task_losses(losses: object) -> tuple[tuple[str, ...], list[Any]] | None:
    """Task names and losses from a ``{name: loss}`` mapping or a sequence (named ``task0``,
    ``task1``, ...); ``None`` for anything else (the caller says what it expected)."""
    if isinstance(losses, Mapping):
        return tuple(str(n) for n in losses), list(losses.values())
    if isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        values = list(losses)
        return tuple(f"task{k}" for k in range(len(values))), values
    return None


def _combine_into_first_row(per_task: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[k] * per_task[k]``, written over ``per_task[0]`` (returned)."""
    w = weights.to(per_task)
    first = per_task[0].mul_(w[0])
    for k in range(1, per_task.shape[0]):
        first.addcmul_(per_task[k], w[k])
    return first
