"""Dense-gradient tables with untouched rows: one shared look-ahead for the rows no task touched.

With a dense-gradient optimizer (Adam, SGD with momentum, RMSprop, ...) every row of a table
moves at every step, but a row that no task's gradient reaches moves the same way for every task:
its look-ahead is the drift ``d_0 = T(0; S)`` (momentum, weight decay). PUB (Yuan, Cai, Dong,
arXiv:2410.05806) over such a table therefore needs the K per-task look-aheads only on the
touched rows; the untouched rows contribute the same ``||d_0||^2`` to every entry of the Gram
matrix, and receive ``(sum_k alpha_k) d_0`` with the state advanced by a zero gradient. This
module does exactly that, on top of any dense :class:`~pub_optim.transforms.UpdateTransform`:

* :func:`row_context` gathers the touched rows of a parameter and of its state into a small
  :class:`~pub_optim.transforms.base.ParamContext` that the transform treats as any other;
* :class:`UntouchedRows` computes the touched-row look-aheads, the drift once, the Gram matrix,
  and applies the step (drift on the whole table in chunks, then the touched rows restored and
  committed with their real gradient).

The result equals the dense computation to rounding (the same elementwise formulas; only the
summation order of the Gram matrix and ``sum_k alpha_k d_0`` differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..transforms.base import ParamContext, UpdateTransform


def row_context(ctx: ParamContext, rows: Tensor) -> ParamContext:
    """A context over copies of the given rows (dim 0) of every flat view of ``ctx``."""
    n_rows = ctx.param.shape[0]
    sub = ParamContext(ctx.param, ctx.group, ctx.state, ctx.new_state)
    sub.scalars = ctx.scalars
    sub.flat = {
        name: view.view(n_rows, -1).index_select(0, rows).reshape(-1)
        for name, view in ctx.flat.items()
    }
    return sub


def scatter_back(ctx: ParamContext, sub: ParamContext, rows: Tensor) -> None:
    """Write the rows of ``sub`` (see :func:`row_context`) back into ``ctx``'s tensors."""
    n_rows = ctx.param.shape[0]
    for name, view in ctx.flat.items():
        view.view(n_rows, -1).index_copy_(0, rows, sub.flat[name].view(rows.numel(), -1))


@dataclass
class UntouchedRows:
    """PUB's look-ahead, Gram matrix and apply for one dense-gradient table, given its touched
    rows.

    Args:
        transform: the dense optimizer's transform; ``ctx``: its context for this parameter
            (from ``transform.begin``).
        rows: sorted row indices where some task's gradient may be non-zero (every other row
            must have a zero gradient for every task).
        values: ``[K, len(rows), *row_shape]``: the per-task gradients on those rows.
        chunk: elements per block of the whole-table drift passes.
        keep_drift: keep ``d_0`` of the whole table between :meth:`gram` and :meth:`apply` (one
            table-sized temporary, one look-ahead pass less); ``False`` recomputes it.
    """

    transform: UpdateTransform
    ctx: ParamContext
    rows: Tensor
    values: Tensor
    chunk: int = 1 << 20
    keep_drift: bool = True

    def __post_init__(self) -> None:
        self._sub = row_context(self.ctx, self.rows)
        k_count = self.values.shape[0]
        flat_values = self.values.reshape(k_count, -1)
        self._updates = torch.empty_like(flat_values)
        if flat_values.shape[1]:
            self.transform.lookahead(self._sub, 0, flat_values.shape[1], flat_values, self._updates)
        self._drift: Tensor | None = None
        self._drift_sq = self._drift_norm_sq()

    @property
    def num_tasks(self) -> int:
        return int(self.values.shape[0])

    def _row_len(self) -> int:
        n_rows = self.ctx.param.shape[0]
        return self.ctx.param.numel() // n_rows if n_rows else 0

    def _drift_chunks(self) -> list[tuple[int, int]]:
        """Blocks of whole rows, about ``chunk`` elements each."""
        numel, row_len = self.ctx.param.numel(), self._row_len()
        if numel == 0:
            return []
        step = max(1, self.chunk // row_len) * row_len
        return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]

    def _drift_norm_sq(self) -> float:
        """``||d_0||^2`` over the untouched rows (float64), one read pass over the table."""
        param = self.ctx.param
        row_len = self._row_len()
        untouched = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
        untouched[self.rows] = False
        total = torch.zeros((), dtype=torch.float64, device=param.device)
        if self.keep_drift:
            self._drift = torch.empty(param.numel(), dtype=param.dtype, device=param.device)
        for lo, hi in self._drift_chunks():
            zero = torch.zeros((1, hi - lo), dtype=param.dtype, device=param.device)
            d0 = torch.empty_like(zero) if self._drift is None else self._drift[lo:hi].view(1, -1)
            self.transform.lookahead(self.ctx, lo, hi, zero, d0)
            keep = untouched[lo // row_len : hi // row_len].unsqueeze(1)
            d0 = d0.view(-1, row_len).double() * keep
            total += (d0 * d0).sum()
        return float(total)

    def gram(self) -> Tensor:
        """``G[i, j] = <d_i, d_j>`` over the whole table (float64): the touched rows' per-task
        updates plus ``||d_0||^2`` from the untouched rows, counted once per entry."""
        flat = self._updates.double()
        return flat @ flat.T + self._drift_sq

    def apply(self, weights: Tensor) -> None:
        """``theta += sum_k alpha_k d_k`` and the state advanced with ``g* = sum_k alpha_k g_k``:
        the untouched rows take ``(sum_k alpha_k) d_0`` with a zero gradient, the touched rows
        their weighted look-ahead and gradient. Call ``transform.finish(ctx)`` afterwards."""
        w = weights.to(self.values.dtype)
        total = float(weights.sum())
        for lo, hi in self._drift_chunks():
            zero = torch.zeros((1, hi - lo), dtype=self.ctx.param.dtype, device=w.device)
            if self._drift is None:
                d0 = torch.empty_like(zero)
                self.transform.lookahead(self.ctx, lo, hi, zero, d0)
            else:
                d0 = self._drift[lo:hi].view(1, -1)
            self.transform.commit(self.ctx, lo, hi, zero[0], d0[0].mul_(total))
        self._drift = None
        k_count = self.num_tasks
        flat_values = self.values.reshape(k_count, -1)
        if flat_values.shape[1] == 0:
            return
        grad = flat_values[0] * w[0]
        update = self._updates[0] * w[0]
        for k in range(1, k_count):
            grad.addcmul_(flat_values[k], w[k])
            update.addcmul_(self._updates[k], w[k])
        self.transform.commit(self._sub, 0, grad.numel(), grad, update)
        scatter_back(self.ctx, self._sub, self.rows)
