"""Fused Adam/AdamW apply kernel, compiled with ``torch.compile`` (opt-in or automatic).

The eager apply pass of :class:`~pub_optim.transforms.adam.AdamTransform` recomputes the
look-ahead updates block by block (about five elementwise operations over ``K x block``), forms
``u = sum_k alpha_k d_k`` and ``g* = sum_k alpha_k g_k`` and then advances the state. Compiled,
:func:`adam_apply` is one loop over the per-task gradients that keeps the updates in registers and
updates ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) and the parameter in place.

(A compiled Gram reduction was tried and measured slower than the eager blocked look-ahead plus a
float32 matrix product, and it needed float64 ``K x P`` temporaries: the Gram pass stays eager.)

Same formulas as the eager transform (the test suite compares them); rounding may differ in the
last bits. The first call per flag combination compiles (seconds); later calls reuse the kernel for
any tensor size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_LOCK = threading.Lock()
_KERNELS: dict[str, Callable[..., Any]] = {}


def _updates(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    theta: Tensor,
    coef_m: float,
    coef_g: float,
    beta2: float,
    one_minus_beta2: float,
    eps_c: float,
    l2: float,
    maximize: bool,
) -> Tensor:
    """``d_k`` for a ``[K, n]`` block (see ``AdamTransform.lookahead`` for the folded constants)."""
    e = -g if maximize else g
    if l2 != 0.0:
        e = e + l2 * theta
    num = m * coef_m + e * coef_g
    den = v * beta2 + e * e * one_minus_beta2
    if vmax is not None:
        den = torch.maximum(den, vmax)
    return num / (torch.sqrt(den) + eps_c)


def _apply_kernel(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    theta: Tensor,
    alpha: Tensor,
    coef_m: float,
    coef_g: float,
    beta2: float,
    one_minus_beta2: float,
    eps_c: float,
    l2: float,
    maximize: bool,
    one_minus_beta1: float,
    decay: float,
) -> None:
    d = _updates(g, m, v, vmax, theta, coef_m, coef_g, beta2, one_minus_beta2, eps_c, l2, maximize)
    weights = alpha.unsqueeze(-1)
    update = (weights * d).sum(0)
    combined = (weights * g).sum(0)
    e = -combined if maximize else combined
    if l2 != 0.0:
        e = e + l2 * theta
    m.lerp_(e, one_minus_beta1)
    v.mul_(beta2).addcmul_(e, e, value=one_minus_beta2)
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
    if decay != 1.0:
        theta.mul_(decay)
    theta.add_(update)


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    with _LOCK:
        kernel = _KERNELS.get(name)
        if kernel is None:
            kernel = torch.compile(fn, dynamic=True)
            _KERNELS[name] = kernel
    return kernel


def adam_apply(*args: Any) -> None:
    """Weighted update and state advance of one parameter, in place."""
    _compiled("apply", _apply_kernel)(*args)
