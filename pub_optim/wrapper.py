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

A step goes one way: :meth:`PUB.backward` collects the per-task gradients; :meth:`PUB.step`
carries over ``.grad`` edits, then hands them to the path chosen at construction: the exact
engine (:mod:`pub_optim.exact_step`: look-ahead, Gram matrices, weights, apply; on the device
with ``sync_free``) or the combined step (the generic snapshot look-ahead, and the gradient
space).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .exact_step import ExactStepEngine, TaskGrads
from .partition import task_owners
from .spaces import SPACES, Space, StepGrams, drift_weight
from .stats import BalanceStats
from .strategies import StrategyLike, UpdateBalancer, get_strategy
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
#: A changed ``.grad`` to carry over: (its per-task gradients, their sum, the ``.grad`` now).
_Changed = tuple[Tensor | list[Tensor | None], Tensor, Tensor]


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
            generic snapshot-and-restore path (K extra ``step()`` calls per step).
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
            ``g_k``; task-specific parameters keep the ordinary state. Not with
            ``space="gradient"`` (one ordinary step on ``g*``: one state), ``sync_free``, the
            compiled kernels (``fused=True``; ``fused=None`` runs eager), or ``solve_every > 1``
            with ``between_solves="weighted_gradient"``.
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
        optimizer: torch.optim.Optimizer,
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
            _check_per_task(space, sync_free, fused, solve_every, between_solves)
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
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._patch_step_function()
        self._transform: UpdateTransform | None = exact_transform_for(optimizer)
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
            for group in optimizer.param_groups:
                self._transform.validate_group(group)
            self._engine = ExactStepEngine(
                self._transform,
                space,
                chunk_size,
                False if sync_free else fused,
                per_task=state == "per_task",
                diagnostics=self.diagnostics,
            )
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
        # Per-step state (not persisted: dropped by zero_grad and step).
        self._shared: list[Tensor] | None = None
        self._owners: dict[int, list[int]] = {}
        # Optimizer parameters that no task reached at discovery (a layer used after a warm-up,
        # a frozen one): offered to every task's backward pass, they join the side their reach
        # puts them on at the next step (``_join_newly_reached``).
        self._unreached: list[Tensor] = []
        self._newly_reached: dict[int, set[int]] = {}
        self._by_task: list[list[Tensor]] | None = None
        self._task_grads: list[Tensor] = []
        # Instead of the buffers when the step runs the compiled kernels: per shared parameter,
        # each task's gradient as autograd returned it (None: the task did not reach it).
        self._task_rows: list[list[Tensor | None]] | None = None
        self._reached: list[bool] = []
        # Per shared parameter: (id, version counter, largest absolute value) of its .grad after
        # backward; the value is a float, or a 0-d device tensor with sync_free.
        self._grad_marks: list[tuple[int, int, float | Tensor] | None] = []
        self._pending: Literal["full", "weighted"] | None = None
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
        self._shared = None  # rediscover the partition on the next backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending = None
        self._task_rows = None
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
        self._pending = None
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
        _, tensors = self._check_losses(losses)
        if self._shared is None:
            self._discover(tensors)
        assert self._shared is not None
        weighted = self._pending != "full" and self._use_weighted_backward()
        with torch.enable_grad():
            if weighted:
                self._backward_weighted(tensors)
            else:
                self._backward_per_task(tensors, retain_graph)
        if self.gradient_sync is not None:
            shared_ids = {id(p) for p in self._shared}
            others = [p for p in self._all_params() if id(p) not in shared_ids]
            full = self._pending == "full"
            self.gradient_sync(
                GradientView(
                    list(self._shared), self._task_grads if full else None, self._reached, others
                )
            )
        if self._pending == "full":  # once, after the hook: what step() compares against
            self._record_grad_marks()

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

    def _discover(self, losses: list[Tensor]) -> None:
        params = self._all_params()
        owners = task_owners(losses, params)
        assert self._task_names is not None
        for k, name in enumerate(self._task_names):
            if not any(k in ts for ts in owners.values()):
                raise ValueError(
                    f"the loss of task {name!r} reaches no parameter of the wrapped optimizer: "
                    "add the parameters it depends on to the optimizer"
                )
        if self._explicit_shared is not None:
            shared = self._explicit_shared
        else:
            shared = [p for p in params if len(owners[id(p)]) > 1]
            if not shared:
                raise ValueError(
                    "no parameter is reached by more than one task, so there is nothing to "
                    "balance: pass shared_params explicitly, or use the plain optimizer"
                )
        self._shared = shared
        self._owners = owners
        shared_ids = {id(p) for p in shared}
        self._unreached = [p for p in params if not owners[id(p)] and id(p) not in shared_ids]
        self._newly_reached = {}
        self._by_task = None
        self._task_grads = []
        self._task_rows = None

    def _join_newly_reached(self) -> None:
        """Parameters first reached in the last steps join the partition: shared when several
        tasks reach them (unless ``shared_params`` was given), else the reaching task's own."""
        if not self._newly_reached or self._shared is None:
            return
        for p in list(self._unreached):
            tasks = self._newly_reached.get(id(p))
            if not tasks:
                continue
            self._unreached.remove(p)
            self._owners[id(p)] = sorted(tasks)
            if self._explicit_shared is None and len(tasks) > 1:
                self._shared = [*self._shared, p]
        self._newly_reached = {}
        self._by_task = None

    def _nonshared_by_task(self) -> list[list[Tensor]]:
        """Per task, the non-shared parameters its loss reaches (computed with the partition)."""
        if self._by_task is None:
            assert self._shared is not None and self._task_names is not None
            shared_ids = {id(p) for p in self._shared}
            by_task: list[list[Tensor]] = [[] for _ in self._task_names]
            for p in self._all_params():
                if id(p) not in shared_ids:
                    for k in self._owners.get(id(p), []):
                        by_task[k].append(p)
            self._by_task = by_task
        return self._by_task

    def _use_weighted_backward(self) -> bool:
        if self.solve_every == 1 or self.between_solves != "weighted_gradient":
            return False
        if self._weights is None or self._step_count % self.solve_every == 0:
            return False
        if not bool((self._weights > 0).all()):
            return False  # a zero weight would lose that task's own parameters' gradient
        shared_ids = {id(p) for p in self._shared or []}
        return all(len(ts) <= 1 for pid, ts in self._owners.items() if pid not in shared_ids)

    def _backward_weighted(self, losses: list[Tensor]) -> None:
        assert self._weights is not None and self._shared is not None
        weights = self._weights.tolist()
        total = sum(w * loss.reshape(()) for w, loss in zip(weights, losses, strict=True))
        assert isinstance(total, Tensor)
        by_task = self._nonshared_by_task()
        live = [p for p in self._shared if p.requires_grad]  # frozen ones are skipped
        inputs = live + [p for ps in by_task for p in ps if p.requires_grad]
        scales = [1.0] * len(live) + [
            1.0 / weights[k] for k, ps in enumerate(by_task) for p in ps if p.requires_grad
        ]
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        for p, g, scale in zip(inputs, grads, scales, strict=True):
            if g is not None:
                _accumulate(p, g if scale == 1.0 else g * scale)
        self._pending = "weighted"

    def _backward_per_task(self, losses: list[Tensor], retain_graph: bool) -> None:
        assert self._shared is not None
        first = self._pending is None
        if first:
            self._join_newly_reached()
        shared = self._shared
        num_tasks = len(losses)
        if first:
            self._reached = [False] * len(shared)
            if self._keeps_rows(num_tasks):
                self._task_rows = [[None] * num_tasks for _ in shared]
            else:
                self._task_rows = None
                self._allocate_buffers(num_tasks)
        elif self._task_rows is not None:
            self._stack_rows()  # accumulating into them: one buffer per parameter from now on
        by_task = self._nonshared_by_task()
        # Frozen parameters (requires_grad=False) are skipped, as torch optimizers skip them.
        live = [i for i, p in enumerate(shared) if p.requires_grad]
        unreached = [p for p in self._unreached if p.requires_grad]
        missing: list[int] = []
        for k, loss in enumerate(losses):
            own = [p for p in by_task[k] if p.requires_grad]
            inputs = [shared[i] for i in live] + own + unreached
            keep = retain_graph or k < num_tasks - 1
            # The gradient tuple lives only for the call (what is kept of it: the shared
            # parameters' gradients, copied into the buffers or kept as they are): it is freed
            # before the next task's backward pass.
            grads = torch.autograd.grad(
                loss.reshape(()), inputs, retain_graph=keep, allow_unused=True
            )
            if all(g is None for g in grads):
                missing.append(k)
            shared_grads: list[Tensor | None] = [None] * len(shared)
            for j, i in enumerate(live):
                shared_grads[i] = grads[j]
            rest = grads[len(live) :]
            self._store_task_grads(k, own, shared_grads + list(rest[: len(own)]), first)
            for p, g in zip(unreached, rest[len(own) :], strict=True):
                if g is not None:  # trains now (its gradient in .grad); joins at the next step
                    _accumulate(p, g)
                    self._newly_reached.setdefault(id(p), set()).add(k)
            del grads, rest, shared_grads
        if missing:
            assert self._task_names is not None
            names = [self._task_names[k] for k in missing]
            raise ValueError(
                f"the loss of task(s) {names} reaches no trainable parameter of the wrapped "
                "optimizer in this step (frozen, or not part of its graph any more): keep each "
                "task connected (a task with nothing to learn returns 0 * output.sum()). The "
                "parameters and optimizer state are unchanged; call zero_grad() before the next "
                "backward"
            )
        if first:
            # .grad of a shared parameter: this backward's sum over tasks, one pass over K x P.
            for i, (p, reached) in enumerate(zip(shared, self._reached, strict=True)):
                if not reached:
                    continue
                total = (
                    task_sum(self._task_grads[i])
                    if self._task_rows is None
                    else _sum_rows(self._task_rows[i])
                )
                if p.grad is None:
                    p.grad = total
                else:
                    p.grad.add_(total)
        self._pending = "full"

    def _keeps_rows(self, num_tasks: int) -> bool:
        """Whether this backward keeps each task's gradients as autograd returned them, instead of
        copying them into ``[K, *shape]`` buffers: when the step reads them with the compiled
        kernels, and no ``gradient_sync`` hook needs the buffers."""
        if self.sync_free or self.gradient_sync is not None or self._engine is None:
            return False
        assert self._shared is not None
        return self._engine.fused_enabled(self._shared, num_tasks)

    def _allocate_buffers(self, num_tasks: int) -> None:
        """The ``[K, *p.shape]`` per-task buffers (kept from step to step while K is the same)."""
        assert self._shared is not None
        if len(self._task_grads) != len(self._shared) or (
            self._task_grads and self._task_grads[0].shape[0] != num_tasks
        ):
            self._task_grads = [
                torch.empty((num_tasks, *p.shape), dtype=p.dtype, device=p.device)
                for p in self._shared
            ]

    def _stack_rows(self) -> None:
        """Copy the kept per-task gradients into the buffers (zeros where a task did not reach a
        parameter) and drop them."""
        assert self._task_rows is not None and self._shared is not None
        self._allocate_buffers(len(self._task_rows[0]))
        for buf, rows in zip(self._task_grads, self._task_rows, strict=True):
            for row, g in zip(buf, rows, strict=True):
                if g is None:
                    row.zero_()
                else:
                    row.copy_(g)
        self._task_rows = None

    def _store_task_grads(
        self,
        k: int,
        nonshared: list[Tensor],
        grads: Sequence[Tensor | None],
        first: bool,
    ) -> None:
        """Task ``k``'s gradients: shared ones kept (row ``k`` of the per-task buffers, or the
        tensor itself; added to ``.grad`` too when accumulating), the task's own parameters into
        ``.grad``."""
        assert self._shared is not None
        num_shared = len(self._shared)
        for i, (p, g) in enumerate(zip(self._shared, grads[:num_shared], strict=True)):
            if self._task_rows is not None:
                # Never written in place (a rescale replaces it), so it may alias anything.
                self._task_rows[i][k] = g
                self._reached[i] = self._reached[i] or g is not None
                continue
            row = self._task_grads[i][k]
            if g is None:
                if first:
                    row.zero_()
                continue
            if first:
                row.copy_(g)
            else:
                row.add_(g)
                _accumulate(p, g)
            self._reached[i] = True
        for p, g in zip(nonshared, grads[num_shared:], strict=True):
            if g is not None:
                _accumulate(p, g)

    def _record_grad_marks(self) -> None:
        """Remember the shared ``.grad`` tensors, to detect changes made before :meth:`step`:
        their identity, version counter and largest absolute value (the infinity norm, which
        cannot overflow for finite values). The value is needed because some in-place kernels do
        not bump the version counter: ``GradScaler.unscale_``'s
        ``_amp_foreach_non_finite_check_and_unscale_`` is one (torch 2.13)."""
        shared = self._shared or []
        with_grad = [p.grad for p in shared if p.grad is not None]
        norms: list[float | Tensor] = []
        if with_grad:
            stacked = torch.stack(_max_abs(with_grad))
            norms = list(stacked.unbind()) if self.sync_free else stacked.tolist()
        values = iter(norms)
        self._grad_marks = [
            None if p.grad is None else (id(p.grad), p.grad._version, next(values)) for p in shared
        ]

    # ----------------------------------------------------------------------------------- step
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
        if self._pending is None:
            raise RuntimeError(
                "PUB.step() called without per-task gradients: call backward(losses) after "
                "zero_grad() and before step()"
            )
        assert self._shared is not None and self._task_names is not None
        if self._pending == "weighted":
            self._check_finite_grads(self._all_params())
            self.optimizer.step()
            self._finish_step(solved=False)
            return
        overflow = self._unscale_for_grad_scaler() if self.sync_free else None
        active = [i for i, p in enumerate(self._shared) if p.grad is not None and self._reached[i]]
        grads_finite = self._carry_over_grad_changes(active)
        if overflow is not None and grads_finite is not None:
            grads_finite = grads_finite & ~overflow.to(grads_finite.device)
        solve = self._weights is None or self._step_count % self.solve_every == 0
        num_tasks = len(self._task_names)
        params = [self._shared[i] for i in active]
        task_grads = self._step_task_grads(active)
        nonshared = self._nonshared_with_grad()
        if self._transform is None or (self.space == "gradient" and not self.sync_free):
            self._combined_step(params, task_grads.all_stacked(), nonshared, solve)
            return
        self._check_contiguous(params + nonshared if self.sync_free else params)
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
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
        if items is None and self._task_rows is not None:  # eager after all: it reads buffers
            self._stack_rows()
            task_grads = self._step_task_grads(active)
        grams: StepGrams | None = None
        if solve:
            grams = engine.gram(contexts, task_grads, num_tasks, items)
            self._raise_if_nonfinite(grams.balanced)
            weights = self.balancer(grams.balanced)
        else:
            assert self._weights is not None
            weights = self._weights
        self._check_finite_grads(nonshared)
        engine.apply(contexts, task_grads, weights, items, self._drift_weight(weights))
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

    def _step_task_grads(self, active: list[int]) -> TaskGrads:
        """The active parameters' per-task gradients: the kept tensors (zeros for a task that did
        not reach the parameter), or the buffers."""
        if self._task_rows is None:
            return TaskGrads([self._task_grads[i] for i in active])
        assert self._shared is not None
        parts: list[list[Tensor]] = []
        for i in active:
            zeros: Tensor | None = None
            rows: list[Tensor] = []
            for g in self._task_rows[i]:
                if g is None:
                    zeros = torch.zeros_like(self._shared[i]) if zeros is None else zeros
                    g = zeros
                rows.append(g)
            parts.append(rows)
        return TaskGrads(parts)

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

    def _carry_over_grad_changes(self, active: list[int]) -> Tensor | None:
        """Rescale the per-task gradients by what was done to ``.grad`` since :meth:`backward`.

        A ``.grad`` that was replaced or changed in place (its version counter moved): where the
        per-task gradients sum to a non-zero value the factor is elementwise
        (``grad / sum_k g_k``: exact for value clipping too); where they cancel to zero, it is the
        least-squares uniform factor ``<grad, sum> / <sum, sum>`` over all changed tensors, which is
        exact for the uniform changes that matter (norm clipping, ``GradScaler.unscale_``).
        A ``.grad`` whose norm changed with the same version (kernels that do not bump it, such
        as ``GradScaler.unscale_``'s) is rescaled by the ratio of norms: exact for the uniform
        changes those kernels make.

        Raises ``FloatingPointError`` (nothing changed) on a non-finite shared gradient; with
        ``sync_free`` returns that check as a 0-d bool tensor instead (``None`` otherwise).
        """
        assert self._shared is not None
        now = self._grad_norms_now(active)
        if self.sync_free:
            return self._carry_over_on_device(active, now)
        assert isinstance(now, list)
        if not all(math.isfinite(n) for n in now):
            raise FloatingPointError(_NONFINITE_SHARED)
        changed: list[_Changed] = []
        for i, norm in zip(active, now, strict=True):
            p = self._shared[i]
            mark = self._grad_marks[i]
            assert p.grad is not None
            if mark is not None and mark[:2] == (id(p.grad), p.grad._version) and norm == mark[2]:
                continue
            if self._task_rows is None:
                buf = self._task_grads[i]
                changed.append((buf, task_sum(buf), p.grad))
            else:
                changed.append((self._task_rows[i], _sum_rows(self._task_rows[i]), p.grad))
        self._rescale_changed(changed)
        return None

    def _carry_over_on_device(self, active: list[int], now: Tensor | list[float]) -> Tensor:
        assert self._shared is not None and isinstance(now, Tensor | list)
        if isinstance(now, list):  # no active parameter
            return torch.ones((), dtype=torch.bool)
        changed: list[_Changed] = []
        for j, i in enumerate(active):
            p = self._shared[i]
            mark = self._grad_marks[i]
            assert p.grad is not None
            buf = self._task_grads[i]
            if mark is None or mark[:2] != (id(p.grad), p.grad._version):
                changed.append((buf, task_sum(buf), p.grad))
                continue
            before, after = mark[2], now[j]
            assert isinstance(before, Tensor)
            same = (after == before) | ~(before > 0)
            buf.mul_(torch.where(same, 1.0, after / torch.where(same, 1.0, before)).to(buf.dtype))
        self._rescale_changed(changed)
        return torch.isfinite(now).all()

    @staticmethod
    def _rescale_changed(changed: list[_Changed]) -> None:
        """``g_k <- g_k * grad / sum_j g_j`` for each ``(task gradients, sum, grad)`` (no host
        reads). The task gradients are a buffer (scaled in place) or a list of kept tensors
        (replaced: autograd's results may alias each other or other tensors)."""
        if not changed:
            return
        dots = torch.stack([(g.double() * t.double()).sum() for _, t, g in changed]).sum()
        norms = torch.stack([(t.double() * t.double()).sum() for _, t, _ in changed]).sum()
        uniform = torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 1.0)
        for target, total, grad in changed:
            nonzero = total != 0
            factor = uniform.to(total.dtype)
            ratio = torch.where(nonzero, grad / torch.where(nonzero, total, 1), factor)
            if isinstance(target, Tensor):
                target.mul_(ratio)
            else:
                target[:] = [None if g is None else g * ratio for g in target]

    def _grad_norms_now(self, active: list[int]) -> Tensor | list[float]:
        """The norms of the shared ``.grad`` tensors now, to compare with the recorded ones (a
        tensor with ``sync_free``, else floats)."""
        assert self._shared is not None
        grads = [self._shared[i].grad for i in active]
        if not grads:
            return []
        norms = torch.stack(_max_abs(grads))  # type: ignore[arg-type]
        return norms if self.sync_free else norms.tolist()

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
            norms = _max_abs([p.grad for p in nonshared])  # type: ignore[misc]
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
        assert self._shared is not None
        return self._shared[0].device

    def _combined_step(
        self, params: list[Tensor], task_grads: list[Tensor], nonshared: list[Tensor], solve: bool
    ) -> None:
        """The step that goes through the wrapped optimizer's own ``step()``: the generic path
        (update and marginal spaces: the snapshot look-ahead, then the shared parameters set to
        the weighted update; the state advanced by one real step on ``g*``, or, per task, each
        task's state taken from its own look-ahead step), and ``space="gradient"`` on every path
        but ``sync_free`` (the balanced gradient is an ordinary gradient: exactly the optimizer's
        step on it, any optimizer, task-specific parameters included)."""
        k = len(self._task_names or ())
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
            grams = _generic_grams(self.space, task_grads, updates, drifts, self.diagnostics)
            self._raise_if_nonfinite(grams.balanced)
            weights = self.balancer(grams.balanced)
        else:
            assert self._weights is not None
            weights = self._weights
        self._check_finite_grads(nonshared)
        extra = self._drift_weight(weights)
        if look is None:
            # Combined in place (the per-task values are not read again): no copy.
            self._step_with(params, [_combine_into_first_row(g, weights) for g in task_grads])
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
        assert self._shared is not None
        saved = [p.grad for p in self._shared]
        given = {id(p): g for p, g in zip(params, grads, strict=True)}
        try:
            for p in self._shared:
                p.grad = given.get(id(p))
            self.optimizer.step()
        finally:
            for p, g in zip(self._shared, saved, strict=True):
                p.grad = g

    def _nonshared_with_grad(self) -> list[Tensor]:
        shared_ids = {id(p) for p in self._shared or []}
        return [p for p in self._all_params() if id(p) not in shared_ids and p.grad is not None]

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
            raise FloatingPointError(_NONFINITE_SHARED)

    def _check_finite_grads(self, params: list[Tensor]) -> None:
        if not self.check_finite or not params:
            return
        norms = _max_abs([p.grad for p in params if p.grad is not None])
        if norms and not bool(torch.isfinite(torch.stack(norms)).all()):
            raise FloatingPointError(
                "non-finite gradients on the task-specific parameters: the step was skipped and "
                "nothing was changed"
            )

    def _finish_step(self, solved: bool, grams: StepGrams | None = None) -> None:
        self._step_count += 1
        self._pending = None
        self._task_rows = None
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
        if self._shared is None:
            raise RuntimeError("the shared parameters are known after the first backward()")
        return list(self._shared)


_NONFINITE_SHARED = (
    "non-finite per-task gradients or updates on the shared parameters: the step was skipped and "
    "nothing was changed (lower the learning rate, clip, or use a GradScaler)"
)


def _check_per_task(
    space: Space,
    sync_free: bool,
    fused: bool | None,
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
    if fused:
        raise ValueError(
            "state='per_task' runs the eager elementwise path (the compiled Adam kernels read one "
            "state per parameter); pass fused=None or fused=False"
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
) -> StepGrams:
    """The Gram matrices of the combined step's vectors (float32 products, float64 sums)."""
    k = task_grads[0].shape[0] if task_grads else 0
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


def task_sum(task_grads: Tensor, out: Tensor | None = None) -> Tensor:
    """``task_grads.sum(0)`` for a ``[K, *shape]`` buffer, as K - 1 additions of whole rows
    (torch's reduction over the leading dimension takes about 3x as long at K = 2 on CPU)."""
    return _sum_rows(task_grads.unbind(0), out)


def _combine_into_first_row(per_task: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[k] * per_task[k]``, written over ``per_task[0]`` (returned)."""
    w = weights.to(per_task)
    first = per_task[0].mul_(w[0])
    for k in range(1, per_task.shape[0]):
        first.addcmul_(per_task[k], w[k])
    return first


def _sum_rows(rows: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
    """The sum of the given per-task gradients (``None``: a task that did not reach the
    parameter; at least one is given), in ``out`` or a new tensor."""
    present = [g for g in rows if g is not None]
    if len(present) == 1:
        return present[0].clone() if out is None else out.copy_(present[0])
    total = present[0] + present[1] if out is None else torch.add(present[0], present[1], out=out)
    for g in present[2:]:
        total.add_(g)
    return total


def _max_abs(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Per tensor, the largest absolute value (the infinity norm): finite exactly when every value
    is, for any finite values (a 2-norm of float32 values above about 1.8e19 overflows), and
    changed by any uniform rescaling, which is what the ``.grad`` change detection needs."""
    if not tensors:
        return ()
    return tuple(torch._foreach_norm(list(tensors), ord=math.inf))


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)
