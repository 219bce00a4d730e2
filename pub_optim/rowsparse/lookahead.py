"""Look-ahead transforms for the optimizers that take sparse gradients, on touched rows only.

For a row-sparse parameter, PUB (Yuan, Cai, Dong, arXiv:2410.05806, steps 2, 5 and 6) needs, per
task ``k``, the update the optimizer would apply if task ``k``'s sparse gradient were the whole
gradient, and afterwards the optimizer's own step on the balanced sparse gradient
``g* = sum_k alpha_k g_k`` with the balanced update ``sum_k alpha_k d_k`` in place of its own.
A sparse optimizer touches only the rows present in the gradient, so:

* ``d_k`` is zero outside the rows task ``k`` touched (:attr:`TaskRows.touched`);
* the state advances on the union of touched rows, as if the optimizer had received ``g*`` as a
  sparse gradient with those rows (a row whose balanced value is zero still counts as touched:
  SparseAdam's moments decay there, exactly as they would for an explicit zero);
* step counters advance once per step.

Transforms exist for ``torch.optim.SparseAdam`` (Kingma & Ba 2015, with lazy per-row moments),
``torch.optim.Adagrad`` (Duchi, Hazan, Singer 2011; sparse gradients without weight decay, as
torch allows) and ``torch.optim.SGD`` (sparse gradients without momentum or weight decay). The
formulas follow torch's own kernels operation by operation, so one task, or K identical tasks,
reproduce the plain optimizer to float32 rounding.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..transforms.base import scalar
from .grads import TaskRows


@dataclass
class SparseContext:
    """One row-sparse parameter's state for one step (state created off to the side when new)."""

    param: Tensor
    group: dict[str, Any]
    state: dict[str, Any]
    new_state: bool
    scalars: dict[str, float] = field(default_factory=dict)


class SparseRowTransform(ABC):
    """Look-ahead and commit of one sparse-gradient optimizer on the touched rows of a table."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for options this optimizer does not allow with sparse
        gradients (checked before any work)."""
        if group.get("differentiable", False):
            raise ValueError(
                f"{type(self.optimizer).__name__}(differentiable=True) is not supported for "
                "sparse gradients; use differentiable=False"
            )

    @abstractmethod
    def begin(self, param: Tensor, group: dict[str, Any]) -> SparseContext:
        """Read hyper-parameters and state; create missing state off to the side."""

    @abstractmethod
    def lookahead(self, ctx: SparseContext, grads: TaskRows) -> Tensor:
        """``[K, n, *row]``: each task's update on the union rows (zero where it did not touch)."""

    @abstractmethod
    def commit(self, ctx: SparseContext, grads: TaskRows, grad: Tensor, update: Tensor) -> None:
        """Advance the state on the union rows with ``grad`` (``[n, *row]``) and add ``update``
        to the parameter there."""

    def finish(self, ctx: SparseContext) -> None:
        """Insert new state (after commit)."""
        if ctx.new_state:
            self.optimizer.state[ctx.param].update(ctx.state)


def _signed(values: Tensor, group: dict[str, Any]) -> Tensor:
    return -values if group.get("maximize", False) else values


def _mask(touched: Tensor, values: Tensor) -> Tensor:
    """``touched`` ``[K, n]`` broadcast against ``values`` ``[K, n, *row]``."""
    return touched.reshape(*touched.shape, *([1] * (values.dim() - 2)))


class SparseAdamTransform(SparseRowTransform):
    """``torch.optim.SparseAdam``: per touched row ``m' = m + (g - m)(1 - b1)``,
    ``v' = v + (g^2 - v)(1 - b2)``, ``d = -lr sqrt(1 - b2^t)/(1 - b1^t) * m' / (sqrt(v') + eps)``;
    untouched rows keep their moments (lazy)."""

    def begin(self, param: Tensor, group: dict[str, Any]) -> SparseContext:
        state = self.optimizer.state.get(param, {})
        new = len(state) == 0
        if new:
            state = {
                "step": 0,
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        beta1, beta2 = (scalar(b) for b in group["betas"])
        step = int(state["step"]) + 1
        ctx = SparseContext(param, group, state, new)
        ctx.scalars = {
            "beta1": beta1,
            "beta2": beta2,
            "eps": float(group["eps"]),
            "step_size": scalar(group["lr"]) * math.sqrt(1 - beta2**step) / (1 - beta1**step),
        }
        return ctx

    def _moments(self, ctx: SparseContext, rows: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        s = ctx.scalars
        old_m = ctx.state["exp_avg"].index_select(0, rows)
        old_v = ctx.state["exp_avg_sq"].index_select(0, rows)
        m = (g - old_m).mul_(1 - s["beta1"]).add_(old_m)
        v = (g * g).sub_(old_v).mul_(1 - s["beta2"]).add_(old_v)
        return m, v

    def lookahead(self, ctx: SparseContext, grads: TaskRows) -> Tensor:
        g = _signed(grads.values, ctx.group)
        m, v = self._moments(ctx, grads.rows, g)
        denom = v.sqrt_().add_(ctx.scalars["eps"])
        d = m.div_(denom).mul_(-ctx.scalars["step_size"])
        return d.mul_(_mask(grads.touched, d))

    def commit(self, ctx: SparseContext, grads: TaskRows, grad: Tensor, update: Tensor) -> None:
        g = _signed(grad, ctx.group)
        m, v = self._moments(ctx, grads.rows, g)
        ctx.state["exp_avg"].index_copy_(0, grads.rows, m)
        ctx.state["exp_avg_sq"].index_copy_(0, grads.rows, v)
        ctx.param.index_add_(0, grads.rows, update.to(ctx.param.dtype))

    def finish(self, ctx: SparseContext) -> None:
        super().finish(ctx)
        self.optimizer.state[ctx.param]["step"] = int(ctx.state["step"]) + 1


class SparseAdagradTransform(SparseRowTransform):
    """``torch.optim.Adagrad`` with sparse gradients: per touched row ``S' = S + g^2``,
    ``d = -lr / (1 + (t - 1) lr_decay) * g / (sqrt(S') + eps)``."""

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if float(group["weight_decay"]) != 0.0:
            raise ValueError(
                "Adagrad's weight_decay option is not compatible with sparse gradients (torch "
                "refuses it too): set weight_decay=0 for the sparse tables' parameter group"
            )

    def begin(self, param: Tensor, group: dict[str, Any]) -> SparseContext:
        state = self.optimizer.state[param]
        ctx = SparseContext(param, group, state, new_state=False)
        step = scalar(state["step"]) + 1.0
        ctx.scalars = {
            "clr": scalar(group["lr"]) / (1.0 + (step - 1.0) * float(group["lr_decay"])),
            "eps": float(group["eps"]),
        }
        return ctx

    def lookahead(self, ctx: SparseContext, grads: TaskRows) -> Tensor:
        g = _signed(grads.values, ctx.group)
        total = ctx.state["sum"].index_select(0, grads.rows)
        std = torch.addcmul(total.expand_as(g), g, g).sqrt_().add_(ctx.scalars["eps"])
        d = torch.div(g, std).mul_(-ctx.scalars["clr"])
        return d.mul_(_mask(grads.touched, d))

    def commit(self, ctx: SparseContext, grads: TaskRows, grad: Tensor, update: Tensor) -> None:
        g = _signed(grad, ctx.group)
        ctx.state["sum"].index_add_(0, grads.rows, g * g)
        ctx.param.index_add_(0, grads.rows, update.to(ctx.param.dtype))

    def finish(self, ctx: SparseContext) -> None:
        ctx.state["step"] += 1


class SparseSGDTransform(SparseRowTransform):
    """``torch.optim.SGD`` with sparse gradients and no momentum: ``d = -lr g`` per touched row."""

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if float(group["momentum"]) != 0.0 or scalar(group["weight_decay"]) != 0.0:
            raise ValueError(
                "SGD with momentum or weight_decay turns a sparse gradient into a dense (or "
                "ever-growing sparse) buffer, which PUB does not reproduce: use momentum=0 and "
                "weight_decay=0 for the sparse tables, or SparseAdam / Adagrad"
            )

    def begin(self, param: Tensor, group: dict[str, Any]) -> SparseContext:
        ctx = SparseContext(param, group, {}, new_state=False)
        ctx.scalars = {"lr": scalar(group["lr"])}
        return ctx

    def lookahead(self, ctx: SparseContext, grads: TaskRows) -> Tensor:
        d = _signed(grads.values, ctx.group) * (-ctx.scalars["lr"])
        return d.mul_(_mask(grads.touched, d))

    def commit(self, ctx: SparseContext, grads: TaskRows, grad: Tensor, update: Tensor) -> None:
        ctx.param.index_add_(0, grads.rows, update.to(ctx.param.dtype))


#: Row-sparse transforms by optimizer class (exact class, as for the dense transforms).
SPARSE_TRANSFORMS: dict[type[torch.optim.Optimizer], type[SparseRowTransform]] = {
    torch.optim.SparseAdam: SparseAdamTransform,
    torch.optim.Adagrad: SparseAdagradTransform,
    torch.optim.SGD: SparseSGDTransform,
}


def sparse_transform_for(optimizer: torch.optim.Optimizer) -> SparseRowTransform:
    """The row-sparse transform of this optimizer, or ``TypeError`` naming those that exist."""
    cls = SPARSE_TRANSFORMS.get(type(optimizer))
    if cls is None:
        raise TypeError(
            f"{type(optimizer).__name__} does not take sparse gradients in PUB: sparse-gradient "
            "parameters (nn.Embedding(sparse=True), nn.EmbeddingBag(sparse=True)) need "
            "torch.optim.Adagrad (weight_decay=0) or SGD (momentum=0, weight_decay=0) for the "
            "whole model, or SparseAdam when every balanced parameter is such a table (one PUB "
            "wraps one optimizer); or use dense-gradient tables (sparse=False)"
        )
    return cls(optimizer)
