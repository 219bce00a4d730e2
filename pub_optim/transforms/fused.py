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

With one optimizer state per task (``PUB(state="per_task")``, the idea of AdaTask: Yang et al.,
AAAI 2023), :func:`per_task_gram` and :func:`per_task_apply` are the same two loops with task
``k``'s update ``d_k = T(g_k; S_k)`` read from its own state: the Gram kernel also reduces each
task's drift ``d0_k = T(0; S_k)`` into the marginal matrix ``[<d_i - d0_i, d_j - d0_j>]``,
``<d_k, d0_k>`` and ``||d0_k||^2`` when asked, and the apply kernel advances every ``S_k`` with
its own ``g_k`` after forming ``sum_k alpha_k d_k``. They need the K states of a parameter to
share their constants (:func:`equal_constants`: the same step count).

:func:`batch` (:func:`batch_per_task`) groups one step's parameters into kernel calls: one per
large tensor, one for all the small tensors with equal hyper-parameters concatenated (a compiled
call costs ~0.1 ms of guard evaluation, more than a bias's whole work);
:meth:`FusedItem.write_back` (:meth:`PerTaskItem.write_back`) returns their state.

Same formulas as the eager transform (the test suite compares them); rounding may differ in the
last bits. The first call per specialisation (K, option flags, dtype, device: see :func:`_kernel`)
compiles (seconds); later calls reuse the kernel for any tensor size.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Sequence
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


#: Positions in the constants tensor the kernels take (one tensor, not eight Python floats: each
#: float argument of a compiled call becomes a 0-d tensor at every call, ~15 us apiece).
COEF_M, COEF_G, BETA2, ONE_MINUS_BETA2, EPS_C, L2, ONE_MINUS_BETA1, DECAY = range(8)


def _updates(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    theta: Tensor,
    c: Tensor,
    has_l2: bool,
    maximize: bool,
) -> Tensor:
    """``d_k`` for task ``k``'s gradient ``g`` (``[n]``; see ``AdamTransform.lookahead`` for the
    folded constants; ``c`` holds them, 0-d entries that do not promote ``g``'s dtype)."""
    e = -g if maximize else g
    if has_l2:
        e = e + c[L2] * theta
    num = m * c[COEF_M] + e * c[COEF_G]
    den = v * c[BETA2] + e * e * c[ONE_MINUS_BETA2]
    if vmax is not None:
        den = torch.maximum(den, vmax)
    return num / (torch.sqrt(den) + c[EPS_C])


def _gram_kernel(
    g: Sequence[Tensor],
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    theta: Tensor,
    c: Tensor,
    has_l2: bool,
    maximize: bool,
) -> Tensor:
    d = [_updates(row, m, v, vmax, theta, c, has_l2, maximize).double() for row in g]
    k = len(d)
    return torch.stack([(d[i] * d[j]).sum() for i in range(k) for j in range(i, k)])


def _apply_kernel(
    g: Sequence[Tensor],
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    theta: Tensor,
    alpha: Tensor,
    c: Tensor,
    has_l2: bool,
    maximize: bool,
    has_decay: bool,
) -> None:
    # The sums over tasks are unrolled (K is fixed per compiled copy, see _kernel): written as
    # ``(alpha[:, None] * d).sum(0)`` over a ``[K, n]`` block, Inductor makes them a reduction
    # loop of their own and materialises ``u`` and ``g*`` (two more passes over n); unrolled, the
    # whole step is one elementwise loop (2-3x faster at K = 2 on CPU, bit-identical).
    update: Tensor | None = None
    combined: Tensor | None = None
    for k, row in enumerate(g):
        d = _updates(row, m, v, vmax, theta, c, has_l2, maximize)
        update = alpha[k] * d if update is None else update + alpha[k] * d
        combined = alpha[k] * row if combined is None else combined + alpha[k] * row
    assert update is not None and combined is not None
    e = -combined if maximize else combined
    if has_l2:
        e = e + c[L2] * theta
    m.add_((e - m) * c[ONE_MINUS_BETA1])  # lerp
    v.mul_(c[BETA2]).add_(e * e * c[ONE_MINUS_BETA2])
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
    if has_decay:
        theta.mul_(c[DECAY])
    theta.add_(update)


def _per_task_gram_kernel(
    g: Sequence[Tensor],
    m: Sequence[Tensor],
    v: Sequence[Tensor],
    vmax: Sequence[Tensor] | None,
    theta: Tensor,
    c: Tensor,
    has_l2: bool,
    maximize: bool,
    lookahead: bool,
    drift: bool,
) -> Tensor:
    # Task k looks ahead from its own state: d_k = T(g_k; S_k), d0_k = T(0; S_k). The marginal
    # rows d_k - d0_k are formed in the parameter's dtype (as the eager pass does), so a task
    # with a zero gradient has an exactly zero row.
    k = len(g)
    d = [
        _updates(g[j], m[j], v[j], None if vmax is None else vmax[j], theta, c, has_l2, maximize)
        for j in range(k)
    ]
    sums: list[Tensor] = []
    if lookahead:
        dd = [row.double() for row in d]
        sums += [(dd[i] * dd[j]).sum() for i in range(k) for j in range(i, k)]
    if drift:
        zero = torch.zeros_like(g[0])
        d0 = [
            _updates(zero, m[j], v[j], None if vmax is None else vmax[j], theta, c, has_l2,
                     maximize)
            for j in range(k)
        ]  # fmt: skip
        e = [(d[j] - d0[j]).double() for j in range(k)]
        sums += [(e[i] * e[j]).sum() for i in range(k) for j in range(i, k)]
        sums += [(d[j].double() * d0[j].double()).sum() for j in range(k)]
        sums += [(d0[j].double() * d0[j].double()).sum() for j in range(k)]
    return torch.stack(sums)


def _per_task_apply_kernel(
    g: Sequence[Tensor],
    m: Sequence[Tensor],
    v: Sequence[Tensor],
    vmax: Sequence[Tensor] | None,
    theta: Tensor,
    alpha: Tensor,
    c: Tensor,
    has_l2: bool,
    maximize: bool,
    has_decay: bool,
) -> None:
    # u = sum_k alpha_k T(g_k; S_k) from the states before they move (unrolled, as in
    # _apply_kernel), then each S_k advanced with its own g_k (L2 decay reads theta before it
    # changes), then theta.
    update: Tensor | None = None
    for j, row in enumerate(g):
        vmax_j = None if vmax is None else vmax[j]
        d = _updates(row, m[j], v[j], vmax_j, theta, c, has_l2, maximize)
        update = alpha[j] * d if update is None else update + alpha[j] * d
    assert update is not None
    for j, row in enumerate(g):
        e = -row if maximize else row
        if has_l2:
            e = e + c[L2] * theta
        m[j].add_((e - m[j]) * c[ONE_MINUS_BETA1])  # lerp
        v[j].mul_(c[BETA2]).add_(e * e * c[ONE_MINUS_BETA2])
        if vmax is not None:
            torch.maximum(vmax[j], v[j], out=vmax[j])
    if has_decay:
        theta.mul_(c[DECAY])
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
    specialisation its own budget; sizes and the per-step constants stay dynamic (the constants
    are tensor data), so each copy compiles once.
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

    def constants(self) -> tuple[float, ...]:
        """The eight constants, in the order of ``COEF_M`` ... ``DECAY``."""
        return (
            self.coef_m,
            self.coef_g,
            self.beta2,
            self.one_minus_beta2,
            self.eps_c,
            self.l2,
            self.one_minus_beta1,
            self.decay,
        )

    def constants_tensor(self) -> Tensor:
        """:meth:`constants` as the kernels take them: float64 for float64 parameters, else
        float32 (the precision torch's own ops compute low-precision tensors in)."""
        dtype = torch.float64 if self.theta.dtype == torch.float64 else torch.float32
        return torch.tensor(self.constants(), dtype=dtype, device=self.theta.device)

    def batch_key(self) -> tuple[Any, ...]:
        """Parameters with equal keys can share one kernel call (same constants and formats)."""
        return (
            self.constants(),
            self.maximize,
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
        grads: the K per-task gradients, each flat (``[n]``).
        operands: the state (or its concatenated copy) and constants.
        constants: ``operands.constants_tensor()`` (shared by the items of one step).
        indices: positions of the parameters it holds in the list given to :func:`batch`.
        sources: for a concatenated item, each member's own operands, in order.
    """

    grads: list[Tensor]
    operands: AdamOperands
    constants: Tensor
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


def batch(
    grads: Sequence[Sequence[Tensor]], operands: list[AdamOperands], min_values: int
) -> list[FusedItem]:
    """One item per parameter with at least ``min_values`` values per task; the smaller ones
    concatenated, one item per :meth:`AdamOperands.batch_key` (a kernel call costs ~0.1 ms of
    guards, more than a bias's whole work). ``grads``: per parameter, its K per-task gradients
    (any shape; they are read as flat rows, without a copy where they are contiguous)."""
    items: list[FusedItem] = []
    small: dict[tuple[Any, ...], list[int]] = {}
    tensors: dict[tuple[Any, ...], Tensor] = {}
    rows = [[g.reshape(-1) for g in per_task] for per_task in grads]

    def constants(ops: AdamOperands) -> Tensor:
        key = (ops.constants(), ops.theta.dtype == torch.float64, ops.theta.device)
        if key not in tensors:
            tensors[key] = ops.constants_tensor()
        return tensors[key]

    for i, (g, ops) in enumerate(zip(rows, operands, strict=True)):
        if g[0].numel() >= min_values:
            items.append(FusedItem(g, ops, constants(ops), [i]))
        else:
            small.setdefault(ops.batch_key(), []).append(i)
    for indices in small.values():
        first = operands[indices[0]]
        if len(indices) == 1:
            items.append(FusedItem(rows[indices[0]], first, constants(first), indices))
            continue
        sources = [operands[i] for i in indices]

        def cat(name: str, members: list[AdamOperands] = sources) -> Tensor:
            return torch.cat([getattr(member, name) for member in members])

        joined = replace(
            first,
            m=cat("m"),
            v=cat("v"),
            vmax=None if first.vmax is None else cat("vmax"),
            theta=cat("theta"),
        )
        num_tasks = len(rows[indices[0]])
        grads_joined = [torch.cat([rows[i][k] for i in indices]) for k in range(num_tasks)]
        items.append(FusedItem(grads_joined, joined, constants(first), indices, sources))
    return items


@dataclass
class PerTaskItem:
    """One kernel call of the per-task kernels (``PUB(state="per_task")``): as
    :class:`FusedItem`, with one :class:`AdamOperands` per task (task ``k``'s own state, all on
    the same parameter and with equal constants).

    Attributes:
        grads: the K per-task gradients, each flat (``[n]``).
        operands: per task, its state (or the concatenated copy) and the constants; the
            ``theta`` of every task is the same tensor.
        constants: ``operands[0].constants_tensor()``.
        indices: positions of the parameters it holds in the list given to
            :func:`batch_per_task`.
        sources: for a concatenated item, per member parameter its K operands, in order.
    """

    grads: list[Tensor]
    operands: list[AdamOperands]
    constants: Tensor
    indices: list[int]
    sources: list[list[AdamOperands]] = field(default_factory=list)

    def write_back(self) -> None:
        """Copy the advanced states and parameters of a concatenated item back to its members."""
        if not self.sources:
            return
        sizes = [members[0].theta.numel() for members in self.sources]
        targets: list[Tensor] = []
        values: list[Tensor] = []
        for k, packed in enumerate(self.operands):
            for name in ("m", "v", "vmax") if k else ("m", "v", "vmax", "theta"):
                joined = getattr(packed, name)
                if joined is None:
                    continue
                targets += [getattr(members[k], name) for members in self.sources]
                values += list(joined.split(sizes))
        torch._foreach_copy_(targets, values)


def equal_constants(operands: Sequence[AdamOperands]) -> bool:
    """Whether the K per-task operands of one parameter can share one kernel call: the same
    constants (step count, hyper-parameters) and formats."""
    first = operands[0].batch_key()
    return all(ops.batch_key() == first for ops in operands[1:])


def batch_per_task(
    grads: Sequence[Sequence[Tensor]], operands: list[list[AdamOperands]], min_values: int
) -> list[PerTaskItem]:
    """:func:`batch` for the per-task kernels: ``operands[i]`` holds parameter ``i``'s K
    per-task operands (:func:`equal_constants` must hold for each)."""
    items: list[PerTaskItem] = []
    small: dict[tuple[Any, ...], list[int]] = {}
    tensors: dict[tuple[Any, ...], Tensor] = {}
    rows = [[g.reshape(-1) for g in per_task] for per_task in grads]

    def constants(ops: AdamOperands) -> Tensor:
        key = (ops.constants(), ops.theta.dtype == torch.float64, ops.theta.device)
        if key not in tensors:
            tensors[key] = ops.constants_tensor()
        return tensors[key]

    for i, (g, ops) in enumerate(zip(rows, operands, strict=True)):
        if g[0].numel() >= min_values:
            items.append(PerTaskItem(g, list(ops), constants(ops[0]), [i]))
        else:
            small.setdefault(ops[0].batch_key(), []).append(i)
    for indices in small.values():
        first = operands[indices[0]]
        if len(indices) == 1:
            items.append(PerTaskItem(rows[indices[0]], list(first), constants(first[0]), indices))
            continue
        sources = [list(operands[i]) for i in indices]
        theta = torch.cat([members[0].theta for members in sources])

        def cat(name: str, k: int, members: list[list[AdamOperands]] = sources) -> Tensor:
            return torch.cat([getattr(member[k], name) for member in members])

        joined = [
            replace(
                ops,
                m=cat("m", k),
                v=cat("v", k),
                vmax=None if ops.vmax is None else cat("vmax", k),
                theta=theta,
            )
            for k, ops in enumerate(first)
        ]
        num_tasks = len(rows[indices[0]])
        grads_joined = [torch.cat([rows[i][k] for i in indices]) for k in range(num_tasks)]
        items.append(PerTaskItem(grads_joined, joined, constants(first[0]), indices, sources))
    return items


def _as_rows(grads: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A ``[K, n]`` block as its K rows; K separate tensors as they are."""
    return list(grads.unbind(0)) if isinstance(grads, Tensor) else list(grads)


def adam_gram(
    grads: Tensor | Sequence[Tensor], operands: AdamOperands, constants: Tensor | None = None
) -> Tensor:
    """Packed upper triangle (row-major, float64) of the Gram matrix of one item's updates
    (``grads``: ``[K, n]``, or K tensors of ``n`` values; ``constants``:
    ``operands.constants_tensor()``, built if omitted)."""
    rows = _as_rows(grads)
    kernel = _kernel("gram", _gram_kernel, operands.specialisation(len(rows)), _RECOMPUTE_OPTIONS)
    if constants is None:
        constants = operands.constants_tensor()
    return kernel(rows, *operands.tensors(), constants, operands.l2 != 0.0, operands.maximize)


def unpack_gram(packed: Tensor, k: int) -> Tensor:
    """The symmetric ``K x K`` matrix from :func:`adam_gram`'s packed upper triangle."""
    rows, cols = torch.triu_indices(k, k, device=packed.device)
    gram = packed.new_zeros((k, k))
    gram[rows, cols] = packed
    gram[cols, rows] = packed
    return gram


def adam_apply(
    grads: Tensor | Sequence[Tensor],
    alpha: Tensor,
    operands: AdamOperands,
    constants: Tensor | None = None,
) -> None:
    """Weighted update and state advance of one item, in place (``grads`` as in
    :func:`adam_gram`; ``alpha``: ``[K]``, the dtype of ``grads``; ``constants`` as in
    :func:`adam_gram`)."""
    rows = _as_rows(grads)
    kernel = _kernel("apply", _apply_kernel, operands.specialisation(len(rows)))
    if constants is None:
        constants = operands.constants_tensor()
    m, v, vmax, theta = operands.tensors()
    kernel(
        rows,
        m,
        v,
        vmax,
        theta,
        alpha,
        constants,
        operands.l2 != 0.0,
        operands.maximize,
        operands.decay != 1.0,
    )


def _per_task_tensors(
    operands: Sequence[AdamOperands],
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, Tensor]:
    vmax = [ops.vmax for ops in operands if ops.vmax is not None]
    return (
        [ops.m for ops in operands],
        [ops.v for ops in operands],
        vmax if len(vmax) == len(operands) else None,
        operands[0].theta,
    )


def per_task_gram(
    grads: Tensor | Sequence[Tensor],
    operands: Sequence[AdamOperands],
    constants: Tensor | None = None,
    *,
    lookahead: bool = True,
    drift: bool = False,
) -> Tensor:
    """One item's sums over its values, in float64, with task ``k``'s update
    ``d_k = T(g_k; S_k)`` from its own operands ``operands[k]`` (equal constants): the packed
    upper triangle of ``[<d_i, d_j>]`` if ``lookahead``, then, if ``drift``, with
    ``d0_k = T(0; S_k)``, the triangle of ``[<d_i - d0_i, d_j - d0_j>]``, ``<d_k, d0_k>`` and
    ``||d0_k||^2`` (K each). :func:`split_per_task_gram` reads them."""
    rows = _as_rows(grads)
    first = operands[0]
    key = (
        "pertask",
        *first.specialisation(len(rows)),
        "lookahead" if lookahead else "nolookahead",
        "drift" if drift else "nodrift",
    )
    kernel = _kernel("gram", _per_task_gram_kernel, key, _RECOMPUTE_OPTIONS)
    if constants is None:
        constants = first.constants_tensor()
    return kernel(
        rows,
        *_per_task_tensors(operands),
        constants,
        first.l2 != 0.0,
        first.maximize,
        lookahead,
        drift,
    )


def split_per_task_gram(
    packed: Tensor, k: int, lookahead: bool, drift: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`per_task_gram`'s result as (look-ahead Gram, marginal Gram, ``<d_k, d0_k>``,
    ``||d0_k||^2``); ``None`` for what was not computed."""
    tri = k * (k + 1) // 2
    at = 0
    gram = marginal = dots = sq = None
    if lookahead:
        gram = unpack_gram(packed[:tri], k)
        at = tri
    if drift:
        marginal = unpack_gram(packed[at : at + tri], k)
        dots = packed[at + tri : at + tri + k].clone()
        sq = packed[at + tri + k : at + tri + 2 * k].clone()
    return gram, marginal, dots, sq


def per_task_apply(
    grads: Tensor | Sequence[Tensor],
    alpha: Tensor,
    operands: Sequence[AdamOperands],
    constants: Tensor | None = None,
) -> None:
    """``theta <- decay * theta + sum_k alpha_k T(g_k; S_k)`` and each ``S_k`` advanced with its
    own ``g_k``, in place (``grads``, ``alpha``, ``constants`` as in :func:`adam_apply`;
    ``operands`` as in :func:`per_task_gram`)."""
    rows = _as_rows(grads)
    first = operands[0]
    key = ("pertask", *first.specialisation(len(rows)))
    kernel = _kernel("apply", _per_task_apply_kernel, key)
    if constants is None:
        constants = first.constants_tensor()
    kernel(
        rows,
        *_per_task_tensors(operands),
        alpha,
        constants,
        first.l2 != 0.0,
        first.maximize,
        first.decay != 1.0,
    )
