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
updates ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) and the parameter in place.

:func:`batch` groups one step's parameters into kernel calls: one per large tensor, one for all
the small tensors with equal hyper-parameters concatenated (a compiled call costs ~0.1 ms of guard
evaluation, more than a bias's whole work); :meth:`FusedItem.write_back` returns their state.

Same formulas as the eager transform (the test suite compares them); rounding may differ in the
last bits. The first call per specialisation (K, option flags, dtype, device: see :func:`_kernel`)
compiles (seconds); later calls reuse the kernel for any tensor size.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

_LOCK = threading.Lock()
_KERNELS: dict[tuple[Any, ...], Callable[..., Any]] = {}

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


def _kernel(
    name: str, fn: Callable[..., Any], key: tuple[Any, ...], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """The compiled ``fn`` for one specialisation ``key``, with a code object of its own.

    Dynamo keeps its compiled graphs on the function's code object and gives each code object at
    most ``torch._dynamo.config.recompile_limit`` (8) of them; past that it silently runs the
    function eagerly (here: K x n temporaries and the eager speed). The Gram kernel specialises on
    K (one reduction per pair) and both kernels on the flags below, so one process that trains
    several models could reach the limit. A copy of the code object per key gives every
    specialisation its own budget; sizes and the per-step constants stay dynamic (floats are not
    specialised), so each copy compiles once.
    """
    cache_key = (name, *key)
    with _LOCK:
        kernel = _KERNELS.get(cache_key)
        if kernel is None:
            tag = "_".join(str(part).replace(".", "_") for part in key)
            code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
            copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
            kernel = torch.compile(copy, dynamic=True, options=options)
            _KERNELS[cache_key] = kernel
    return kernel


@dataclass(frozen=True)
class AdamOperands:
    """One parameter's (flat) Adam state and this step's folded constants, as the kernels take
    them (see ``AdamTransform.lookahead`` for the folding)."""

    m: Tensor
    v: Tensor
    vmax: Tensor | None
    theta: Tensor
    coef_m: float
    coef_g: float
    beta2: float
    one_minus_beta2: float
    eps_c: float
    l2: float
    maximize: bool
    one_minus_beta1: float
    decay: float

    def tensors(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        return self.m, self.v, self.vmax, self.theta

    def constants(self) -> tuple[float, float, float, float, float, float, bool]:
        """The look-ahead constants (the Gram kernel's trailing arguments)."""
        return (
            self.coef_m,
            self.coef_g,
            self.beta2,
            self.one_minus_beta2,
            self.eps_c,
            self.l2,
            self.maximize,
        )

    def batch_key(self) -> tuple[Any, ...]:
        """Parameters with equal keys can share one kernel call (same constants and formats)."""
        return (
            self.constants(),
            self.one_minus_beta1,
            self.decay,
            self.vmax is None,
            self.theta.dtype,
            self.theta.device,
        )

    def specialisation(self, k: int) -> tuple[Any, ...]:
        """What the compiled kernels specialise on (see :func:`_kernel`)."""
        return (
            f"k{k}",
            "amsgrad" if self.vmax is not None else "adam",
            "max" if self.maximize else "min",
            "l2" if self.l2 != 0.0 else "nol2",
            "decay" if self.decay != 1.0 else "nodecay",
            str(self.theta.dtype).removeprefix("torch."),
            self.theta.device.type,
        )


@dataclass
class FusedItem:
    """One kernel call's worth of parameters: a single large one, or several small ones
    concatenated (one call instead of one per bias; :meth:`write_back` returns their state).

    Attributes:
        grads: ``[K, n]`` per-task gradients.
        operands: the state (or its concatenated copy) and constants.
        indices: positions of the parameters it holds in the list given to :func:`batch`.
        sources: for a concatenated item, each member's own operands, in order.
    """

    grads: Tensor
    operands: AdamOperands
    indices: list[int]
    sources: list[AdamOperands] = field(default_factory=list)

    def write_back(self) -> None:
        """Copy the advanced state and parameters of a concatenated item back to its members."""
        if not self.sources:
            return
        sizes = [source.theta.numel() for source in self.sources]
        for name in ("m", "v", "vmax", "theta"):
            packed = getattr(self.operands, name)
            if packed is None:
                continue
            targets = [getattr(source, name) for source in self.sources]
            torch._foreach_copy_(targets, list(packed.split(sizes)))


def batch(grads: list[Tensor], operands: list[AdamOperands], min_values: int) -> list[FusedItem]:
    """One item per parameter with at least ``min_values`` values per task; the smaller ones
    concatenated, one item per :meth:`AdamOperands.batch_key` (a kernel call costs ~0.1 ms of
    guards, more than a bias's whole work)."""
    items: list[FusedItem] = []
    small: dict[tuple[Any, ...], list[int]] = {}
    for i, (g, ops) in enumerate(zip(grads, operands, strict=True)):
        if g.shape[1] >= min_values:
            items.append(FusedItem(g, ops, [i]))
        else:
            small.setdefault(ops.batch_key(), []).append(i)
    for indices in small.values():
        if len(indices) == 1:
            items.append(FusedItem(grads[indices[0]], operands[indices[0]], indices))
            continue
        sources = [operands[i] for i in indices]
        first = sources[0]

        def cat(name: str, members: list[AdamOperands] = sources) -> Tensor:
            return torch.cat([getattr(member, name) for member in members])

        joined = replace(
            first,
            m=cat("m"),
            v=cat("v"),
            vmax=None if first.vmax is None else cat("vmax"),
            theta=cat("theta"),
        )
        items.append(FusedItem(torch.cat([grads[i] for i in indices], 1), joined, indices, sources))
    return items


def adam_gram(grads: Tensor, operands: AdamOperands) -> Tensor:
    """Packed upper triangle (row-major, float64) of the Gram matrix of one item's updates
    (``grads``: ``[K, n]``)."""
    kernel = _kernel(
        "gram", _gram_kernel, operands.specialisation(grads.shape[0]), _RECOMPUTE_OPTIONS
    )
    return kernel(grads, *operands.tensors(), *operands.constants())


def unpack_gram(packed: Tensor, k: int) -> Tensor:
    """The symmetric ``K x K`` matrix from :func:`adam_gram`'s packed upper triangle."""
    rows, cols = torch.triu_indices(k, k, device=packed.device)
    gram = packed.new_zeros((k, k))
    gram[rows, cols] = packed
    gram[cols, rows] = packed
    return gram


def adam_apply(grads: Tensor, alpha: Tensor, operands: AdamOperands) -> None:
    """Weighted update and state advance of one item, in place (``alpha``: ``[K]``, the dtype
    of ``grads``)."""
    kernel = _kernel("apply", _apply_kernel, operands.specialisation(grads.shape[0]))
    m, v, vmax, theta = operands.tensors()
    kernel(
        grads,
        m,
        v,
        vmax,
        theta,
        alpha,
        *operands.constants(),
        operands.one_minus_beta1,
        operands.decay,
    )
