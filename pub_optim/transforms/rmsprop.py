"""RMSprop (Hinton, Coursera lecture 6e, 2012), centered variant (Graves 2013), momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .base import ParamContext, StateStore, UpdateTransform, flat, scalar, signed


class RMSpropTransform(UpdateTransform):
    """Look-ahead of ``torch.optim.RMSprop``.

    ``s_k = a s + (1-a) e_k^2``; centered: ``c_k = a c + (1-a) e_k`` and
    ``avg_k = sqrt(s_k - c_k^2) + eps``, else ``sqrt(s_k) + eps``; with momentum
    ``b_k = mu b + e_k / avg_k`` and ``d_k = -lr b_k``, else ``d_k = -lr e_k / avg_k``.
    """

    def _begin(self, param: Tensor, group: dict[str, Any], store: StateStore) -> ParamContext:
        state = store.get(param, {})
        new = len(state) == 0
        if new:
            zeros = lambda: torch.zeros_like(param, memory_format=torch.preserve_format)  # noqa: E731
            state = {
                "step": torch.zeros((), dtype=_get_scalar_dtype(), device=param.device)
                if group.get("capturable", False)
                else torch.zeros((), dtype=_get_scalar_dtype()),
                "square_avg": zeros(),
            }
            if group["momentum"] > 0:
                state["momentum_buffer"] = zeros()
            if group["centered"]:
                state["grad_avg"] = zeros()
        ctx = ParamContext(param, group, state, new)
        ctx.flat = {"param": flat(param), "sq": flat(state["square_avg"])}
        if group["momentum"] > 0:
            ctx.flat["buf"] = flat(state["momentum_buffer"])
        if group["centered"]:
            ctx.flat["gavg"] = flat(state["grad_avg"])
        ctx.scalars = {
            "lr": scalar(group["lr"]),
            "alpha": float(group["alpha"]),
            "eps": float(group["eps"]),
            "wd": float(group["weight_decay"]),
            "momentum": float(group["momentum"]),
        }
        return ctx

    def _effective(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor) -> Tensor:
        grads = signed(grads, ctx.group)
        if ctx.scalars["wd"] != 0.0:
            grads = grads + ctx.scalars["wd"] * ctx.view("param", lo, hi)
        return grads

    def lookahead(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor, out: Tensor) -> None:
        s = ctx.scalars
        a = s["alpha"]
        e = self._effective(ctx, lo, hi, grads)
        avg = torch.addcmul(ctx.view("sq", lo, hi) * a, e, e, value=1.0 - a)
        if "gavg" in ctx.flat:
            centre = torch.lerp(ctx.view("gavg", lo, hi).expand_as(e), e, 1.0 - a)
            avg.addcmul_(centre, centre, value=-1.0)
        avg.sqrt_().add_(s["eps"])
        torch.div(e, avg, out=out)
        if s["momentum"] > 0:
            out.add_(ctx.view("buf", lo, hi), alpha=s["momentum"])
        out.mul_(-s["lr"])

    def advance(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor) -> None:
        s = ctx.scalars
        a = s["alpha"]
        e = self._effective(ctx, lo, hi, grad)
        sq = ctx.view("sq", lo, hi)
        sq.mul_(a).addcmul_(e, e, value=1.0 - a)
        if s["momentum"] > 0:
            if "gavg" in ctx.flat:
                gavg = ctx.view("gavg", lo, hi)
                gavg.lerp_(e, 1.0 - a)
                avg = sq.addcmul(gavg, gavg, value=-1.0).sqrt_().add_(s["eps"])
            else:
                avg = sq.sqrt().add_(s["eps"])
            ctx.view("buf", lo, hi).mul_(s["momentum"]).addcdiv_(e, avg)
        elif "gavg" in ctx.flat:
            ctx.view("gavg", lo, hi).lerp_(e, 1.0 - a)

    def finish(self, ctx: ParamContext) -> None:
        super().finish(ctx)
        ctx.state["step"] += 1
