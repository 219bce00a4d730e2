"""Per-task look-ahead transforms: the step an optimizer *would* take for one task's gradient.

PUB (arXiv:2410.05806, step 2 of the method) needs, for every task ``k``, the update
``d_k = T(g_k; S)`` that the wrapped optimizer would apply this iteration if ``g_k`` were the whole
gradient, computed from the current shared state ``S`` without changing it; and afterwards it
advances ``S`` as if the optimizer had received the weighted gradient ``g* = sum_k alpha_k g_k``.

A :class:`UpdateTransform` does both for one optimizer family, on flat views of one parameter and
its state, column chunk by column chunk, so that the ``K x chunk`` temporaries stay in cache:

* :meth:`UpdateTransform.begin` reads the hyper-parameters and the state of one parameter (state
  that does not exist yet is created *off to the side*, in the same format as torch, and only
  inserted into the optimizer's state by :meth:`ParamContext.finish`);
* :meth:`UpdateTransform.lookahead` writes ``d_k`` for a ``[K, chunk]`` block of per-task
  gradients (``d_k`` includes the learning rate and the sign; it excludes decoupled weight decay,
  which does not depend on the gradient and is applied exactly once by ``commit``);
* :meth:`UpdateTransform.commit` advances the state with ``g*`` and applies ``update`` (and the
  decoupled weight decay) to the parameter, on the same chunk: :meth:`UpdateTransform.advance`
  (the state) then :meth:`UpdateTransform.apply_update` (the parameter). With one state per task
  (``PUB(state="per_task")``) each task's state advances with its own gradient and the parameter
  is updated once.

The state a transform reads lives in a *store* (a ``{param: state dict}`` mapping): the wrapped
optimizer's ``state`` by default, or one task's own store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def scalar(value: Any) -> float:
    """A Python float from a number or a 0-d tensor (a CPU tensor in torch's default formats)."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


#: ``{param: state dict}``, as ``torch.optim.Optimizer.state``.
StateStore = MutableMapping[Tensor, dict[str, Any]]


@dataclass
class ParamContext:
    """Flat views of one parameter and its (possibly new) optimizer state for one step.

    ``flat`` must hold every tensor that :meth:`UpdateTransform.commit` writes: a step skipped on
    the device (``PUB(sync_free=True)``) saves and restores exactly those.
    """

    param: Tensor
    group: dict[str, Any]
    state: dict[str, Any]
    new_state: bool
    flat: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    #: Where new state is inserted by :meth:`UpdateTransform.finish` (``None``: the optimizer's).
    store: StateStore | None = None

    def view(self, name: str, lo: int, hi: int) -> Tensor:
        return self.flat[name][lo:hi]


class UpdateTransform(ABC):
    """Look-ahead and commit for one family of ``torch.optim`` optimizers."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for options this transform cannot reproduce exactly."""
        if group.get("differentiable", False):
            raise ValueError(
                f"{type(self.optimizer).__name__}(differentiable=True) is not supported by the "
                "look-ahead transforms; use differentiable=False"
            )
        if isinstance(group.get("lr"), Tensor) and group["lr"].requires_grad:
            raise ValueError("a learning rate that requires grad is not supported")

    def begin(
        self, param: Tensor, group: dict[str, Any], store: StateStore | None = None
    ) -> ParamContext:
        """Read hyper-parameters and state for this step from ``store`` (default: the wrapped
        optimizer's state); create missing state off to the side."""
        ctx = self._begin(param, group, self.optimizer.state if store is None else store)
        ctx.store = store
        return ctx

    @abstractmethod
    def _begin(self, param: Tensor, group: dict[str, Any], store: StateStore) -> ParamContext:
        """:meth:`begin` with the store resolved."""

    @abstractmethod
    def lookahead(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor, out: Tensor) -> None:
        """Write the per-task updates of columns ``lo:hi`` (``grads``/``out``: ``[K, hi - lo]``)."""

    def commit(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor, update: Tensor) -> None:
        """Advance the state of columns ``lo:hi`` with ``grad`` and apply ``update`` there."""
        self.advance(ctx, lo, hi, grad)
        self.apply_update(ctx, lo, hi, update)

    @abstractmethod
    def advance(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor) -> None:
        """Advance the state of columns ``lo:hi`` with ``grad`` (``[hi - lo]``); reads the
        parameter (L2 weight decay) but does not change it."""

    def apply_update(self, ctx: ParamContext, lo: int, hi: int, update: Tensor) -> None:
        """Apply ``update`` (and decoupled weight decay, where the optimizer has it) to columns
        ``lo:hi`` of the parameter."""
        ctx.view("param", lo, hi).add_(update)

    def finish(self, ctx: ParamContext) -> None:
        """After every chunk is committed: insert new state, advance step counters."""
        if ctx.new_state:
            store = self.optimizer.state if ctx.store is None else ctx.store
            store.setdefault(ctx.param, {}).update(ctx.state)


def flat(tensor: Tensor) -> Tensor:
    """A flat view (parameters and torch's state tensors are contiguous)."""
    return tensor.view(-1)


def signed(grads: Tensor, group: dict[str, Any]) -> Tensor:
    return -grads if group.get("maximize", False) else grads
