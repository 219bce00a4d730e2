"""The elementwise work of one balanced step with an exact look-ahead transform.

Yuan, Cai, Dong, arXiv:2410.05806, steps 2-6: over the shared parameters' per-task gradients
(:class:`TaskGrads`), the Gram matrices of one pass (:class:`StepGrams`: the look-ahead updates
``d_k``, their task-attributable parts ``d_k - d_0``, the gradients), then the weighted update and
the state advance. The two axes of :class:`pub_optim.PUB` meet here and nowhere else:

* *which state each look-ahead reads* (``state``): one context per parameter (the shared state), or
  one per task and parameter (``state="per_task"``: task ``k`` looks ahead from, and advances, its
  own state; the parameter is updated once);
* *which Gram matrix the strategy sees* (``space``): see :mod:`pub_optim.spaces`.

Eager, in cache-sized column blocks, for every transform; compiled
(:mod:`pub_optim.transforms.fused`) for Adam/AdamW when ``fused`` allows it (with the shared state
the drift ``d_0`` is a phantom task with a zero gradient; with one state per task the per-task
kernels compute each task's ``d_k`` and drift from its own state, when all tasks' states have the
same step count), falling back to the eager path with a warning if a kernel fails.
:class:`pub_optim.PUB` owns one engine and decides what to solve and when.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from .rowsparse.untouched import row_context, scatter_back
from .spaces import Space, StepGrams, marginal_from_augmented
from .transforms import UpdateTransform
from .transforms import fused as kernels
from .transforms.base import ParamContext
from .transforms.fused import FusedItem, PerTaskItem

#: Column chunk of the elementwise work on CPU: the ``K x chunk`` temporaries stay in cache.
DEFAULT_CPU_CHUNK = 1 << 16
#: ``fused=None`` compiles the Adam kernels once the per-task values of a step reach this count.
FUSED_AUTO_MIN_VALUES = 1 << 20
#: On the fused path, tensors with fewer values per task than this are concatenated (one kernel
#: call per set of equal hyper-parameters instead of one per bias).
FUSED_MIN_TENSOR = 1 << 14


class TaskGrads:
    """The per-task gradients of one step's shared parameters, as the engine reads them.

    Per parameter: one ``[K, *shape]`` buffer, or the K tensors that autograd returned, kept as
    they are (the compiled kernels read them in place, so :meth:`pub_optim.PUB.backward` copies
    nothing). :meth:`stacked` builds the buffer on demand, for the eager blocks.
    """

    def __init__(self, parts: Sequence[Tensor | Sequence[Tensor]]) -> None:
        self._parts: list[Tensor | Sequence[Tensor]] = list(parts)

    def __len__(self) -> int:
        return len(self._parts)

    def rows(self, i: int) -> Sequence[Tensor]:
        """Parameter ``i``'s K per-task gradients (views of the rows of a buffer)."""
        part = self._parts[i]
        return part.unbind(0) if isinstance(part, Tensor) else part

    def stacked(self, i: int) -> Tensor:
        """Parameter ``i``'s ``[K, *shape]`` buffer (stacked once, on the first call)."""
        part = self._parts[i]
        if not isinstance(part, Tensor):
            part = torch.stack(list(part))
            self._parts[i] = part
        return part

    def all_stacked(self, indices: Sequence[int] | None = None) -> list[Tensor]:
        """:meth:`stacked` of the given parameters (default: all)."""
        return [self.stacked(i) for i in (range(len(self)) if indices is None else indices)]


#: Per shared parameter: its one context (the shared state) or one per task (``per_task``).
Contexts = Sequence[ParamContext]
#: One step's compiled kernel calls: shared-state items, or per-task items (``per_task``).
Items = list[FusedItem] | list[PerTaskItem]


@dataclass
class _Wanted:
    """Which matrices a Gram pass accumulates."""

    lookahead: bool
    marginal: bool
    gradient: bool
    drift: bool


class ExactStepEngine:
    """Gram matrices and weighted apply over the per-task gradients, for one transform.

    Args:
        transform: the wrapped optimizer's exact look-ahead transform.
        space: ``"update"``, ``"marginal"`` or ``"gradient"`` (:mod:`pub_optim.spaces`).
        chunk_size: columns per eager block (``None``: 65536 on CPU, whole tensors elsewhere).
        fused: as :class:`pub_optim.PUB`'s ``fused`` argument.
        per_task: one state per task (the contexts of each parameter are per task).
        diagnostics: also accumulate the matrices the strategy does not see (gradients, look-ahead
            updates, drift), for :class:`pub_optim.BalanceStats`.

    Attributes:
        fused_failed: a compiled kernel failed once; every later step is eager.
        untouched_rows: on the eager path with the shared state, a table (2-D or more, at least
            ``UNTOUCHED_MIN_ROWS`` rows) whose rows reached by any task's gradient are at most
            ``UNTOUCHED_MAX_SHARE`` of its rows takes its untouched rows once, not once per task:
            their look-ahead is the drift ``d_0`` for every task, so they add ``||d_0||^2`` to
            every entry of the update-space Gram matrix (nothing to the marginal one) and receive
            ``(sum_k alpha_k) d_0``. Equal to the full computation to rounding (default on).
    """

    def __init__(
        self,
        transform: UpdateTransform,
        space: Space,
        chunk_size: int | None,
        fused: bool | None,
        *,
        per_task: bool = False,
        diagnostics: bool = False,
    ) -> None:
        self.transform = transform
        self.space = space
        self.chunk_size = chunk_size
        self.fused = fused
        self.per_task = per_task
        self.diagnostics = diagnostics
        self.fused_failed = False
        self.untouched_rows = True
        # The eager blocks' scratch, kept for the length of one pass (see _scratch).
        self._buffers: dict[str, Tensor] = {}
        # Tables whose untouched rows the eager passes take once (see _table), by context id,
        # from the Gram pass to the apply pass of one step.
        self._tables: dict[int, _Table] = {}

    def _wanted(self) -> _Wanted:
        looks = self.space != "gradient"
        extra = self.diagnostics
        return _Wanted(
            lookahead=self.space == "update" or (extra and looks),
            marginal=self.space == "marginal" or (extra and looks),
            gradient=self.space == "gradient" or extra,
            drift=self.space == "marginal" or (extra and looks),
        )

    def fused_enabled(self, params: Sequence[Tensor], num_tasks: int) -> bool:
        """Whether a step over these shared parameters with ``num_tasks`` tasks runs the compiled
        kernels (with ``per_task``, :meth:`fused_items` may still choose the eager path: the
        per-task kernels need equal step counts)."""
        if self.fused is False or self.fused_failed or self.space == "gradient":
            return False
        if not hasattr(self.transform, "fused_operands") or not params:
            return False
        if self.fused is None:
            if any(p.device.type != "cpu" for p in params):
                return False
            return num_tasks * sum(p.numel() for p in params) >= FUSED_AUTO_MIN_VALUES
        return True

    def fused_items(self, contexts: Sequence[Contexts], task_grads: TaskGrads) -> Items | None:
        """The compiled kernels' calls of this step (``None``: the eager path). With the shared
        state and the drift wanted, each item carries one more row: a zero gradient, whose update
        is ``d_0``. With one state per task: per-task items, or ``None`` when the tasks' states
        of a parameter differ in their constants (their step counts)."""
        if not len(task_grads):
            return None
        rows = [list(task_grads.rows(i)) for i in range(len(task_grads))]
        if not self.fused_enabled([r[0] for r in rows], len(rows[0])):
            return None
        transform: Any = self.transform
        if self.per_task:
            operands = [[transform.fused_operands(ctx) for ctx in ctxs] for ctxs in contexts]
            if not all(kernels.equal_constants(ops) for ops in operands):
                return None
            return kernels.batch_per_task(rows, operands, FUSED_MIN_TENSOR)
        if self._wanted().drift:
            rows = [[*r, torch.zeros_like(r[0])] for r in rows]
        return kernels.batch(
            rows, [transform.fused_operands(ctx[0]) for ctx in contexts], FUSED_MIN_TENSOR
        )

    def gram(
        self,
        contexts: Sequence[Contexts],
        task_grads: TaskGrads,
        k: int,
        items: Items | None = None,
    ) -> StepGrams:
        """The Gram matrices of this step in float64: the compiled kernel over ``items`` when given
        (and working), else eager cache-sized blocks, each a look-ahead into a ``K x chunk``
        scratch and float32 matrix products added into the matrices."""
        device = task_grads.rows(0)[0].device if len(task_grads) else torch.device("cpu")
        want = self._wanted()
        if items is not None:
            fused = (
                self._gram_fused_per_task(cast(list[PerTaskItem], items), k, device, want)
                if self.per_task
                else self._gram_fused(cast(list[FusedItem], items), k, device, want)
            )
            if fused is not None:
                if want.gradient:
                    fused.gradient = _gradient_gram(task_grads, k, device)
                return fused
        return self._gram_eager(contexts, task_grads.all_stacked(), k, device, want)

    def _gram_eager(
        self,
        contexts: Sequence[Contexts],
        buffers: list[Tensor],
        k: int,
        device: torch.device,
        want: _Wanted,
    ) -> StepGrams:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        out = StepGrams(
            space=self.space,
            lookahead=zeros(k, k) if want.lookahead else None,
            marginal=zeros(k, k) if want.marginal else None,
            gradient=zeros(k, k) if want.gradient else None,
            drift_dots=zeros(k) if want.drift else None,
            drift_sq=zeros(k) if want.drift else None,
        )
        looks = want.lookahead or want.marginal
        self._buffers = {}
        self._tables = {}
        for ctxs, buf in zip(contexts, buffers, strict=True):
            table = self._table(ctxs, buf) if looks else None
            if table is not None:
                table.add_grams(out)
                self._tables[id(ctxs[0])] = table
                continue
            flat = buf.view(k, -1)
            chunk = self._chunk(flat)
            for lo in range(0, flat.shape[1], chunk):
                hi = min(lo + chunk, flat.shape[1])
                block = flat[:, lo:hi]
                if out.gradient is not None:
                    out.gradient.add_(torch.mm(block, block.T))
                if not looks:
                    continue
                d = self._lookahead(ctxs, lo, hi, block)
                if out.lookahead is not None:
                    out.lookahead.add_(torch.mm(d, d.T))
                if want.drift:
                    d0 = self._drift(ctxs, lo, hi, block)
                    assert out.drift_dots is not None and out.drift_sq is not None
                    out.drift_dots.add_((d * d0).sum(1, dtype=torch.float64))
                    out.drift_sq.add_((d0 * d0).sum(1, dtype=torch.float64).expand(k))
                    if out.marginal is not None:
                        d.sub_(d0)  # d_k - d_0: exactly zero for a task with a zero gradient
                        out.marginal.add_(torch.mm(d, d.T))
        self._buffers = {}
        return out

    def _table(self, ctxs: Contexts, buf: Tensor) -> _Table | None:
        """The untouched-rows plan of a table (see :attr:`untouched_rows`), or ``None``."""
        if not self.untouched_rows or len(ctxs) != 1 or self.space == "gradient":
            return None
        if buf.dim() < 3 or buf.shape[1] < UNTOUCHED_MIN_ROWS:
            return None
        rows = _touched_rows(buf, self._chunk(buf.view(buf.shape[0], -1)))
        if rows.numel() > UNTOUCHED_MAX_SHARE * buf.shape[1]:
            return None
        return _Table.build(
            self.transform, ctxs[0], buf, rows, self._chunk(buf.view(buf.shape[0], -1))
        )

    def _scratch(self, name: str, rows: int, like: Tensor, zero: bool = False) -> Tensor:
        """A ``[rows, like.shape[1]]`` block of scratch, reused over the blocks of one pass (the
        ``K x chunk`` temporaries stay in cache and nothing is allocated per block)."""
        n = like.shape[1]
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.shape[0] != rows
            or buf.shape[1] < n
        ):
            make = like.new_zeros if zero else like.new_empty
            buf = make((rows, n))
            self._buffers[name] = buf
        return buf[:, :n]

    def _lookahead(self, ctxs: Contexts, lo: int, hi: int, block: Tensor) -> Tensor:
        """``[K, hi - lo]`` look-ahead updates: from the one shared context, or task ``k``'s row
        from task ``k``'s context."""
        out = self._scratch("lookahead", block.shape[0], block)
        if len(ctxs) == 1:
            self.transform.lookahead(ctxs[0], lo, hi, block, out)
        else:
            for j, ctx in enumerate(ctxs):
                self.transform.lookahead(ctx, lo, hi, block[j : j + 1], out[j : j + 1])
        return out

    def _drift(self, ctxs: Contexts, lo: int, hi: int, block: Tensor) -> Tensor:
        """``d_0 = T(0; S)`` on columns ``lo:hi``: ``[1, n]`` (shared state) or ``[K, n]`` (one per
        task's state)."""
        zero = self._scratch("zero", 1, block, zero=True)
        out = self._scratch("drift", len(ctxs), block)
        for j, ctx in enumerate(ctxs):
            self.transform.lookahead(ctx, lo, hi, zero, out[j : j + 1])
        return out

    def _gram_fused(
        self, items: list[FusedItem], k: int, device: torch.device, want: _Wanted
    ) -> StepGrams | None:
        """The compiled kernel's Gram matrix (of ``K + 1`` rows when the drift is wanted);
        ``None`` if the kernel fails, and the eager pass computes the same matrices."""
        rows = k + 1 if want.drift else k
        packed: Tensor | None = None
        for item in items:
            try:
                part = kernels.adam_gram(item.grads, item.operands, item.constants)
            except Exception as exc:
                self._gram_failed(exc)
                return None
            packed = part if packed is None else packed + part
        full = (
            torch.zeros((rows, rows), dtype=torch.float64, device=device)
            if packed is None
            else kernels.unpack_gram(packed, rows)
        )
        if not want.drift:
            return StepGrams(space=self.space, lookahead=full)
        lookahead, marginal, dots, sq = marginal_from_augmented(full)
        return StepGrams(
            space=self.space,
            lookahead=lookahead if want.lookahead else None,
            marginal=marginal,
            drift_dots=dots,
            drift_sq=sq,
        )

    def _gram_failed(self, exc: Exception) -> None:
        warnings.warn(
            f"PUB(fused=...): the fused Adam Gram kernel failed ({exc!r}); using the eager path",
            RuntimeWarning,
            stacklevel=5,
        )
        self.fused_failed = True

    def _gram_fused_per_task(
        self, items: list[PerTaskItem], k: int, device: torch.device, want: _Wanted
    ) -> StepGrams | None:
        """The per-task kernel's matrices (``None`` if it fails, as :meth:`_gram_fused`)."""
        packed: Tensor | None = None
        for item in items:
            try:
                part = kernels.per_task_gram(
                    item.grads,
                    item.operands,
                    item.constants,
                    lookahead=want.lookahead,
                    drift=want.drift,
                )
            except Exception as exc:
                self._gram_failed(exc)
                return None
            packed = part if packed is None else packed + part
        if packed is None:
            tri = k * (k + 1) // 2
            size = tri * want.lookahead + (tri + 2 * k) * want.drift
            packed = torch.zeros(size, dtype=torch.float64, device=device)
        lookahead, marginal, dots, sq = kernels.split_per_task_gram(
            packed, k, want.lookahead, want.drift
        )
        return StepGrams(
            space=self.space,
            lookahead=lookahead,
            marginal=marginal if want.marginal else None,
            drift_dots=dots,
            drift_sq=sq,
        )

    def apply(
        self,
        contexts: Sequence[Contexts],
        task_grads: TaskGrads,
        weights: Tensor,
        items: Items | None,
        drift_weight: float | Tensor = 0.0,
    ) -> None:
        """``theta <- theta + sum_k alpha_k d_k + drift_weight * d_0`` and the state advanced
        with ``sum_k alpha_k g_k`` (each task's state with its own ``g_k`` under ``per_task``).
        ``items``: from :meth:`fused_items`, ``None`` for the eager path. With one state per
        task, a drift term (weights that do not sum to one in the marginal space) is applied by
        the eager path."""
        with_drift = not (isinstance(drift_weight, float) and drift_weight == 0.0)
        if self.per_task and with_drift:
            items = None
        if items is not None and not self.fused_failed:
            self.apply_fused(contexts, task_grads, weights, items, drift_weight)
        else:
            self.apply_eager(contexts, task_grads.all_stacked(), weights, None, drift_weight)

    def apply_eager(
        self,
        contexts: Sequence[Contexts],
        task_grads: list[Tensor],
        weights: Tensor,
        keep: Tensor | None = None,
        drift_weight: float | Tensor = 0.0,
    ) -> None:
        """The eager apply pass. ``keep``: a 0-d bool tensor; where it is False the parameters and
        their state keep their values (decided on the device: each block's values are saved
        before the commit and selected after it). ``drift_weight``: the weight of ``d_0`` in the
        applied update (``1 - sum_k alpha_k`` in the marginal space; a Python ``0.0`` skips
        it)."""
        with_drift = not (isinstance(drift_weight, float) and drift_weight == 0.0)
        self._buffers = {}
        tables, self._tables = self._tables, {}
        for ctxs, buf in zip(contexts, task_grads, strict=True):
            k = buf.shape[0]
            flat = buf.view(k, -1)
            alpha = weights.to(device=flat.device, dtype=flat.dtype)
            if keep is None:
                table = tables.get(id(ctxs[0]))
                if table is None or table.ctx is not ctxs[0]:  # not from this step's Gram pass
                    table = self._table(ctxs, buf)
                if table is not None:  # untouched rows once, touched rows per task
                    table.apply(alpha, drift_weight)
                    self.transform.finish(ctxs[0])
                    continue
            chunk = self._chunk(flat)
            for lo in range(0, flat.shape[1], chunk):
                hi = min(lo + chunk, flat.shape[1])
                block = flat[:, lo:hi]
                combined = alpha @ block
                if self.space == "gradient":
                    out = self._scratch("combined", 1, block)
                    self.transform.lookahead(ctxs[0], lo, hi, combined.unsqueeze(0), out)
                    update = out[0]
                else:
                    update = alpha @ self._lookahead(ctxs, lo, hi, block)
                    if with_drift:
                        d0 = self._drift(ctxs, lo, hi, block)
                        mix = d0[0] if len(ctxs) == 1 else (alpha / alpha.sum()) @ d0
                        update = update + mix * drift_weight
                if self.per_task:  # one state per task: each advances with its own gradient
                    assert keep is None
                    for j, ctx in enumerate(ctxs):
                        self.transform.advance(ctx, lo, hi, block[j])
                    self.transform.apply_update(ctxs[0], lo, hi, update)
                elif keep is None:
                    self.transform.commit(ctxs[0], lo, hi, combined, update)
                else:
                    self._commit_where(keep, ctxs[0], lo, hi, combined, update)
            for ctx in ctxs:
                self.transform.finish(ctx)
        self._buffers = {}

    def _commit_where(
        self, keep: Tensor, ctx: ParamContext, lo: int, hi: int, grad: Tensor, update: Tensor
    ) -> None:
        """Commit columns ``lo:hi``, then put back their old values where ``keep`` is False."""
        saved = {name: ctx.view(name, lo, hi).clone() for name in ctx.flat}
        self.transform.commit(ctx, lo, hi, grad, update)
        for name, before in saved.items():
            view = ctx.view(name, lo, hi)
            view.copy_(torch.where(keep, view, before))

    def apply_fused(
        self,
        contexts: Sequence[Contexts],
        task_grads: TaskGrads,
        weights: Tensor,
        items: Items,
        drift_weight: float | Tensor = 0.0,
    ) -> None:
        """The compiled apply pass over ``items`` (a parameter whose kernel fails, and every later
        one, takes the eager pass)."""
        calls: list[FusedItem | PerTaskItem] = list(items)
        for n, item in enumerate(calls):
            alpha = weights.to(device=item.grads[0].device, dtype=item.grads[0].dtype)
            if len(item.grads) > alpha.shape[0]:  # the phantom zero-gradient row: d_0
                extra = torch.as_tensor(drift_weight, dtype=alpha.dtype, device=alpha.device)
                alpha = torch.cat([alpha, extra.reshape(1)])
            try:
                if isinstance(item, PerTaskItem):
                    kernels.per_task_apply(item.grads, alpha, item.operands, item.constants)
                else:
                    kernels.adam_apply(item.grads, alpha, item.operands, item.constants)
            except Exception as exc:  # parameters are independent: the rest goes the eager way
                rest = sorted(i for later in calls[n:] for i in later.indices)
                warnings.warn(
                    f"PUB(fused=...): the fused Adam apply kernel failed ({exc!r}); using the "
                    "eager path",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.fused_failed = True
                self.apply_eager(
                    [contexts[j] for j in rest],
                    task_grads.all_stacked(rest),
                    weights,
                    None,
                    drift_weight,
                )
                return
            item.write_back()
            for i in item.indices:
                for ctx in contexts[i]:  # each task's state: its step counter (per_task)
                    self.transform.finish(ctx)

    def _chunk(self, tensor: Tensor) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return DEFAULT_CPU_CHUNK if tensor.device.type == "cpu" else max(1, tensor[0].numel())


def _touched_rows(buf: Tensor, chunk: int) -> Tensor:
    """Sorted indices of the rows (dim 1 of ``[K, rows, ...]``) where some task's gradient is
    not zero, in blocks of about ``chunk`` values per task (no ``K x P`` temporary)."""
    k, n = buf.shape[0], buf.shape[1]
    flat = buf.reshape(k, n, -1)
    block = max(1, chunk // max(1, flat.shape[2]))
    touched = torch.zeros(n, dtype=torch.bool, device=buf.device)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        touched[lo:hi] = flat[:, lo:hi].ne(0).any(2).any(0)
    return touched.nonzero().squeeze(1)


#: See :attr:`ExactStepEngine.untouched_rows`.
UNTOUCHED_MAX_SHARE = 0.25
UNTOUCHED_MIN_ROWS = 1024


@dataclass
class _Table:
    """One step of a table with untouched rows: its touched rows (as a small context over copies
    of them, :func:`pub_optim.rowsparse.row_context`), the tasks' gradients and look-ahead
    updates there, the drift on them, and ``||d_0||^2`` over the untouched rows."""

    transform: UpdateTransform
    ctx: ParamContext
    rows: Tensor
    sub: ParamContext
    values: Tensor  # [K, touched values]
    updates: Tensor  # [K, touched values]
    drift: Tensor  # [1, touched values]
    untouched_sq: Tensor  # 0-d float64
    chunk: int

    @classmethod
    def build(
        cls, transform: UpdateTransform, ctx: ParamContext, buf: Tensor, rows: Tensor, chunk: int
    ) -> _Table:
        k = buf.shape[0]
        sub = row_context(ctx, rows)
        values = buf.index_select(1, rows).reshape(k, -1)
        n = values.shape[1]
        updates = torch.empty_like(values)
        drift = values.new_empty((1, n))
        if n:
            transform.lookahead(sub, 0, n, values, updates)
            transform.lookahead(sub, 0, n, values.new_zeros((1, n)), drift)
        table = cls(
            transform,
            ctx,
            rows,
            sub,
            values,
            updates,
            drift,
            buf.new_zeros((), dtype=torch.float64),
            chunk,
        )
        table.untouched_sq = table._untouched_drift_sq()
        return table

    def _blocks(self) -> list[tuple[int, int]]:
        """Blocks of whole rows over the table, about ``chunk`` values each."""
        param = self.ctx.param
        row = param.numel() // param.shape[0]
        step = max(1, self.chunk // row) * row
        return [(lo, min(lo + step, param.numel())) for lo in range(0, param.numel(), step)]

    def _untouched_drift_sq(self) -> Tensor:
        param = self.ctx.param
        row = param.numel() // param.shape[0]
        untouched = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
        untouched[self.rows] = False
        total = torch.zeros((), dtype=torch.float64, device=param.device)
        for lo, hi in self._blocks():
            d0 = self.values.new_empty((1, hi - lo))
            self.transform.lookahead(self.ctx, lo, hi, self.values.new_zeros((1, hi - lo)), d0)
            keep = untouched[lo // row : hi // row].unsqueeze(1)
            part = d0.view(-1, row).double() * keep
            total += (part * part).sum()
        return total

    def add_grams(self, out: StepGrams) -> None:
        """Add this table's terms: the touched rows' products, and the untouched rows' drift,
        the same vector for every task."""
        d, d0, u = self.updates, self.drift, self.untouched_sq
        if out.gradient is not None:
            out.gradient.add_(torch.mm(self.values, self.values.T))
        if out.lookahead is not None:
            out.lookahead.add_(torch.mm(d, d.T)).add_(u)
        if out.drift_dots is not None and out.drift_sq is not None:
            out.drift_dots.add_((d * d0).sum(1, dtype=torch.float64) + u)
            out.drift_sq.add_((d0 * d0).sum(dtype=torch.float64) + u)
        if out.marginal is not None:
            m = d - d0  # zero on the untouched rows
            out.marginal.add_(torch.mm(m, m.T))

    def apply(self, alpha: Tensor, drift_weight: float | Tensor) -> None:
        """The whole table steps with a zero gradient and ``(sum_k alpha_k + w) d_0``, then the
        touched rows are committed with their real gradient and update and written back."""
        factor = alpha.sum() + drift_weight
        for lo, hi in self._blocks():
            zero = self.values.new_zeros((1, hi - lo))
            d0 = torch.empty_like(zero)
            self.transform.lookahead(self.ctx, lo, hi, zero, d0)
            self.transform.commit(self.ctx, lo, hi, zero[0], d0[0].mul_(factor))
        n = self.values.shape[1]
        if n == 0:
            return
        grad = alpha @ self.values
        update = alpha @ self.updates
        if not (isinstance(drift_weight, float) and drift_weight == 0.0):
            update = update + self.drift[0] * drift_weight
        self.transform.commit(self.sub, 0, n, grad, update)
        scatter_back(self.ctx, self.sub, self.rows)


def _gradient_gram(task_grads: TaskGrads, k: int, device: torch.device) -> Tensor:
    """``[<g_i, g_j>]`` in float64 from the kept per-task gradients (the fused path's
    diagnostics: one float32 dot product per pair and parameter)."""
    gram = torch.zeros((k, k), dtype=torch.float64, device=device)
    for i in range(len(task_grads)):
        rows = [g.reshape(-1) for g in task_grads.rows(i)]
        for a in range(k):
            for b in range(a, k):
                value = torch.dot(rows[a], rows[b]).double()
                gram[a, b] += value
                if a != b:
                    gram[b, a] += value
    return gram
