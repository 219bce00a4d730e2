"""The synchronisation-free Nash solver as one Triton kernel launch.

:func:`pub_optim.solvers.device.nash_weights` in plain torch is a fixed sequence of about 3,500
small operators (100 damped Newton iterations over a batch of nine ridge-regularised K x K
systems); on a GPU each is a kernel launch of a few microseconds. This kernel runs the same
iterations with the matrix in registers: one program per ridge, the K x K Newton system solved
in place by Gauss-Jordan elimination without pivoting (the Hessian ``G + diag(1/alpha^2)`` is
symmetric positive definite), float64 throughout. The selection of the accepted attempt is the
torch epilogue shared with the torch path. Same formulas, same decisions; the test suite
compares the two under the Triton interpreter.

The kernel function is plain Python here; :func:`nash_kernel` wraps it in the mode (compiled or
interpreted) that triton fixed when it was first imported.
"""

# Kernel parameters are typed by Triton at launch (pointers, ints, constexprs), not by annotations.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import functools
from typing import Any

import triton
import triton.language as tl


def nash_newton_kernel(
    gram_ptr,
    ridge_ptr,
    alpha_ptr,
    accepted_ptr,
    k,
    stride,
    ITERATIONS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MIN_BALANCE: tl.constexpr,
    RUN_OFF: tl.constexpr,
    PURE_NEWTON_DECREMENT: tl.constexpr,
    ACCEPT_RESIDUAL: tl.constexpr,
):
    """Program ``r``: damped Newton on ``G + ridge[r] I`` (see ``solvers/device.py``; the
    thresholds are the host solver's, passed in by the caller)."""
    r = tl.program_id(0)
    idx = tl.arange(0, BLOCK_K)
    rows = idx[:, None]
    cols = idx[None, :]
    valid = idx < k
    inside = (rows < k) & (cols < k)
    eye = rows == cols
    gram = tl.load(gram_ptr + rows * stride + cols, mask=inside, other=0.0)
    ridge = tl.load(ridge_ptr + r)
    gram = gram + tl.where(eye & inside, ridge, 0.0)
    diagonal = tl.sum(tl.where(eye, gram, 0.0), axis=1)
    inv_norm = tl.where(valid, 1.0 / tl.sqrt(tl.where(valid, diagonal, 1.0)), 0.0)
    g_inv = tl.sum(gram * inv_norm[None, :], axis=1)
    row = g_inv * inv_norm  # C 1
    balanced = inv_norm / tl.sqrt(tl.where(valid & (row > 0), row, 1.0))
    curvature = tl.sum(inv_norm * g_inv)
    plain = inv_norm * tl.sqrt(k / tl.maximum(curvature, 1e-300))
    use_balanced = tl.min(tl.where(valid, row, float("inf"))) > MIN_BALANCE
    alpha = tl.where(use_balanced, balanced, plain)
    limit = RUN_OFF * tl.max(inv_norm)
    dead = (curvature <= 0) & (use_balanced == 0)
    dead = dead | ~(tl.max(tl.where(valid, alpha, 0.0)) <= limit)
    alpha = tl.where(dead, tl.where(valid, 1.0, 0.0), alpha)
    for _ in range(ITERATIONS):
        inv = tl.where(valid, 1.0 / tl.where(valid, alpha, 1.0), 0.0)
        gradient = tl.sum(gram * alpha[None, :], axis=1) - inv
        system = gram + tl.where(eye, tl.where(rows < k, (inv * inv)[:, None], 1.0), 0.0)
        solution = gradient
        for p in tl.static_range(BLOCK_K):  # Gauss-Jordan: eliminate column p from other rows
            pivot_row = tl.sum(tl.where(rows == p, system, 0.0), axis=0)
            pivot_col = tl.sum(tl.where(cols == p, system, 0.0), axis=1)
            pivot = tl.sum(tl.where(idx == p, pivot_row, 0.0))
            target = tl.sum(tl.where(idx == p, solution, 0.0))
            factor = tl.where(idx == p, 0.0, pivot_col / pivot)
            system = system - factor[:, None] * pivot_row[None, :]
            solution = solution - factor * target
        step = solution / tl.sum(tl.where(eye, system, 0.0), axis=1)
        decrement = tl.sum(gradient * step)
        damping = tl.where(
            decrement > PURE_NEWTON_DECREMENT,
            1.0 / (1.0 + tl.sqrt(tl.maximum(decrement, 0.0))),
            1.0,
        )
        candidate = alpha - damping * step
        highest = tl.max(tl.where(valid, candidate, float("-inf")))
        lowest = tl.min(tl.where(valid, candidate, float("inf")))
        failed = ~(decrement >= 0) | ~(highest <= limit) | ~(lowest > 0)
        dead = dead | failed
        alpha = tl.where(dead, alpha, candidate)
    product = alpha * tl.sum(gram * alpha[None, :], axis=1)
    mismatch = tl.where(valid, product - 1.0, 0.0)
    residual = tl.sqrt(tl.sum(mismatch * mismatch))
    accepted = (dead == 0) & (residual <= ACCEPT_RESIDUAL)
    tl.store(alpha_ptr + r * k + idx, alpha, mask=valid)
    tl.store(accepted_ptr + r, accepted.to(tl.int8))


def interpreted() -> bool:
    """Whether triton runs under its interpreter in this process (fixed at its first import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


@functools.cache
def nash_kernel() -> Any:
    """The kernel, compiled or interpreted as triton's own functions are."""
    if interpreted():
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    return wrap(nash_newton_kernel)


def block_size(k: int) -> int:
    return max(2, triton.next_power_of_2(k))
