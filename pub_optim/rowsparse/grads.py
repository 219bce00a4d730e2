"""Row-sparse per-task gradients: the rows of a table each task touched, and their values.

Embedding tables of recommendation models receive, per batch, a gradient on a tiny fraction of
their rows (``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` return it as a
sparse COO tensor with one index per lookup). For Parameter Update Balancing (Yuan, Cai, Dong,
arXiv:2410.05806) each task's gradient is kept as the rows that task touched, aligned on the union
of the rows touched by any task, so that the per-task look-ahead updates, their Gram matrix and the
balanced update cost ``O(K x touched rows x dim)`` instead of ``O(K x table)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def coalesced_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, values)`` of a sparse COO gradient over dim 0: sorted unique row indices ``[n]``
    and the summed values ``[n, *row_shape]`` (duplicate lookups of a row add up, as
    ``Tensor.coalesce`` does)."""
    if not grad.is_sparse:
        raise TypeError(f"expected a sparse COO gradient, got layout {grad.layout}")
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"row-sparse gradients need sparse_dim() == 1 (one index per row, as nn.Embedding and "
            f"nn.EmbeddingBag produce), got sparse_dim() == {grad.sparse_dim()}"
        )
    c = grad.coalesce()
    return c.indices()[0], c.values()


@dataclass
class TaskRows:
    """K tasks' gradients of one parameter, on the union of the rows any of them touched.

    Attributes:
        shape: the parameter's shape (rows along dim 0).
        rows: ``[n]`` sorted unique row indices touched by at least one task.
        values: ``[K, n, *shape[1:]]`` per-task gradient values (zeros where a task did not touch
            the row).
        touched: ``[K, n]`` whether task ``k``'s gradient holds row ``rows[j]`` (what a sparse
            optimizer treats as touched: an index present in the coalesced gradient, whatever its
            value).
    """

    shape: torch.Size
    rows: Tensor
    values: Tensor
    touched: Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_task_grads(
        cls, grads: Sequence[Tensor | None], shape: torch.Size | Sequence[int]
    ) -> TaskRows:
        """Align the tasks' sparse COO gradients (``None``: the task did not reach the table)."""
        shape = torch.Size(shape)
        if not grads:
            raise ValueError("from_task_grads needs one gradient (or None) per task")
        present = [g for g in grads if g is not None]
        if not present:
            raise ValueError("no task has a gradient for this parameter")
        parts: list[tuple[Tensor, Tensor] | None] = []
        for k, g in enumerate(grads):
            if g is None:
                parts.append(None)
                continue
            if tuple(g.shape) != tuple(shape):
                raise ValueError(
                    f"task {k}'s gradient has shape {tuple(g.shape)}, the parameter {tuple(shape)}"
                )
            parts.append(coalesced_rows(g))
        ref = present[0]
        all_rows = torch.cat([p[0] for p in parts if p is not None])
        rows, inverse = torch.unique(all_rows, sorted=True, return_inverse=True)
        k_count, n = len(grads), int(rows.numel())
        values = torch.zeros((k_count, n, *shape[1:]), dtype=ref.dtype, device=ref.device)
        touched = torch.zeros((k_count, n), dtype=torch.bool, device=ref.device)
        start = 0
        for k, part in enumerate(parts):
            if part is None:
                continue
            idx, vals = part
            pos = inverse[start : start + idx.numel()]
            start += idx.numel()
            values[k].index_copy_(0, pos, vals.to(values.dtype))
            touched[k, pos] = True
        return cls(shape, rows, values, touched)

    @classmethod
    def from_dense(cls, task_grads: Tensor, rows: Tensor | None = None) -> TaskRows:
        """The rows of dense per-task gradients ``[K, *shape]`` (``rows``: the rows to keep;
        default: those where some task's gradient is non-zero). Every kept row counts as touched
        by every task (a dense optimizer updates every row)."""
        k_count = task_grads.shape[0]
        shape = task_grads.shape[1:]
        if rows is None:
            rows = nonzero_rows(task_grads)
        values = task_grads.index_select(1, rows)
        touched = torch.ones((k_count, rows.numel()), dtype=torch.bool, device=task_grads.device)
        return cls(torch.Size(shape), rows, values, touched)

    def union_touched(self) -> Tensor:
        """``[n]``: touched by some task (every row of :attr:`rows`)."""
        return self.touched.any(0)

    def combine(self, weights: Tensor) -> Tensor:
        """``sum_k weights[k] * values[k]``: ``[n, *row_shape]``."""
        w = weights.to(self.values)
        out = self.values[0] * w[0]
        for k in range(1, self.num_tasks):
            out.addcmul_(self.values[k], w[k])
        return out

    def to_sparse(self, values: Tensor) -> Tensor:
        """A sparse COO tensor of the parameter's shape with ``values`` (``[n, *row_shape]``) on
        :attr:`rows`."""
        return torch.sparse_coo_tensor(
            self.rows.unsqueeze(0), values, self.shape, is_coalesced=True, check_invariants=False
        )


def nonzero_rows(task_grads: Tensor) -> Tensor:
    """Sorted indices of the rows (dim 1 of ``[K, N, ...]``) where some task's gradient is not
    zero."""
    k_count, n = task_grads.shape[0], task_grads.shape[1]
    nz = task_grads.reshape(k_count, n, -1).ne(0).any(2).any(0)
    return nz.nonzero().squeeze(1)


def gram(updates: Tensor) -> Tensor:
    """``G[i, j] = <u_i, u_j>`` (float64) of per-task updates ``[K, ...]``: over the touched rows
    only, it equals the dense Gram matrix when the updates are zero elsewhere."""
    flat = updates.reshape(updates.shape[0], -1).double()
    return flat @ flat.T
