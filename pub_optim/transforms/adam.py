"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), amsgrad (Reddi et al. 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .base import ParamContext, StateStore, UpdateTransform, flat, scalar, signed
from .fused import AdamOperands


def decoupled_weight_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay is decoupled (AdamW) rather than L2 (Adam).

    Recent torch records the choice in the group (``decoupled_weight_decay``, which ``Adam.step``
    reads, and which ``AdamW``, a subclass of ``Adam`` there, sets). Older torch (2.6 and before)
    has no such key: there ``AdamW`` is a class of its own whose decay is always decoupled and
    ``Adam``'s is always L2. The key decides where it exists, the class where it does not.
    """
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    return isinstance(optimizer, torch.optim.AdamW)


class AdamTransform(UpdateTransform):
    """Look-ahead of ``torch.optim.Adam`` / ``AdamW`` with every option but ``differentiable``.

    For task ``k`` with step ``t`` (already incremented):
    ``m_k = b1 m + (1-b1) g_k``, ``v_k = b2 v + (1-b2) g_k^2`` (amsgrad: ``max(v_max, v_k)``),
    ``d_k = -lr/(1-b1^t) * m_k / (sqrt(v_k)/sqrt(1-b2^t) + eps)``. L2 weight decay adds
    ``wd * theta`` to ``g_k`` (as torch does); decoupled weight decay scales ``theta`` by
    ``1 - lr*wd`` once, in ``commit``.
    """

    def _begin(self, param: Tensor, group: dict[str, Any], store: StateStore) -> ParamContext:
        state = store.get(param, {})
        new = len(state) == 0
        if new:
            on_device = group.get("capturable", False) or group.get("fused", False)
            state = {
                "step": torch.zeros(
                    (), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=param.device
                )
                if on_device
                else torch.tensor(0.0, dtype=_get_scalar_dtype()),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
        ctx = ParamContext(param, group, state, new)
        ctx.flat = {
            "param": flat(param),
            "m": flat(state["exp_avg"]),
            "v": flat(state["exp_avg_sq"]),
        }
        if group["amsgrad"]:
            ctx.flat["vmax"] = flat(state["max_exp_avg_sq"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        step = scalar(state["step"]) + 1.0
        lr = scalar(group["lr"])
        ctx.scalars = {
            "beta1": beta1,
            "beta2": beta2,
            "lr": lr,
            "eps": float(group["eps"]),
            "wd": float(group["weight_decay"]),
            "step_size": lr / (1.0 - beta1**step),
            "bc2_sqrt": math.sqrt(1.0 - beta2**step),
        }
        ctx.scalars["decoupled"] = float(decoupled_weight_decay(self.optimizer, group))
        return ctx

    def _effective(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor) -> Tensor:
        grads = signed(grads, ctx.group)
        wd = ctx.scalars["wd"]
        if wd != 0.0 and not ctx.scalars["decoupled"]:
            grads = grads + wd * ctx.view("param", lo, hi)
        return grads

    def lookahead(self, ctx: ParamContext, lo: int, hi: int, grads: Tensor, out: Tensor) -> None:
        # d_k = -step_size * m_k / (sqrt(v_k) / c + eps) = S * m_k / (sqrt(v_k) + c * eps) with
        # S = -step_size * c and c = sqrt(1 - b2^t): the constants are folded into the two
        # [K, chunk] operations that exist anyway, leaving five passes over the block.
        s = ctx.scalars
        b1, b2, c = s["beta1"], s["beta2"], s["bc2_sqrt"]
        scale = -s["step_size"] * c
        g = self._effective(ctx, lo, hi, grads)
        torch.add(ctx.view("m", lo, hi) * (b1 * scale), g, alpha=(1.0 - b1) * scale, out=out)
        denom = torch.addcmul(ctx.view("v", lo, hi) * b2, g, g, value=1.0 - b2)
        if "vmax" in ctx.flat:
            torch.maximum(denom, ctx.view("vmax", lo, hi), out=denom)
        denom.sqrt_().add_(s["eps"] * c)
        out.div_(denom)

    def advance(self, ctx: ParamContext, lo: int, hi: int, grad: Tensor) -> None:
        s = ctx.scalars
        g = self._effective(ctx, lo, hi, grad)
        v = ctx.view("v", lo, hi)
        ctx.view("m", lo, hi).lerp_(g, 1.0 - s["beta1"])
        v.mul_(s["beta2"]).addcmul_(g, g, value=1.0 - s["beta2"])
        if "vmax" in ctx.flat:
            vmax = ctx.view("vmax", lo, hi)
            torch.maximum(vmax, v, out=vmax)

    def apply_update(self, ctx: ParamContext, lo: int, hi: int, update: Tensor) -> None:
        s = ctx.scalars
        theta = ctx.view("param", lo, hi)
        if s["decoupled"] and s["wd"] != 0.0:
            theta.mul_(1.0 - s["lr"] * s["wd"])
        theta.add_(update)

    def finish(self, ctx: ParamContext) -> None:
        super().finish(ctx)
        ctx.state["step"] += 1

    def fused_operands(self, ctx: ParamContext) -> AdamOperands:
        """State views and folded constants for :mod:`pub_optim.transforms.fused`."""
        s = ctx.scalars
        b1, b2, c = s["beta1"], s["beta2"], s["bc2_sqrt"]
        scale = -s["step_size"] * c
        decoupled = bool(s["decoupled"])
        return AdamOperands(
            m=ctx.flat["m"],
            v=ctx.flat["v"],
            vmax=ctx.flat.get("vmax"),
            theta=ctx.flat["param"],
            coef_m=b1 * scale,
            coef_g=(1.0 - b1) * scale,
            beta2=b2,
            one_minus_beta2=1.0 - b2,
            eps_c=s["eps"] * c,
            l2=0.0 if decoupled else s["wd"],
            maximize=bool(ctx.group.get("maximize", False)),
            one_minus_beta1=1.0 - b1,
            decay=1.0 - s["lr"] * s["wd"] if decoupled and s["wd"] != 0.0 else 1.0,
        )
