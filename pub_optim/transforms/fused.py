"""Fused Adam/AdamW Gram and apply kernels, compiled with ``torch.compile`` (opt-in or automatic).

:func:`adam_gram` computes the look-ahead updates ``d_k`` of one parameter and reduces them
straight into the packed upper triangle of their Gram matrix, ``<d_i, d_j>`` for ``i <= j``,
accumulated in float64: one pass over the per-task gradients with the updates kept in registers.
Inductor would by default materialise ``d`` (a ``K x n`` temporary: K more copies of the
parameter) because the ``K (K + 1) / 2`` reductions all read it; raising its "realize" thresholds
for this kernel makes it recompute the few elementwise operations inside each reduction instead,
so the kernel allocates nothing but its result (``tests/core/test_wrapper_memory.py`` and the
step-time benchmark measure it). Measured against the eager blocked look-ahead plus a float32
matrix product: 3-4x faster at K = 2..8 on one CPU thread.

The eager apply pass of :class:`~pub_optim.transforms.adam.AdamTransform` recomputes the
look-ahead updates block by block (about five elementwise operations over ``K x block``), forms
``u = sum_k alpha_k d_k`` and ``g* = sum_k alpha_k g_k`` and then advances the state. Compiled,
:func:`adam_apply` is one loop over the per-task gradients that keeps the updates in registers and
updates ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) and the parameter in place; its sums
over the K tasks are unrolled so that they are not reductions (whose results Inductor would
materialise), so it allocates nothing either.

Both take a list of parameters and cover up to :data:`BUCKET` of them per compiled call (a call
costs ~0.1 ms of guards and launch whatever its size: one call per tensor made biases cost more
than they compute). Same formulas as the eager transform (the test suite compares them, and the
Gram kernel against torch's own Adam in float64); rounding may differ in the last bits. The first
call per structure (bucket size, flags) compiles, taking seconds; later calls reuse the kernel for
any tensor sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: Parameters per compiled call. A call costs ~0.1 ms of guards and launch whatever its size, so
#: one call covers many parameters (small ones included); the cap bounds the graph that is
#: compiled, once per distinct bucket size.
BUCKET = 16

_LOCK = threading.Lock()
_KERNELS: dict[str, Callable[..., Any]] = {}

#: Inductor options of the Gram kernel: never materialise the per-task updates (see above).
_RECOMPUTE_OPTIONS: dict[str, Any] = {
    "realize_reads_threshold": 1 << 20,
    "realize_opcount_threshold": 1 << 20,
    "realize_acc_reads_threshold": 1 << 20,
    "realize_cpu_opcount_threshold": 1 << 20,
    "realize_cpu_acc_reads_threshold": 1 << 20,
}


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


def _gram_kernel(
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
    d = _updates(g, m, v, vmax, theta, coef_m, coef_g, beta2, one_minus_beta2, eps_c, l2, maximize)
    k = g.shape[0]
    pairs = [(d[i].double() * d[j].double()).sum() for i in range(k) for j in range(i, k)]
    return torch.stack(pairs)


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
    # The sums over the K tasks are unrolled (K is static): a ``sum(0)`` would be a reduction,
    # whose result Inductor always materialises (two more copies of the parameter).
    update = combined = None
    for k in range(g.shape[0]):
        d = _updates(
            g[k], m, v, vmax, theta, coef_m, coef_g, beta2, one_minus_beta2, eps_c, l2, maximize
        )
        weighted_d, weighted_g = alpha[k] * d, alpha[k] * g[k]
        update = weighted_d if update is None else update + weighted_d
        combined = weighted_g if combined is None else combined + weighted_g
    assert update is not None and combined is not None
    e = -combined if maximize else combined
    if l2 != 0.0:
        e = e + l2 * theta
    # New values copied in rather than chained in-place updates: every output is then a pointwise
    # function of the old values, computed in one loop.
    new_v = v * beta2 + e * e * one_minus_beta2
    new_theta = theta * decay + update if decay != 1.0 else theta + update
    m.copy_(m + (e - m) * one_minus_beta1)
    if vmax is not None:
        vmax.copy_(torch.maximum(vmax, new_v))
    v.copy_(new_v)
    theta.copy_(new_theta)


def _gram_many(items: list[tuple[Any, ...]]) -> Tensor:
    total = _gram_kernel(*items[0])
    for item in items[1:]:
        total = total + _gram_kernel(*item)
    return total


def _apply_many(items: list[tuple[Any, ...]]) -> None:
    for item in items:
        _apply_kernel(*item)


def _compiled(
    name: str, fn: Callable[..., Any], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    with _LOCK:
        kernel = _KERNELS.get(name)
        if kernel is None:
            kernel = torch.compile(fn, dynamic=True, options=options)
            _KERNELS[name] = kernel
    return kernel


def buckets(count: int) -> list[range]:
    """How :func:`adam_gram` and :func:`adam_apply` split ``count`` parameters into calls."""
    return [range(lo, min(lo + BUCKET, count)) for lo in range(0, count, BUCKET)]


def adam_gram(items: Sequence[tuple[Any, ...]]) -> Tensor:
    """Packed upper triangle (row-major, float64) of the Gram matrix of the updates, summed over
    the parameters. One item per parameter: ``(g [K, n], exp_avg, exp_avg_sq, max_exp_avg_sq or
    None, param, *AdamTransform.fused_operands(ctx)[4:])``, the state and parameter flat."""
    kernel = _compiled("gram", _gram_many, _RECOMPUTE_OPTIONS)
    total: Tensor | None = None
    for part in buckets(len(items)):
        packed = kernel([items[i] for i in part])
        total = packed if total is None else total + packed
    if total is None:
        raise ValueError("adam_gram: no parameters")
    return total


def adam_apply(items: Sequence[tuple[Any, ...]]) -> None:
    """Weighted update and state advance of the parameters, in place. One item per parameter:
    ``(g [K, n], exp_avg, exp_avg_sq, max_exp_avg_sq or None, param, alpha [K], *scalars,
    1 - beta1, decay)`` with the scalars of :func:`adam_gram`'s item (K = 1 and ``alpha = [1]``
    is the plain Adam step). Calls are per :func:`buckets`; a call that fails (to compile)
    leaves its parameters untouched."""
    kernel = _compiled("apply", _apply_many, _RECOMPUTE_OPTIONS)
    for part in buckets(len(items)):
        kernel([items[i] for i in part])


def unpack_gram(packed: Tensor, k: int) -> Tensor:
    """The symmetric ``K x K`` matrix from :func:`adam_gram`'s packed upper triangle."""
    rows, cols = torch.triu_indices(k, k, device=packed.device)
    gram = packed.new_zeros((k, k))
    gram[rows, cols] = packed
    gram[cols, rows] = packed
    return gram
