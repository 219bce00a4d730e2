"""Adagrad (Duchi, Hazan, Singer, JMLR 2011) with learning-rate decay and weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .base import ParamContext, StateStore, UpdateTransform, flat, scalar, signed


class AdagradTransform(UpdateTransform):
    """Look-ahead of ``torch.optim.Adagrad`` (dense gradients).

    ``S_k = S + e_k^2``, ``d_k = -lr / (1 + (t - 1) lr_decay) * e_k / (sqrt(S_k) + eps)``.
    Adagrad creates its state in its constructor; a parameter added later with ``add_param_group``
    gets it lazily at its first step (from the optimizer's default ``initial_accumulator_value``),
    as ``Adagrad.step`` does.
    """

    def _begin(self, param: Tensor, group: dict[str, Any], store: StateStore) -> ParamContext:
        state = store.get(param, {})
        new = len(state) == 0
        if new:  # a parameter added with add_param_group: created lazily, as Adagrad's step does
            fused = bool(group.get("fused"))
            init = float(self.optimizer.defaults["initial_accumulator_value"])
            state = {
                "step": torch.zeros(
                    (), dtype=_get_scalar_dtype(is_fused=fused), device=param.device
                )
                if fused
                else torch.tensor(0.0, dtype=_get_scalar_dtype()),
                "sum": torch.full_like(
                    param,
                    complex(init, init) if torch.is_complex(param) else init,
                    memory_format=torch.preserve_format,
                ),
            }
        ctx = ParamContext(param, group, state, new_state=new)
        ctx.flat = {"param": flat(param), "sum": flat(state["sum"])}
        step = scalar(state["step"]) + 1.0
        ctx.scalars = {
            "clr": scalar(group["lr"]) / (1.0 + (step - 1.0) * float(group["lr_decay"])),
            "eps": float(group["eps"]),
            "wd": float(group["weight_decay"]),
        }
        return ctx

    def _effective(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor) -> Tensor:
        grads = signed(grads, ctx.group)
        if ctx.scalars["wd"] != 0.0:
            grads = grads + ctx.scalars["wd"] * ctx.view("param", lo, hi)
        return grads

    def lookahead(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor, out: Tensor) -> None:
        e = self._effective(ctx, lo, hi, grads)
        std = (
            torch.addcmul(ctx.view("sum", lo, hi).expand_as(e), e, e)
            .sqrt_()
            .add_(ctx.scalars["eps"])
        )
        torch.div(e, std, out=out)
        out.mul_(-ctx.scalars["clr"])

    def advance(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor) -> None:
        e = self._effective(ctx, lo, hi, grad)
        ctx.view("sum", lo, hi).addcmul_(e, e, value=1.0)

    def finish(self, ctx: ParamContext) -> None:
        super().finish(ctx)
        ctx.state["step"] += 1
