"""The elementwise work of one balanced step with an exact look-ahead transform.

Yuan, Cai, Dong, arXiv:2410.05806, steps 2-6: over the shared parameters' per-task gradients
(:class:`TaskGrads`), the Gram matrix of the look-ahead updates (``space="update"``) or of the
gradients (``space="gradient"``), then the weighted update and the state advance. Eager, in
cache-sized column blocks, for every transform; compiled (:mod:`pub_optim.transforms.fused`) for
Adam/AdamW when ``fused`` allows it, falling back to the eager path with a warning if a kernel
fails. :class:`pub_optim.PUB` owns one engine and decides what to solve and when.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .transforms import UpdateTransform
from .transforms import fused as kernels
from .transforms.base import ParamContext
from .transforms.fused import FusedItem

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


class ExactStepEngine:
    """Gram matrix and weighted apply over the per-task gradients, for one transform.

    Args:
        transform: the wrapped optimizer's exact look-ahead transform.
        space: ``"update"`` (Gram of the look-ahead updates) or ``"gradient"``.
        chunk_size: columns per eager block (``None``: 65536 on CPU, whole tensors elsewhere).
        fused: as :class:`pub_optim.PUB`'s ``fused`` argument.

    Attributes:
        fused_failed: a compiled kernel failed once; every later step is eager.
    """

    def __init__(
        self,
        transform: UpdateTransform,
        space: Literal["update", "gradient"],
        chunk_size: int | None,
        fused: bool | None,
    ) -> None:
        self.transform = transform
        self.space = space
        self.chunk_size = chunk_size
        self.fused = fused
        self.fused_failed = False

    def fused_enabled(self, params: Sequence[Tensor], num_tasks: int) -> bool:
        """Whether a step over these shared parameters with ``num_tasks`` tasks runs the compiled
        kernels."""
        if self.fused is False or self.fused_failed or self.space != "update":
            return False
        if not hasattr(self.transform, "fused_operands") or not params:
            return False
        if self.fused is None:
            if any(p.device.type != "cpu" for p in params):
                return False
            return num_tasks * sum(p.numel() for p in params) >= FUSED_AUTO_MIN_VALUES
        return True

    def fused_items(
        self, contexts: list[ParamContext], task_grads: TaskGrads
    ) -> list[FusedItem] | None:
        """The compiled kernels' calls of this step (``None``: the eager path)."""
        if not len(task_grads):
            return None
        rows = [task_grads.rows(i) for i in range(len(task_grads))]
        if not self.fused_enabled([r[0] for r in rows], len(rows[0])):
            return None
        transform: Any = self.transform
        return kernels.batch(
            rows, [transform.fused_operands(ctx) for ctx in contexts], FUSED_MIN_TENSOR
        )

    def gram(
        self,
        contexts: list[ParamContext],
        task_grads: TaskGrads,
        k: int,
        items: list[FusedItem] | None = None,
    ) -> Tensor:
        """``G = [<d_i, d_j>]`` in float64: the compiled kernel over ``items`` when given (and
        working), else eager cache-sized blocks, each a look-ahead into a ``K x chunk`` scratch
        and a float32 matrix product added into ``G``."""
        device = task_grads.rows(0)[0].device if len(task_grads) else torch.device("cpu")
        gram = torch.zeros((k, k), dtype=torch.float64, device=device)
        if items is not None and self._gram_fused(items, gram):
            return gram
        buffers = task_grads.all_stacked()
        scratch: Tensor | None = None
        for ctx, buf in zip(contexts, buffers, strict=True):
            flat = buf.view(k, -1)
            chunk = self._chunk(flat)
            for lo in range(0, flat.shape[1], chunk):
                hi = min(lo + chunk, flat.shape[1])
                block = flat[:, lo:hi]
                if self.space == "update":
                    if scratch is None or scratch.dtype != flat.dtype or scratch.shape[1] < hi - lo:
                        scratch = flat.new_empty((k, min(chunk, flat.shape[1])))
                    out = scratch[:, : hi - lo]
                    self.transform.lookahead(ctx, lo, hi, block, out)
                    block = out
                gram.add_(torch.mm(block, block.T))
        return gram

    def _gram_fused(self, items: list[FusedItem], gram: Tensor) -> bool:
        """Add the compiled kernel's Gram matrix to ``gram``; ``False`` (``gram`` untouched) if
        the kernel fails, and the eager pass computes the same matrix."""
        k = gram.shape[0]
        packed: Tensor | None = None
        for item in items:
            try:
                part = kernels.adam_gram(item.grads, item.operands, item.constants)
            except Exception as exc:
                warnings.warn(
                    f"PUB(fused=...): the fused Adam Gram kernel failed ({exc!r}); using the "
                    "eager path",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.fused_failed = True
                return False
            packed = part if packed is None else packed + part
        if packed is not None:
            gram.add_(kernels.unpack_gram(packed, k))
        return True

    def apply(
        self,
        contexts: list[ParamContext],
        task_grads: TaskGrads,
        weights: Tensor,
        items: list[FusedItem] | None,
    ) -> None:
        """``theta <- theta + sum_k alpha_k d_k`` and the state advanced with ``sum_k alpha_k g_k``
        (``items``: from :meth:`fused_items`, ``None`` for the eager path)."""
        if items is not None and not self.fused_failed:
            self.apply_fused(contexts, task_grads, weights, items)
        else:
            self.apply_eager(contexts, task_grads.all_stacked(), weights)

    def apply_eager(
        self,
        contexts: list[ParamContext],
        task_grads: list[Tensor],
        weights: Tensor,
        keep: Tensor | None = None,
    ) -> None:
        """The eager apply pass. ``keep``: a 0-d bool tensor; where it is False the parameters and
        their state keep their values (decided on the device: each block's values are saved
        before the commit and selected after it)."""
        scratch: Tensor | None = None
        for ctx, buf in zip(contexts, task_grads, strict=True):
            k = buf.shape[0]
            flat = buf.view(k, -1)
            alpha = weights.to(device=flat.device, dtype=flat.dtype)
            chunk = self._chunk(flat)
            for lo in range(0, flat.shape[1], chunk):
                hi = min(lo + chunk, flat.shape[1])
                block = flat[:, lo:hi]
                combined = alpha @ block
                rows = k if self.space == "update" else 1
                if (
                    scratch is None
                    or scratch.dtype != flat.dtype
                    or scratch.shape[1] < hi - lo
                    or scratch.shape[0] != rows
                ):
                    scratch = flat.new_empty((rows, min(chunk, flat.shape[1])))
                out = scratch[:, : hi - lo]
                if self.space == "update":
                    self.transform.lookahead(ctx, lo, hi, block, out)
                    update = alpha @ out
                else:
                    self.transform.lookahead(ctx, lo, hi, combined.unsqueeze(0), out)
                    update = out[0]
                if keep is None:
                    self.transform.commit(ctx, lo, hi, combined, update)
                else:
                    self._commit_where(keep, ctx, lo, hi, combined, update)
            self.transform.finish(ctx)

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
        contexts: list[ParamContext],
        task_grads: TaskGrads,
        weights: Tensor,
        items: list[FusedItem],
    ) -> None:
        for n, item in enumerate(items):
            alpha = weights.to(device=item.grads[0].device, dtype=item.grads[0].dtype)
            try:
                kernels.adam_apply(item.grads, alpha, item.operands, item.constants)
            except Exception as exc:  # parameters are independent: the rest goes the eager way
                rest = sorted(i for later in items[n:] for i in later.indices)
                warnings.warn(
                    f"PUB(fused=...): the fused Adam apply kernel failed ({exc!r}); using the "
                    "eager path",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.fused_failed = True
                self.apply_eager([contexts[j] for j in rest], task_grads.all_stacked(rest), weights)
                return
            item.write_back()
            for i in item.indices:
                self.transform.finish(contexts[i])

    def _chunk(self, tensor: Tensor) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return DEFAULT_CPU_CHUNK if tensor.device.type == "cpu" else max(1, tensor[0].numel())
