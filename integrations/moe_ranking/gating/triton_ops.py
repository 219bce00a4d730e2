"""Launching the Triton gating kernels, and the ``torch.autograd.Function`` around them.

Forward: two launches (``gating_fwd_kernel``, then ``gating_dispatch_kernel``), no host
synchronisation. Backward: one launch of ``gating_bwd_kernel``; the ``[E]`` task-bias gradient is
the column sum of the logits gradient (a torch reduction).

Launch parameters: ``BLOCK_E``/``BLOCK_K`` are ``E``/``k`` rounded up to a power of two; a tile
holds about 1024 (compiled; no register spills on sm_90 for E <= 64, k <= 4 with 4 warps) or 16384
(interpreter) router logits. Compiled, the forward grid is persistent with at most 3 programs per
SM (as many as fit at once; every dispatch program reads all ``[P, E]`` partial counts, so ``P``
stays small); interpreted (about 10 ms per program instance) it uses at most 4 programs.
``block_n`` and ``num_programs`` override these (tests use them to cover several programs and
several tiles per program).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton

from .output import GatingOutput
from .triton_kernels import GatingKernels, build_kernels

__all__ = ["LaunchConfig", "launch_config", "triton_interpreted", "triton_topk_gating"]

_TILE_ELEMENTS = {False: 1024, True: 16384}
_MAX_PROGRAMS_PER_SM = 3  # ~150-190 registers x 128 threads: 3 resident programs per SM
_MAX_INTERPRETED_PROGRAMS = 4


def triton_interpreted() -> bool:
    """Whether triton runs under its interpreter in this process.

    Triton decides this when ``triton.language`` is first imported (``TRITON_INTERPRET=1`` in the
    environment then), so the kernels are built in the same mode, whatever the variable says now.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and grids of one gating call (see the module docstring)."""

    block_n: int
    block_e: int
    block_k: int
    block_p: int
    rows_per_prog: int
    num_programs: int
    num_warps: int


def launch_config(
    n: int,
    e: int,
    k: int,
    device: torch.device,
    block_n: int | None = None,
    num_programs: int | None = None,
) -> LaunchConfig:
    """The launch configuration ``triton_topk_gating`` uses for this problem on ``device``."""
    interpret = triton_interpreted()
    block_e = max(2, triton.next_power_of_2(e))
    default_block_n = max(4, min(1024, _TILE_ELEMENTS[interpret] // block_e))
    default_block_n = min(default_block_n, max(4, triton.next_power_of_2(n)))
    block_n = default_block_n if block_n is None else block_n
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    tiles = triton.cdiv(max(n, 1), block_n)
    if num_programs is None:
        if interpret or device.type != "cuda":
            num_programs = _MAX_INTERPRETED_PROGRAMS
        else:
            num_programs = _MAX_PROGRAMS_PER_SM * _sm_count(device.index or 0)
    num_programs = max(1, min(num_programs, tiles))
    rows_per_prog = triton.cdiv(tiles, num_programs) * block_n
    num_programs = triton.cdiv(max(n, 1), rows_per_prog)
    return LaunchConfig(
        block_n=block_n,
        block_e=block_e,
        block_k=max(2, triton.next_power_of_2(k)),
        block_p=max(2, min(triton.next_power_of_2(num_programs), 2048 // block_e)),
        rows_per_prog=rows_per_prog,
        num_programs=num_programs,
        num_warps=4 if block_n * block_e <= 1024 else 8,
    )


def _kernels() -> GatingKernels:
    return build_kernels(triton_interpreted())


class _TritonGating(torch.autograd.Function):
    """Outputs: weights, mean_probs, z_loss, lb_loss (differentiable), then ids, counts, offsets,
    dispatch order (not differentiable)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        task_bias: torch.Tensor | None,
        k: int,
        renormalize: bool,
        cfg: LaunchConfig,
    ) -> tuple[torch.Tensor, ...]:
        n, e = logits.shape
        dev = logits.device
        kern = _kernels()
        weights = torch.empty(n, k, dtype=torch.float32, device=dev)
        ids = torch.empty(n, k, dtype=torch.int64, device=dev)
        p = cfg.num_programs
        part_counts = torch.empty(p, e, dtype=torch.int32, device=dev)
        part_probs = torch.empty(p, e, dtype=torch.float32, device=dev)
        part_z = torch.empty(p, dtype=torch.float32, device=dev)
        has_bias = task_bias is not None
        bias_arg = logits if task_bias is None else task_bias
        stride_bias = e if task_bias is not None and task_bias.dim() == 2 else 0
        kern.fwd[(p,)](
            logits,
            bias_arg,
            weights,
            ids,
            part_counts,
            part_probs,
            part_z,
            n,
            e,
            cfg.rows_per_prog,
            e,
            stride_bias,
            K=k,
            HAS_BIAS=has_bias,
            RENORMALIZE=renormalize,
            BLOCK_N=cfg.block_n,
            BLOCK_E=cfg.block_e,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
        )
        counts = torch.empty(e, dtype=torch.int64, device=dev)
        offsets = torch.empty(e + 1, dtype=torch.int64, device=dev)
        mean_probs = torch.empty(e, dtype=torch.float32, device=dev)
        z_loss = torch.empty((), dtype=torch.float32, device=dev)
        lb_loss = torch.empty((), dtype=torch.float32, device=dev)
        order = torch.empty(n * k, dtype=torch.int64, device=dev)
        kern.dispatch[(p,)](
            ids,
            part_counts,
            part_probs,
            part_z,
            counts,
            offsets,
            mean_probs,
            z_loss,
            lb_loss,
            order,
            n,
            e,
            p,
            cfg.rows_per_prog,
            K=k,
            BLOCK_N=cfg.block_n,
            BLOCK_E=cfg.block_e,
            BLOCK_P=cfg.block_p,
            num_warps=cfg.num_warps,
        )
        # z_loss saturates as on the torch path (reference.saturated_z_loss): the float32 sum of
        # lse^2 overflows for router logits beyond ~1.8e19; a saturated value has no gradient.
        z_ok = z_loss <= torch.finfo(torch.float32).max
        z_loss = torch.where(z_ok, z_loss, torch.finfo(torch.float32).max)
        ctx.save_for_backward(logits, task_bias, ids, counts, z_ok)
        ctx.k, ctx.renormalize, ctx.cfg = k, renormalize, cfg
        ctx.mark_non_differentiable(ids, counts, offsets, order)
        return weights, mean_probs, z_loss, lb_loss, ids, counts, offsets, order

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_w, grad_mean, grad_z, grad_lb = grads[:4]
        logits, task_bias, ids, counts, z_ok = ctx.saved_tensors
        grad_z = torch.where(z_ok, grad_z, 0.0)
        n, e = logits.shape
        cfg = ctx.cfg
        need_logits, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the bias gradient comes from a float32 gradient (an [E] bias's is a column sum of it)
        fp32_grad = need_bias and logits.dtype != torch.float32
        grad_x = torch.empty(
            n, e, dtype=torch.float32 if fp32_grad else logits.dtype, device=logits.device
        )
        has_bias = task_bias is not None
        _kernels().bwd[(triton.cdiv(n, cfg.block_n),)](
            logits,
            task_bias if has_bias else logits,
            ids,
            grad_w,
            grad_mean.contiguous(),
            grad_z,
            grad_lb,
            counts,
            grad_x,
            n,
            e,
            e,
            (e if task_bias.dim() == 2 else 0) if has_bias else 0,
            grad_w.stride(0),
            grad_w.stride(1),
            K=ctx.k,
            HAS_BIAS=has_bias,
            RENORMALIZE=ctx.renormalize,
            BLOCK_N=cfg.block_n,
            BLOCK_E=cfg.block_e,
            num_warps=cfg.num_warps,
        )
        grad_logits = grad_x.to(logits.dtype) if need_logits else None
        grad_bias = None
        if need_bias:
            grad_bias = grad_x.sum(0) if task_bias.dim() == 1 else grad_x
            grad_bias = grad_bias.to(task_bias.dtype)
        return grad_logits, grad_bias, None, None, None


def triton_topk_gating(
    logits: torch.Tensor,
    k: int,
    task_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    *,
    block_n: int | None = None,
    num_programs: int | None = None,
) -> GatingOutput:
    """``topk_gating`` on the Triton kernels (inputs already validated by ``topk_gating``)."""
    n, e = logits.shape
    if n == 0:  # nothing to launch; the reference handles the empty batch
        from .reference import reference_topk_gating

        out = reference_topk_gating(logits, k, task_bias=task_bias, renormalize=renormalize)
        return dataclasses.replace(out, backend="triton")
    if not logits.is_cuda and not triton_interpreted():
        raise RuntimeError(
            "Triton kernels on CPU tensors need the Triton interpreter, and TRITON_INTERPRET=1 "
            "must be set before triton is first imported (this process imported it without)"
        )
    cfg = launch_config(n, e, k, logits.device, block_n=block_n, num_programs=num_programs)
    logits = logits.contiguous()
    if task_bias is not None:
        task_bias = task_bias.contiguous()
    weights, mean_probs, z_loss, lb_loss, ids, counts, offsets, order = _TritonGating.apply(
        logits, task_bias, k, bool(renormalize), cfg
    )
    return GatingOutput(
        weights=weights,
        expert_ids=ids,
        expert_counts=counts,
        mean_probs=mean_probs,
        z_loss=z_loss,
        load_balancing_loss=lb_loss,
        expert_offsets=offsets,
        dispatch_order=order,
        backend="triton",
    )
