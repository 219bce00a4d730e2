"""Triton kernels of the fused top-k gating (launched by :mod:`.triton_ops`).

Three kernels, all computing in float32 whatever the input dtype:

* ``gating_fwd_kernel`` (persistent: program ``p`` owns the contiguous rows
  ``[p * rows_per_prog, (p + 1) * rows_per_prog)`` and walks them in tiles of ``BLOCK_N`` rows):
  sanitise the router logits, softmax, top-k selection, (renormalised) weights and ids, plus the
  program's partial sums: per-expert selection counts, probability sums and ``sum lse^2``.
* ``gating_dispatch_kernel`` (same row ownership): every program reduces the partial counts to the
  totals and to the counts of the programs before it, which gives where its rows go in the
  expert-grouped order; it then writes ``dispatch_order`` for its rows with a cumulative sum over
  its tiles. Program 0 also writes ``expert_counts``, ``expert_offsets``, ``mean_probs``,
  ``z_loss`` and ``load_balancing_loss``. No atomics, no host synchronisation, deterministic.
* ``gating_bwd_kernel`` (one program per tile of rows): the gradient w.r.t. the router logits
  through the weights, ``mean_probs`` (hence the load-balancing loss) and the z-loss.

Selection packs each (logit, expert id) pair into one int64 key: the high 32 bits are the float's
sign-magnitude bits as a two's complement integer (same order; ``-0.0`` and ``+0.0`` both 0), the
low 32 bits ``BLOCK_E - 1 - id``; a row maximum of the keys is then the largest logit with the
lowest id among equals, and a picked key is replaced by a sentinel below every valid key. This is
the value-index packing of Triton's own ``topk``; the key also decodes back to the logit.

The functions are plain Python here; :func:`build_kernels` wraps them as compiled
(``JITFunction``) or interpreted (``InterpretedFunction``) kernels. The mode must match the one
triton's own language functions (``tl.max``, ``tl.sum``, ...) were created in, which triton fixes
when it is first imported; ``triton_ops`` passes that mode. The sanitising and softmax code is
written out in both the forward and the backward kernel (a ``@triton.jit`` helper would be of one
mode only): keep the two copies identical.
"""

# Kernel parameters are typed by Triton at launch (pointers, ints, constexprs), not by annotations.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import triton.language as tl

__all__ = ["GatingKernels", "build_kernels"]


def gating_fwd_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    part_counts_ptr,
    part_probs_ptr,
    part_z_ptr,
    n_rows,
    n_experts,
    rows_per_prog,
    stride_logits,
    stride_bias,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row_begin = pid * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < n_experts
    slots = tl.arange(0, BLOCK_K)
    acc_probs = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    acc_counts = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.int32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(row_begin, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        # ---- router probabilities (identical in gating_bwd_kernel) ----
        x = tl.load(
            logits_ptr + rows64[:, None] * stride_logits + cols[None, :],
            mask=mask,
            other=float("-inf"),
        ).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(
                bias_ptr + rows64[:, None] * stride_bias + cols[None, :], mask=mask, other=0.0
            )
            x = x + b.to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        x_max = tl.max(x, axis=1)
        pos_inf_row = x_max == float("inf")
        neg_inf_row = x_max == float("-inf")
        y = tl.where(pos_inf_row[:, None], tl.where(x == float("inf"), 0.0, float("-inf")), x)
        y = tl.where(neg_inf_row[:, None], 0.0, y)
        y = tl.where(col_ok[None, :], y, float("-inf"))
        y_max = tl.max(y, axis=1)
        ex = tl.exp(y - y_max[:, None])
        denom = tl.sum(ex, axis=1)
        probs = ex / denom[:, None]
        lse = y_max + tl.log(denom)
        # ---- top-k on packed (logit, id) keys ----
        bits = y.to(tl.int32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        key = tl.where(bits < 0, -magnitude, magnitude)  # order-preserving; -0.0 and +0.0 -> 0
        packed = (key.to(tl.int64) << 32) | (BLOCK_E - 1 - cols).to(tl.int64)[None, :]
        packed = tl.where(col_ok[None, :], packed, -9223372036854775807)
        sel_ids = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int64)
        sel_probs = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.max(packed, axis=1)
            idx = (BLOCK_E - 1) - (best & (BLOCK_E - 1)).to(tl.int32)
            best_key = (best >> 32).to(tl.int32)
            best_abs = tl.abs(best_key).to(tl.float32, bitcast=True)
            best_y = tl.where(best_key < 0, -best_abs, best_abs)
            p_j = tl.exp(best_y - y_max) / denom
            sel_ids = tl.where(slots[None, :] == j, idx.to(tl.int64)[:, None], sel_ids)
            sel_probs = tl.where(slots[None, :] == j, p_j[:, None], sel_probs)
            packed = tl.where(cols[None, :] == idx[:, None], -9223372036854775807, packed)
        if RENORMALIZE:
            sel_probs = sel_probs / tl.sum(sel_probs, axis=1)[:, None]
        out_mask = row_ok[:, None] & (slots < K)[None, :]
        out_offs = rows64[:, None] * K + slots[None, :]
        tl.store(weights_ptr + out_offs, sel_probs, mask=out_mask)
        tl.store(ids_ptr + out_offs, sel_ids, mask=out_mask)
        chosen = (packed == -9223372036854775807) & mask
        acc_counts += chosen.to(tl.int32)
        acc_probs += tl.where(mask, probs, 0.0)
        acc_z += tl.where(row_ok, lse * lse, 0.0)
    tl.store(part_counts_ptr + pid * n_experts + cols, tl.sum(acc_counts, axis=0), mask=col_ok)
    tl.store(part_probs_ptr + pid * n_experts + cols, tl.sum(acc_probs, axis=0), mask=col_ok)
    tl.store(part_z_ptr + pid, tl.sum(acc_z, axis=0))


def gating_dispatch_kernel(
    ids_ptr,
    part_counts_ptr,
    part_probs_ptr,
    part_z_ptr,
    counts_ptr,
    offsets_ptr,
    mean_probs_ptr,
    z_ptr,
    lb_ptr,
    order_ptr,
    n_rows,
    n_experts,
    n_parts,
    rows_per_prog,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < n_experts
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    before = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        pmask = (parts < n_parts)[:, None] & col_ok[None, :]
        c = tl.load(
            part_counts_ptr + parts[:, None] * n_experts + cols[None, :], mask=pmask, other=0
        )
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((parts < pid)[:, None], c, 0), axis=0)
    first = tl.cumsum(total, axis=0) - total  # exclusive prefix sum: expert offsets
    if pid == 0:
        tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + cols, first.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + n_experts, tl.sum(total, axis=0).to(tl.int64))
        prob_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
        z_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)
            pmask = (parts < n_parts)[:, None] & col_ok[None, :]
            pp = tl.load(
                part_probs_ptr + parts[:, None] * n_experts + cols[None, :], mask=pmask, other=0.0
            )
            prob_sum += tl.sum(pp, axis=0)
            z_sum += tl.load(part_z_ptr + parts, mask=parts < n_parts, other=0.0)
        mean_probs = prob_sum / n_rows
        tl.store(mean_probs_ptr + cols, mean_probs, mask=col_ok)
        tl.store(z_ptr, tl.sum(z_sum, axis=0) / n_rows)
        load = total.to(tl.float32) / (n_rows * K)
        tl.store(lb_ptr, n_experts * tl.sum(load * mean_probs, axis=0))
    # This program's (example, slot) pairs, in flat order: the ids of a row are distinct, so the
    # rank of a pair within its expert is a cumulative sum over rows of "row picked the expert".
    running = first + before
    row_begin = pid * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, n_rows)
    for start in range(row_begin, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        picked = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.int32)
        for j in tl.static_range(K):
            e_j = tl.load(ids_ptr + rows64 * K + j, mask=row_ok, other=-1)
            picked += (cols[None, :] == e_j[:, None]).to(tl.int32)
        rank = tl.cumsum(picked, axis=0) - picked + running[None, :]
        for j in tl.static_range(K):
            e_j = tl.load(ids_ptr + rows64 * K + j, mask=row_ok, other=-1)
            dest = tl.sum(tl.where(cols[None, :] == e_j[:, None], rank, 0), axis=1)
            tl.store(order_ptr + dest, rows64 * K + j, mask=row_ok)
        running += tl.sum(picked, axis=0)


def gating_bwd_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    grad_w_ptr,
    grad_mean_ptr,
    grad_z_ptr,
    grad_lb_ptr,
    counts_ptr,
    grad_x_ptr,
    n_rows,
    n_experts,
    stride_logits,
    stride_bias,
    stride_gw_row,
    stride_gw_slot,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < n_experts
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    # ---- router probabilities (identical in gating_fwd_kernel) ----
    x = tl.load(
        logits_ptr + rows64[:, None] * stride_logits + cols[None, :],
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rows64[:, None] * stride_bias + cols[None, :], mask=mask, other=0.0)
        x = x + b.to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    x_max = tl.max(x, axis=1)
    pos_inf_row = x_max == float("inf")
    neg_inf_row = x_max == float("-inf")
    y = tl.where(pos_inf_row[:, None], tl.where(x == float("inf"), 0.0, float("-inf")), x)
    y = tl.where(neg_inf_row[:, None], 0.0, y)
    y = tl.where(col_ok[None, :], y, float("-inf"))
    y_max = tl.max(y, axis=1)
    ex = tl.exp(y - y_max[:, None])
    denom = tl.sum(ex, axis=1)
    probs = ex / denom[:, None]
    lse = y_max + tl.log(denom)
    # ---- d loss / d probs: mean_probs (with the load-balancing loss) and the weights ----
    grad_z = tl.load(grad_z_ptr)
    grad_lb = tl.load(grad_lb_ptr)
    counts = tl.load(counts_ptr + cols, mask=col_ok, other=0).to(tl.float32)
    grad_mean = tl.load(grad_mean_ptr + cols, mask=col_ok, other=0.0)
    grad_mean = grad_mean + grad_lb * n_experts * counts / (n_rows * K)
    grad_p = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32) + (grad_mean / n_rows)[None, :]
    gw_offs = rows64 * stride_gw_row
    if RENORMALIZE:
        sel_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            e_j = tl.load(ids_ptr + rows64 * K + j, mask=row_ok, other=-1)
            g_j = tl.load(grad_w_ptr + gw_offs + j * stride_gw_slot, mask=row_ok, other=0.0)
            p_j = tl.sum(tl.where(cols[None, :] == e_j[:, None], probs, 0.0), axis=1)
            sel_sum += p_j
            dot += g_j * p_j
        inv_sum = 1.0 / tl.where(row_ok, sel_sum, 1.0)
        for j in tl.static_range(K):
            e_j = tl.load(ids_ptr + rows64 * K + j, mask=row_ok, other=-1)
            g_j = tl.load(grad_w_ptr + gw_offs + j * stride_gw_slot, mask=row_ok, other=0.0)
            coef = (g_j - dot * inv_sum) * inv_sum
            grad_p += tl.where(cols[None, :] == e_j[:, None], coef[:, None], 0.0)
    else:
        for j in tl.static_range(K):
            e_j = tl.load(ids_ptr + rows64 * K + j, mask=row_ok, other=-1)
            g_j = tl.load(grad_w_ptr + gw_offs + j * stride_gw_slot, mask=row_ok, other=0.0)
            grad_p += tl.where(cols[None, :] == e_j[:, None], g_j[:, None], 0.0)
    # ---- softmax and logsumexp backward; rows without a finite maximum pass no gradient ----
    inner = tl.sum(probs * grad_p, axis=1)
    grad_y = probs * (grad_p - inner[:, None] + ((2.0 * grad_z / n_rows) * lse)[:, None])
    finite_row = (x_max != float("inf")) & (x_max != float("-inf"))
    grad_y = tl.where(finite_row[:, None], grad_y, 0.0)
    tl.store(
        grad_x_ptr + rows64[:, None] * n_experts + cols[None, :],
        grad_y.to(grad_x_ptr.dtype.element_ty),
        mask=mask,
    )


class GatingKernels(NamedTuple):
    """The three gating kernels, all compiled or all interpreted."""

    fwd: Any
    dispatch: Any
    bwd: Any


@functools.cache
def build_kernels(interpret: bool) -> GatingKernels:
    """Wrap the kernel functions as Triton kernels (``interpret``: run under the interpreter)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    return GatingKernels(
        fwd=wrap(gating_fwd_kernel),
        dispatch=wrap(gating_dispatch_kernel),
        bwd=wrap(gating_bwd_kernel),
    )
