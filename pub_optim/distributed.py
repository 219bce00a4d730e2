"""Data-parallel PUB: average the per-task gradients across processes in one bucketed all-reduce.

Every rank computes its per-task gradients of the shared parameters on its own shard of the batch;
:class:`GradientAllReduce`, installed as the ``gradient_sync`` hook of :class:`~pub_optim.PUB`,
averages them (and the gradients of the task-specific parameters) across ranks at the end of
:meth:`PUB.backward <pub_optim.PUB.backward>`. Every rank then holds the same gradients, solves the
same weights and applies the same step, so the parameters stay bit-identical across ranks.

With ``torch.nn.parallel.DistributedDataParallel``::

    ddp = DistributedDataParallel(model)
    opt = PUB(torch.optim.Adam(ddp.parameters()), gradient_sync=GradientAllReduce(ddp))
    for x, y in loader:                      # each rank its own shard
        opt.zero_grad()
        losses = task_losses(ddp(x), y)      # forward through the DDP wrapper
        opt.backward(losses)                 # K backward passes + one all-reduce
        opt.step()

Why DDP's own reducer does not also reduce: :meth:`PUB.backward` computes every gradient with
``torch.autograd.grad``, which does not run the parameters' ``AccumulateGrad`` nodes, so the
reducer's autograd hooks never fire (the test suite checks that ``.grad`` stays rank-local without
this hook). Calling ``loss.backward()`` K times under an active reducer would instead all-reduce
the *summed* gradient K times and leave the per-task gradients unsynchronised (the trap reported
by the users of other multi-task libraries).

What travels (per step, float32): ``K * S + T`` gradient entries plus one flag per parameter,
where ``S`` is the number of shared and ``T`` of task-specific parameter entries; plain DDP sends
``S + T``. Everything of one dtype goes in one flat buffer (split at ``bucket_cap_mb``), so a step
is a single collective for the usual all-float32 model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .task_gradients import task_sum
from .wrapper import GradientView

__all__ = ["GradientAllReduce", "SyncStats", "is_distributed"]


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1


@dataclass
class SyncStats:
    """Counters of the collectives run by a :class:`GradientAllReduce` (for benchmarks and logs).

    Attributes:
        calls: synchronisations performed (one per optimizer step without accumulation).
        collectives: gradient ``all_reduce`` calls issued (one per bucket; the one-off layout
            check is not counted).
        bytes: payload bytes sent into ``all_reduce`` (each rank's buffer size, summed).
        seconds: wall time spent in the hook: packing, the collectives and unpacking.
        collective_seconds: the part of ``seconds`` spent inside ``all_reduce`` (including
            waiting for the slowest rank to arrive).
        last_bytes: payload bytes of the last synchronisation.
    """

    calls: int = 0
    collectives: int = 0
    bytes: int = 0
    seconds: float = 0.0
    collective_seconds: float = 0.0
    last_bytes: int = 0


class GradientAllReduce:
    """A ``gradient_sync`` hook for :class:`~pub_optim.PUB`: average gradients across ranks.

    Args:
        module: the ``DistributedDataParallel`` wrapper of the model (optional). When given, the
            hook follows its ``no_sync()`` state exactly like DDP: inside ``with module.no_sync()``
            (gradient accumulation) nothing is communicated and the gradients accumulate locally;
            the first backward outside it averages everything accumulated so far. Its process
            group is used unless ``process_group`` is given.
        process_group: the group to average over (default: the module's, else the world).
        bucket_cap_mb: largest single all-reduce buffer in MiB; larger payloads are split.

    What it averages: the per-task gradient buffers ``[K, *p.shape]`` of the shared parameters,
    and the ``.grad`` of every other parameter of the optimizer (a parameter without a gradient
    on some rank contributes zeros there; it gets a gradient on every rank if any rank had one,
    and stays ``None`` everywhere otherwise). The shared ``.grad`` are then rebuilt as the sum of
    the averaged task gradients, and a shared parameter reached on any rank is active on all.

    ``extra``: a float tensor set before :meth:`PUB.backward` travels in the same collective and
    is replaced by its *sum* over ranks in :attr:`last_extra` (the Lightning callback uses it to
    agree on non-finite losses without a second collective).

    On the first synchronisation (and when the set of shared parameters changes) the ranks also
    compare a fingerprint of the parameter layout and raise ``RuntimeError`` if it differs (e.g.
    a shared-parameter set discovered differently on different ranks): pass ``shared_params``.
    """

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        *,
        process_group: Any = None,
        bucket_cap_mb: float = 256.0,
    ) -> None:
        if module is not None and not hasattr(module, "require_backward_grad_sync"):
            raise TypeError(
                "module must be a torch.nn.parallel.DistributedDataParallel (it has no "
                f"'require_backward_grad_sync'), got {type(module).__name__}"
            )
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        self.module = module
        if process_group is None and module is not None:
            process_group = getattr(module, "process_group", None)
        self.process_group = process_group
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.extra: Tensor | None = None
        self.last_extra: Tensor | None = None
        self.stats = SyncStats()
        self._checked_layout: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        """Whether the next call communicates (more than one rank, and not inside ``no_sync``)."""
        if self.module is not None and not bool(self.module.require_backward_grad_sync):
            return False
        return is_distributed(self.process_group)

    def __call__(self, view: GradientView) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        world = dist.get_world_size(group=self.process_group)
        self._check_layout(view)
        extra, self.extra = self.extra, None
        if view.task_grads is not None:
            self._sync_full(view, world, extra)
        else:
            self._sync_flat([*view.shared, *view.others], world, extra)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - start

    # ----------------------------------------------------------------------------------------
    def _sync_full(self, view: GradientView, world: int, extra: Tensor | None) -> None:
        assert view.task_grads is not None
        others = [p for p in view.others if p.requires_grad]
        device = _device_of(view.shared, others)
        presence = [1.0 if r else 0.0 for r in view.reached]
        presence += [0.0 if p.grad is None else 1.0 for p in others]
        other_grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in others]
        summed, flags, self.last_extra = self._reduce(
            [*view.task_grads, *other_grads], presence, extra, device
        )
        n_shared = len(view.shared)
        for i, (p, buf) in enumerate(zip(view.shared, view.task_grads, strict=True)):
            if not flags[i]:
                continue  # no rank reached it: zeros everywhere, stays inactive
            torch.div(summed[i], world, out=buf)
            view.reached[i] = True
            p.grad = task_sum(buf, out=p.grad)
        _assign(others, summed[n_shared:], flags[n_shared:], world)

    def _sync_flat(self, params: Sequence[Tensor], world: int, extra: Tensor | None) -> None:
        params = [p for p in params if p.requires_grad]
        device = _device_of(params, [])
        presence = [0.0 if p.grad is None else 1.0 for p in params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        summed, flags, self.last_extra = self._reduce(grads, presence, extra, device)
        _assign(params, summed, flags, world)

    def _reduce(
        self,
        tensors: list[Tensor],
        presence: list[float],
        extra: Tensor | None,
        device: torch.device,
    ) -> tuple[list[Tensor], list[bool], Tensor | None]:
        """Sum ``tensors``, the presence flags and ``extra`` over the ranks in one go."""
        # flags ride in the gradients' bucket when its dtype counts exactly (one collective)
        dtype = tensors[0].dtype if tensors else torch.float32
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32
        payload = [*tensors, torch.tensor(presence, dtype=dtype, device=device)]
        if extra is not None:
            payload.append(extra.detach().to(device=device, dtype=dtype).reshape(-1))
        summed = self._all_reduce(payload)
        flags = [v > 0 for v in summed[len(tensors)].tolist()]
        reduced_extra = summed[len(tensors) + 1] if extra is not None else None
        return summed[: len(tensors)], flags, reduced_extra

    def _all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum ``tensors`` over the ranks; one flat buffer per dtype (split at the cap)."""
        out: list[Tensor | None] = [None] * len(tensors)
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            by_key.setdefault((t.dtype, t.device), []).append(i)
        last_bytes = 0
        for (dtype, _device), indices in by_key.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            for chunk in _split(
                indices, [tensors[i].numel() * itemsize for i in indices], self.bucket_cap_bytes
            ):
                flat = torch.cat([tensors[i].reshape(-1) for i in chunk])
                start = time.perf_counter()
                dist.all_reduce(flat, group=self.process_group)
                self.stats.collective_seconds += time.perf_counter() - start
                self.stats.collectives += 1
                last_bytes += flat.numel() * itemsize
                offset = 0
                for i in chunk:
                    n = tensors[i].numel()
                    out[i] = flat[offset : offset + n].view(tensors[i].shape)
                    offset += n
        self.stats.bytes += last_bytes
        self.stats.last_bytes = last_bytes
        return [t for t in out if t is not None]

    def _check_layout(self, view: GradientView) -> None:
        """Raise if the ranks disagree on which parameters are shared (checked once per layout)."""
        shared_ids = [id(p) for p in view.shared]
        key = (len(view.shared), len(view.others), *shared_ids)
        if key == self._checked_layout:
            return
        sig = torch.tensor(
            [
                len(view.shared),
                len(view.others),
                sum(p.numel() for p in view.shared),
                sum((k + 1) * p.numel() for k, p in enumerate(view.shared)),
                sum((k + 1) * p.numel() for k, p in enumerate(view.others)),
            ],
            dtype=torch.float64,
            device=_device_of(view.shared, view.others),
        )
        both = torch.cat([sig, -sig])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        if not torch.equal(both[: len(sig)], -both[len(sig) :]):
            raise RuntimeError(
                "the ranks disagree on the shared parameters of PUB (different shared-parameter "
                "sets or optimizer parameters): pass shared_params= explicitly (e.g. "
                "model.shared_parameters()) so that every rank balances the same tensors"
            )
        self._checked_layout = key


def _assign(
    params: Sequence[Tensor], summed: Sequence[Tensor], flags: Sequence[bool], world: int
) -> None:
    """Set each parameter's ``.grad`` to its rank average where some rank had a gradient."""
    for p, value, present in zip(params, summed, flags, strict=True):
        if not present:
            continue
        if p.grad is None:
            p.grad = value.div_(world).clone()
        else:
            torch.div(value, world, out=p.grad)


def _device_of(first: Sequence[Tensor], second: Sequence[Tensor]) -> torch.device:
    for p in (*first, *second):
        return p.device
    return torch.device("cpu")


def _split(indices: list[int], sizes: list[int], cap: int) -> list[list[int]]:
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in zip(indices, sizes, strict=True):
        if current and used + size > cap:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        chunks.append(current)
    return chunks
