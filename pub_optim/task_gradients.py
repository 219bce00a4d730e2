"""Per-task gradients of the shared parameters: step 1 of PUB (Yuan, Cai, Dong, arXiv:2410.05806).

:class:`TaskGradients` is where :meth:`pub_optim.PUB.backward` leaves the gradients and
:meth:`pub_optim.PUB.step` finds them:

* the partition (:meth:`TaskGradients.discover`): the shared parameters (reached by more than one
  task, or given), each task's own parameters, and those no task reached yet, which join the side
  their reach puts them on once a loss reaches them; frozen parameters are skipped;
* the per-task backward passes, into one ``[K, *shape]`` buffer per shared parameter, or keeping
  autograd's tensors as they are for the compiled kernels (``rows``); the weighted backward between
  solves;
* the carry-over of what was done to the shared ``.grad`` between backward and step (clipping,
  ``GradScaler.unscale_``) onto the per-task gradients (:meth:`TaskGradients.carry_over`);
* :meth:`TaskGradients.for_step`: the active parameters' per-task gradients as the step engine
  reads them (:class:`pub_optim.exact_step.TaskGrads`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .exact_step import TaskGrads
from .partition import sparse_leaves, task_owners
from .rowsparse import TaskRows

#: A changed ``.grad`` to carry over: (its per-task gradients, their sum, the ``.grad`` now).
_Changed = tuple[Tensor | list[Tensor | None], Tensor, Tensor]
Pending = Literal["full", "weighted"]

NONFINITE_SHARED = (
    "non-finite per-task gradients or updates on the shared parameters: the step was skipped and "
    "nothing was changed (lower the learning rate, clip, or use a GradScaler)"
)


class TaskGradients:
    """The per-task gradients of one optimizer's shared parameters, and the partition.

    Args:
        optimizer: the wrapped optimizer (its ``param_groups`` are the candidate parameters).
        explicit_shared: ``PUB(shared_params=...)``, or ``None`` to discover them.
        sync_free: read nothing on the host (norms stay 0-d device tensors).

    Attributes:
        shared: the balanced parameters (``None`` until :meth:`discover`).
        owners: per parameter ``id``, the tasks whose loss reached it at discovery (or since).
        unreached: optimizer parameters no task has reached yet.
        buffers: per shared parameter, its ``[K, *shape]`` per-task gradients.
        rows: instead of ``buffers`` on the compiled path: per shared parameter, each task's
            gradient as autograd returned it (``None``: the task did not reach it).
        reached: per shared parameter, whether any task reached it in this step.
        pending: ``"full"`` after per-task backward passes, ``"weighted"`` after a weighted one,
            ``None`` after ``zero_grad`` or a step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        explicit_shared: list[Tensor] | None,
        sync_free: bool,
    ) -> None:
        self.optimizer = optimizer
        self.explicit_shared = explicit_shared
        self.sync_free = sync_free
        self.task_names: tuple[str, ...] = ()
        self.shared: list[Tensor] | None = None
        self.owners: dict[int, list[int]] = {}
        self.unreached: list[Tensor] = []
        self._newly_reached: dict[int, set[int]] = {}
        self._by_task: list[list[Tensor]] | None = None
        self.buffers: list[Tensor] = []
        self.rows: list[list[Tensor | None]] | None = None
        self.reached: list[bool] = []
        # Per shared parameter: (id, version counter, largest absolute value) of its .grad after
        # backward; the value is a float, or a 0-d device tensor with sync_free.
        self._marks: list[tuple[int, int, float | Tensor] | None] = []
        self.pending: Pending | None = None
        # Row-sparse shared parameters (sparse COO gradients: nn.Embedding(sparse=True),
        # nn.EmbeddingBag(sparse=True)): known from the graph at discovery, or from a first sparse
        # gradient; they get no [K, *shape] buffer. ``sparse[i]``: this step's K sparse
        # gradients of shared parameter i (None: the task did not reach it).
        self.sparse_ids: set[int] = set()
        self.sparse: dict[int, list[Tensor | None]] = {}

    def params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def forget_partition(self) -> None:
        """Discover the partition again at the next backward (after ``add_param_group``)."""
        self.shared = None

    def reset(self) -> None:
        """After ``zero_grad`` or a step: no per-task gradients pending."""
        self.pending = None
        self.rows = None

    def active(self) -> list[int]:
        """The dense shared parameters the step balances: with a ``.grad`` and reached by a
        task (the row-sparse ones: :meth:`sparse_active`)."""
        assert self.shared is not None
        return [
            i
            for i, p in enumerate(self.shared)
            if p.grad is not None and self.reached[i] and i not in self.sparse
        ]

    def sparse_active(self) -> list[tuple[int, TaskRows]]:
        """The row-sparse shared parameters of this step, each with its tasks' gradients on the
        union of the rows they touched."""
        assert self.shared is not None
        out = []
        for i, grads in sorted(self.sparse.items()):
            p = self.shared[i]
            if p.grad is not None and any(g is not None for g in grads):
                out.append((i, TaskRows.from_task_grads(grads, p.shape)))
        return out

    def only_own_nonshared(self) -> bool:
        """Whether every parameter that is not shared is reached by at most one task (so that a
        weighted backward can rescale it back to its task's own gradient)."""
        shared_ids = {id(p) for p in self.shared or []}
        return all(len(ts) <= 1 for pid, ts in self.owners.items() if pid not in shared_ids)

    def discover(self, losses: list[Tensor]) -> None:
        """The partition from the losses' autograd graphs (one walk, no backward pass)."""
        params = self.params()
        owners = task_owners(losses, params)
        assert self.task_names is not None
        for k, name in enumerate(self.task_names):
            if not any(k in ts for ts in owners.values()):
                raise ValueError(
                    f"the loss of task {name!r} reaches no parameter of the wrapped optimizer: "
                    "add the parameters it depends on to the optimizer"
                )
        if self.explicit_shared is not None:
            shared = self.explicit_shared
        else:
            shared = [p for p in params if len(owners[id(p)]) > 1]
            if not shared:
                raise ValueError(
                    "no parameter is reached by more than one task, so there is nothing to "
                    "balance: pass shared_params explicitly, or use the plain optimizer"
                )
        self.shared = shared
        self.owners = owners
        self.sparse_ids |= sparse_leaves(losses)
        shared_ids = {id(p) for p in shared}
        self.unreached = [p for p in params if not owners[id(p)] and id(p) not in shared_ids]
        self._newly_reached = {}
        self._by_task = None
        self.buffers = []
        self.rows = None

    def _join_newly_reached(self) -> None:
        """Parameters first reached in the last steps join the partition: shared when several
        tasks reach them (unless ``shared_params`` was given), else the reaching task's own."""
        if not self._newly_reached or self.shared is None:
            return
        for p in list(self.unreached):
            tasks = self._newly_reached.get(id(p))
            if not tasks:
                continue
            self.unreached.remove(p)
            self.owners[id(p)] = sorted(tasks)
            if self.explicit_shared is None and len(tasks) > 1:
                self.shared = [*self.shared, p]
        self._newly_reached = {}
        self._by_task = None

    def nonshared_by_task(self) -> list[list[Tensor]]:
        """Per task, the non-shared parameters its loss reaches (computed with the partition)."""
        if self._by_task is None:
            assert self.shared is not None and self.task_names is not None
            shared_ids = {id(p) for p in self.shared}
            by_task: list[list[Tensor]] = [[] for _ in self.task_names]
            for p in self.params():
                if id(p) not in shared_ids:
                    for k in self.owners.get(id(p), []):
                        by_task[k].append(p)
            self._by_task = by_task
        return self._by_task

    def backward_weighted(self, losses: list[Tensor], weights: list[float]) -> None:
        """One backward pass of ``sum_k alpha_k L_k`` (between solves): the shared parameters get
        the weighted gradient in ``.grad``; task-specific ones are rescaled by ``1 / alpha_k`` so
        that they still take their own ordinary step."""
        assert self.shared is not None
        total = sum(w * loss.reshape(()) for w, loss in zip(weights, losses, strict=True))
        assert isinstance(total, Tensor)
        by_task = self.nonshared_by_task()
        live = [p for p in self.shared if p.requires_grad]  # frozen ones are skipped
        inputs = live + [p for ps in by_task for p in ps if p.requires_grad]
        scales = [1.0] * len(live) + [
            1.0 / weights[k] for k, ps in enumerate(by_task) for p in ps if p.requires_grad
        ]
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        for p, g, scale in zip(inputs, grads, scales, strict=True):
            if g is not None:
                _accumulate(p, g if scale == 1.0 else g * scale)
        self.pending = "weighted"

    def backward_per_task(self, losses: list[Tensor], retain_graph: bool, keep_rows: bool) -> None:
        """One backward pass per task, restricted to the shared parameters and that task's own
        (``keep_rows``: keep autograd's tensors as they are, for the compiled kernels; else copy
        them into the ``[K, *shape]`` buffers)."""
        assert self.shared is not None
        first = self.pending is None
        if first:
            self._join_newly_reached()
        shared = self.shared
        num_tasks = len(losses)
        if first:
            self.reached = [False] * len(shared)
            self.sparse = {}
            if keep_rows and not any(id(p) in self.sparse_ids for p in shared):
                self.rows = [[None] * num_tasks for _ in shared]
            else:
                self.rows = None
                self._allocate_buffers(num_tasks)
        elif self.rows is not None:
            self.stack_rows()  # accumulating into them: one buffer per parameter from now on
        by_task = self.nonshared_by_task()
        # Frozen parameters (requires_grad=False) are skipped, as torch optimizers skip them.
        live = [i for i, p in enumerate(shared) if p.requires_grad]
        unreached = [p for p in self.unreached if p.requires_grad]
        missing: list[int] = []
        for k, loss in enumerate(losses):
            own = [p for p in by_task[k] if p.requires_grad]
            inputs = [shared[i] for i in live] + own + unreached
            keep = retain_graph or k < num_tasks - 1
            # The gradient tuple lives only for the call (what is kept of it: the shared
            # parameters' gradients, copied into the buffers or kept as they are): it is freed
            # before the next task's backward pass.
            grads = torch.autograd.grad(
                loss.reshape(()), inputs, retain_graph=keep, allow_unused=True
            )
            if all(g is None for g in grads):
                missing.append(k)
            shared_grads: list[Tensor | None] = [None] * len(shared)
            for j, i in enumerate(live):
                shared_grads[i] = grads[j]
            rest = grads[len(live) :]
            self._store(k, own, shared_grads + list(rest[: len(own)]), first)
            for p, g in zip(unreached, rest[len(own) :], strict=True):
                if g is not None:  # trains now (its gradient in .grad); joins at the next step
                    _accumulate(p, g)
                    self._newly_reached.setdefault(id(p), set()).add(k)
            del grads, rest, shared_grads
        if missing:
            assert self.task_names is not None
            names = [self.task_names[k] for k in missing]
            raise ValueError(
                f"the loss of task(s) {names} reaches no trainable parameter of the wrapped "
                "optimizer in this step (frozen, or not part of its graph any more): keep each "
                "task connected (a task with nothing to learn returns 0 * output.sum()). The "
                "parameters and optimizer state are unchanged; call zero_grad() before the next "
                "backward"
            )
        if first:
            # .grad of a shared parameter: this backward's sum over tasks, one pass over K x P.
            for i, (p, reached) in enumerate(zip(shared, self.reached, strict=True)):
                if not reached:
                    continue
                if i in self.sparse:
                    total = _sum_rows(self.sparse[i]).coalesce()
                elif self.rows is None:
                    total = task_sum(self.buffers[i])
                else:
                    total = _sum_rows(self.rows[i])
                if p.grad is None:
                    p.grad = total
                else:
                    p.grad.add_(total)
        self.pending = "full"

    def _allocate_buffers(self, num_tasks: int) -> None:
        """The ``[K, *p.shape]`` per-task buffers (kept from step to step while K is the same)."""
        assert self.shared is not None

        def fits(buf: Tensor, p: Tensor) -> bool:
            if id(p) in self.sparse_ids:
                return buf.numel() == 0
            return tuple(buf.shape) == (num_tasks, *p.shape)

        if len(self.buffers) != len(self.shared) or not all(
            fits(buf, p) for buf, p in zip(self.buffers, self.shared, strict=True)
        ):
            self.buffers = [
                # Row-sparse tables get no buffer: their per-task gradients stay sparse.
                p.new_empty(0)
                if id(p) in self.sparse_ids
                else torch.empty((num_tasks, *p.shape), dtype=p.dtype, device=p.device)
                for p in self.shared
            ]

    def stack_rows(self) -> None:
        """Copy the kept per-task gradients into the buffers (zeros where a task did not reach a
        parameter) and drop them."""
        assert self.rows is not None and self.shared is not None
        self._allocate_buffers(len(self.rows[0]))
        for buf, rows in zip(self.buffers, self.rows, strict=True):
            for row, g in zip(buf, rows, strict=True):
                if g is None:
                    row.zero_()
                else:
                    row.copy_(g)
        self.rows = None

    def _store(
        self,
        k: int,
        nonshared: list[Tensor],
        grads: Sequence[Tensor | None],
        first: bool,
    ) -> None:
        """Task ``k``'s gradients: shared ones kept (row ``k`` of the per-task buffers, or the
        tensor itself; added to ``.grad`` too when accumulating), the task's own parameters into
        ``.grad``."""
        assert self.shared is not None
        num_shared = len(self.shared)
        for i, (p, g) in enumerate(zip(self.shared, grads[:num_shared], strict=True)):
            if g is not None and g.is_sparse:
                self._store_sparse(i, k, p, g, first)
                continue
            if i in self.sparse:  # a row-sparse table this task did not reach
                continue
            if self.rows is not None:
                # Never written in place (a rescale replaces it), so it may alias anything.
                self.rows[i][k] = g
                self.reached[i] = self.reached[i] or g is not None
                continue
            row = self.buffers[i][k]
            if g is None:
                if first:
                    row.zero_()
                continue
            if first:
                row.copy_(g)
            else:
                row.add_(g)
                _accumulate(p, g)
            self.reached[i] = True
        for p, g in zip(nonshared, grads[num_shared:], strict=True):
            if g is not None:
                _accumulate(p, g)

    def _store_sparse(self, i: int, k: int, p: Tensor, g: Tensor, first: bool) -> None:
        """Task ``k``'s sparse gradient of shared parameter ``i``, kept as it is."""
        if id(p) not in self.sparse_ids:  # not seen in the graph: from now on a sparse table
            self.sparse_ids.add(id(p))
            if self.buffers and self.buffers[i].numel():
                self.buffers[i] = p.new_empty(0)
        grads = self.sparse.setdefault(i, [None] * len(self.task_names))
        previous = grads[k]
        grads[k] = g if previous is None else previous + g
        if not first:
            _accumulate(p, g)
        self.reached[i] = True

    def record_marks(self) -> None:
        """Remember the shared ``.grad`` tensors, to detect changes made before :meth:`step`:
        their identity, version counter and largest absolute value (the infinity norm, which
        cannot overflow for finite values). The value is needed because some in-place kernels do
        not bump the version counter: ``GradScaler.unscale_``'s
        ``_amp_foreach_non_finite_check_and_unscale_`` is one (torch 2.13)."""
        shared = self.shared or []
        with_grad = [dense_view(p.grad) for p in shared if p.grad is not None]
        norms: list[float | Tensor] = []
        if with_grad:
            stacked = torch.stack(max_abs(with_grad))
            norms = list(stacked.unbind()) if self.sync_free else stacked.tolist()
        values = iter(norms)
        self._marks = [
            None if p.grad is None else (id(p.grad), p.grad._version, next(values)) for p in shared
        ]

    # ----------------------------------------------------------------------------------- step

    def for_step(self, active: list[int]) -> TaskGrads:
        """The active parameters' per-task gradients: the kept tensors (zeros for a task that did
        not reach the parameter), or the buffers."""
        if self.rows is None:
            return TaskGrads([self.buffers[i] for i in active])
        assert self.shared is not None
        parts: list[list[Tensor]] = []
        for i in active:
            zeros: Tensor | None = None
            rows: list[Tensor] = []
            for g in self.rows[i]:
                if g is None:
                    zeros = torch.zeros_like(self.shared[i]) if zeros is None else zeros
                    g = zeros
                rows.append(g)
            parts.append(rows)
        return TaskGrads(parts)

    def carry_over(self, active: list[int]) -> Tensor | None:
        """Rescale the per-task gradients by what was done to ``.grad`` since :meth:`backward`.

        A ``.grad`` that was replaced or changed in place (its version counter moved): where the
        per-task gradients sum to a non-zero value the factor is elementwise
        (``grad / sum_k g_k``: exact for value clipping too); where they cancel to zero, it is the
        least-squares uniform factor ``<grad, sum> / <sum, sum>`` over all changed tensors, which is
        exact for the uniform changes that matter (norm clipping, ``GradScaler.unscale_``).
        A ``.grad`` whose norm changed with the same version (kernels that do not bump it, such
        as ``GradScaler.unscale_``'s) is rescaled by the ratio of norms: exact for the uniform
        changes those kernels make.

        Raises ``FloatingPointError`` (nothing changed) on a non-finite shared gradient; with
        ``sync_free`` returns that check as a 0-d bool tensor instead (``None`` otherwise).
        """
        assert self.shared is not None
        now = self._grad_norms_now(active)
        if self.sync_free:
            return self._carry_over_on_device(active, now)
        assert isinstance(now, list)
        if not all(math.isfinite(n) for n in now):
            raise FloatingPointError(NONFINITE_SHARED)
        changed: list[_Changed] = []
        for i, norm in zip(active, now, strict=True):
            p = self.shared[i]
            mark = self._marks[i]
            assert p.grad is not None
            if mark is not None and mark[:2] == (id(p.grad), p.grad._version) and norm == mark[2]:
                continue
            if self.rows is None:
                buf = self.buffers[i]
                changed.append((buf, task_sum(buf), p.grad))
            else:
                changed.append((self.rows[i], _sum_rows(self.rows[i]), p.grad))
        self._rescale_changed(changed)
        self._carry_over_sparse()
        return None

    def _carry_over_sparse(self) -> None:
        """The same for row-sparse tables: a changed sparse ``.grad`` rescales the tasks' sparse
        gradients by the uniform factor ``<grad, sum> / <sum, sum>`` (exact for clipping and
        unscaling, the changes made to sparse gradients); non-finite values are refused."""
        assert self.shared is not None
        for i, grads in self.sparse.items():
            p = self.shared[i]
            if p.grad is None:
                continue
            values = dense_view(p.grad)
            if not bool(torch.isfinite(values).all()):
                raise FloatingPointError(NONFINITE_SHARED)
            mark = self._marks[i]
            now = float(values.abs().max()) if values.numel() else 0.0
            if mark is not None and mark[:2] == (id(p.grad), p.grad._version) and now == mark[2]:
                continue
            total = _sum_rows(grads).coalesce()
            grad = p.grad.coalesce()
            norm = float((total * total).sum())
            factor = float((grad * total).sum()) / norm if norm > 0 else 1.0
            self.sparse[i] = [None if g is None else g * factor for g in grads]

    def _carry_over_on_device(self, active: list[int], now: Tensor | list[float]) -> Tensor:
        assert self.shared is not None and isinstance(now, Tensor | list)
        if isinstance(now, list):  # no active parameter
            return torch.ones((), dtype=torch.bool)
        changed: list[_Changed] = []
        for j, i in enumerate(active):
            p = self.shared[i]
            mark = self._marks[i]
            assert p.grad is not None
            buf = self.buffers[i]
            if mark is None or mark[:2] != (id(p.grad), p.grad._version):
                changed.append((buf, task_sum(buf), p.grad))
                continue
            before, after = mark[2], now[j]
            assert isinstance(before, Tensor)
            same = (after == before) | ~(before > 0)
            buf.mul_(torch.where(same, 1.0, after / torch.where(same, 1.0, before)).to(buf.dtype))
        self._rescale_changed(changed)
        return torch.isfinite(now).all()

    @staticmethod
    def _rescale_changed(changed: list[_Changed]) -> None:
        """``g_k <- g_k * grad / sum_j g_j`` for each ``(task gradients, sum, grad)`` (no host
        reads). The task gradients are a buffer (scaled in place) or a list of kept tensors
        (replaced: autograd's results may alias each other or other tensors)."""
        if not changed:
            return
        dots = torch.stack([(g.double() * t.double()).sum() for _, t, g in changed]).sum()
        norms = torch.stack([(t.double() * t.double()).sum() for _, t, _ in changed]).sum()
        uniform = torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 1.0)
        for target, total, grad in changed:
            nonzero = total != 0
            factor = uniform.to(total.dtype)
            ratio = torch.where(nonzero, grad / torch.where(nonzero, total, 1), factor)
            if isinstance(target, Tensor):
                target.mul_(ratio)
            else:
                target[:] = [None if g is None else g * ratio for g in target]

    def _grad_norms_now(self, active: list[int]) -> Tensor | list[float]:
        """The norms of the shared ``.grad`` tensors now, to compare with the recorded ones (a
        tensor with ``sync_free``, else floats)."""
        assert self.shared is not None
        grads = [dense_view(self.shared[i].grad) for i in active]  # type: ignore[arg-type]
        if not grads:
            return []
        norms = torch.stack(max_abs(grads))
        return norms if self.sync_free else norms.tolist()

    def nonshared_with_grad(self) -> list[Tensor]:
        shared_ids = {id(p) for p in self.shared or []}
        return [p for p in self.params() if id(p) not in shared_ids and p.grad is not None]


def task_sum(task_grads: Tensor, out: Tensor | None = None) -> Tensor:
    """``task_grads.sum(0)`` for a ``[K, *shape]`` buffer, as K - 1 additions of whole rows
    (torch's reduction over the leading dimension takes about 3x as long at K = 2 on CPU)."""
    return _sum_rows(task_grads.unbind(0), out)


def _sum_rows(rows: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
    """The sum of the given per-task gradients (``None``: a task that did not reach the
    parameter; at least one is given), in ``out`` or a new tensor."""
    present = [g for g in rows if g is not None]
    if len(present) == 1:
        return present[0].clone() if out is None else out.copy_(present[0])
    total = present[0] + present[1] if out is None else torch.add(present[0], present[1], out=out)
    for g in present[2:]:
        total.add_(g)
    return total


def max_abs(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Per tensor, the largest absolute value (the infinity norm): finite exactly when every value
    is, for any finite values (a 2-norm of float32 values above about 1.8e19 overflows), and
    changed by any uniform rescaling, which is what the ``.grad`` change detection needs."""
    if not tensors:
        return ()
    return tuple(torch._foreach_norm(list(tensors), ord=math.inf))


def dense_view(grad: Tensor) -> Tensor:
    """What the change marks and finiteness checks read of a gradient: the values of a sparse
    one (a strided tensor as it is)."""
    return grad._values() if grad.is_sparse else grad


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)
