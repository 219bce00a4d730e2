"""SGD with momentum, dampening, Nesterov momentum (Sutskever et al. 2013), weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ParamContext, StateStore, UpdateTransform, flat, scalar, signed


class SGDTransform(UpdateTransform):
    """Look-ahead of ``torch.optim.SGD``.

    ``e_k = g_k + wd * theta`` (negated with ``maximize``); with momentum
    ``b_k = mu * b + (1 - dampening) * e_k`` (``b_k = e_k`` on the first step, as torch does)
    and ``d_k = -lr * (e_k + mu * b_k)`` with Nesterov, else ``-lr * b_k``; without momentum
    ``d_k = -lr * e_k``.
    """

    def _begin(self, param: Tensor, group: dict[str, Any], store: StateStore) -> ParamContext:
        state = store.get(param, {})
        momentum = float(group["momentum"])
        buf = state.get("momentum_buffer")
        ctx = ParamContext(param, group, dict(state), new_state=momentum != 0.0 and buf is None)
        ctx.flat = {"param": flat(param)}
        if momentum != 0.0:
            if buf is None:
                buf = torch.zeros_like(param, memory_format=torch.preserve_format)
                ctx.state["momentum_buffer"] = buf
            ctx.flat["buf"] = flat(buf)
        ctx.scalars = {
            "lr": scalar(group["lr"]),
            "momentum": momentum,
            "dampening": float(group["dampening"]),
            "wd": scalar(group["weight_decay"]),
            "nesterov": float(bool(group["nesterov"])),
            "first": float(ctx.new_state),
        }
        return ctx

    def _effective(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor) -> Tensor:
        grads = signed(grads, ctx.group)
        if ctx.scalars["wd"] != 0.0:
            grads = grads + ctx.scalars["wd"] * ctx.view("param", lo, hi)
        return grads

    def _direction(self, ctx: ParamContext, lo: int, hi: int, e: Tensor, out: Tensor) -> None:
        s = ctx.scalars
        mu = s["momentum"]
        if mu == 0.0:
            torch.mul(e, -s["lr"], out=out)
            return
        if s["first"]:
            out.copy_(e.expand_as(out))
        else:
            torch.add(ctx.view("buf", lo, hi) * mu, e, alpha=1.0 - s["dampening"], out=out)
        if s["nesterov"]:
            out.mul_(mu).add_(e)
        out.mul_(-s["lr"])

    def lookahead(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor, out: Tensor) -> None:
        self._direction(ctx, lo, hi, self._effective(ctx, lo, hi, grads), out)

    def advance(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor) -> None:
        s = ctx.scalars
        if s["momentum"] != 0.0:
            e = self._effective(ctx, lo, hi, grad)
            buf = ctx.view("buf", lo, hi)
            if s["first"]:
                buf.copy_(e)
            else:
                buf.mul_(s["momentum"]).add_(e, alpha=1.0 - s["dampening"])
