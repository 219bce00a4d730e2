"""Branch-free solvers that run where the Gram matrix lives: no host-device synchronisation.

The default solvers (:mod:`pub_optim.solvers.nash_newton`, the active-set min-norm method, the
pseudo-inverse of IMTL-G) copy the K x K Gram matrix to the host and branch on its values. On a
CUDA device that is a synchronisation per step: the host waits for the whole backward pass and the
Gram reduction before it can queue the update. The solvers here express the same rules as a fixed
sequence of tensor operations (every decision a ``torch.where``; linear systems through
``torch.linalg.solve_ex``, which reports failures in a tensor instead of raising), so the host
queues them and moves on. They take more arithmetic than the host solvers (fixed iteration counts,
every fallback computed side by side) and on a CPU they are slower: :class:`pub_optim.PUB` uses
them only with ``sync_free=True``.

Each function takes a float64 ``K x K`` matrix with mean diagonal one over the active tasks in
which an inactive task (zero update) is an orthogonal unit row (see
:meth:`pub_optim.UpdateBalancer.device_weights`), and returns raw weights on the same device.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch import Tensor

from .nash_newton import (
    _ACCEPT_RESIDUAL,
    _MIN_BALANCE,
    _PURE_NEWTON_DECREMENT,
    _RUN_OFF,
    FALLBACK_RIDGE,
)

#: Damped Newton iterations per ridge: the host solver's ``max_iter``, so that every attempt the
#: host accepts converges within it here too. (Over 1,400 sampled and conflicting matrices the
#: accepted attempt took a median of 12 and at most 60 iterations on the host.)
NASH_ITERATIONS = 100
#: Ridges tried side by side, relative to the mean diagonal: 0, then the host solver's ladder.
NASH_RIDGES = (0.0, *(FALLBACK_RIDGE * 100.0**i for i in range(8)))

NashBackend = Literal["auto", "torch", "triton"]

#: The min-norm solver enumerates the 2^K - 1 supports: K x K systems, batched.
MIN_NORM_MAX_TASKS = 12


def nash_weights(
    gram: Tensor,
    active: Tensor,
    backend: NashBackend = "auto",
    iterations: int = NASH_ITERATIONS,
) -> Tensor:
    """Nash bargaining weights ``alpha_k (G alpha)_k = 1`` (Navon et al., ICML 2022).

    The host rule of :func:`~pub_optim.solvers.nash_newton.solve_nash_newton`, without branches:
    the same damped Newton method (step ``1/(1 + lam)`` until the Newton decrement ``lam`` is
    below 1/4, full steps after) from the same start, run for a fixed :data:`NASH_ITERATIONS`
    on ``G`` and on every ridge-regularised ``G + r I`` of the host's ladder at once (nine
    attempts); the result is the first of them whose iterate stayed positive and bounded and
    reached a Nash residual below 1e-6, exactly the attempt the host solver would accept.
    ``active`` is not needed: an inactive task's unit row is solved exactly apart (weight 1).

    ``backend``: ``"torch"`` (about 3,500 small operators), ``"triton"`` (one kernel launch,
    :mod:`pub_optim.kernels.nash_triton`; CUDA tensors, or CPU tensors under the Triton
    interpreter), ``"auto"``: Triton for CUDA tensors when it is installed, else torch.
    ``iterations``: Newton iterations per attempt (tests compare the backends at small counts).
    """
    ridges = _ridges_on(gram) * torch.diagonal(gram).mean()
    if _use_triton(gram, backend):
        alpha, accepted = _nash_attempts_triton(gram, ridges, iterations)
    else:
        alpha, accepted = _nash_attempts_torch(gram, ridges, iterations)
    # First accepted attempt (the host tries them in this order); none: the host's last resort.
    index = torch.argmax(accepted.to(torch.int8), dim=0)
    chosen = alpha.index_select(0, index.reshape(1))[0]  # (``alpha[index]`` reads index)
    last_resort = (torch.diagonal(gram) + ridges[-1]).rsqrt()
    return torch.where(accepted.any(), chosen, last_resort)


def _nash_attempts_torch(gram: Tensor, ridges: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Every attempt's final iterate ``[R, K]`` and whether it is accepted ``[R]``."""
    k = gram.shape[-1]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    grams = gram + ridges[:, None, None] * eye  # [R, K, K]
    diagonal = torch.diagonal(grams, dim1=-2, dim2=-1)
    inv_norm = diagonal.rsqrt()
    # Start: one symmetric Sinkhorn step (the host's ``_balanced_point``) where C 1 is clearly
    # positive, else the best multiple of 1/|d_k| (``_initial_point``).
    row = (grams @ inv_norm.unsqueeze(-1)).squeeze(-1) * inv_norm
    balanced = row.rsqrt() * inv_norm
    curvature = (inv_norm.unsqueeze(-2) @ grams @ inv_norm.unsqueeze(-1)).squeeze(-1)
    plain = inv_norm * torch.sqrt(k / torch.clamp(curvature, min=1e-300))
    use_balanced = (row.min(dim=-1, keepdim=True).values > _MIN_BALANCE).expand_as(row)
    alpha = torch.where(use_balanced, balanced, plain)
    limit = _RUN_OFF * inv_norm.max(dim=-1, keepdim=True).values
    dead = ~(curvature.squeeze(-1) > 0) & ~use_balanced[:, 0]
    dead = dead | ~(alpha.max(dim=-1).values <= limit.squeeze(-1))
    alpha = torch.where(dead[:, None], 1.0, alpha)
    for _ in range(iterations):
        inv = alpha.reciprocal()
        gradient = (grams @ alpha.unsqueeze(-1)).squeeze(-1) - inv
        hessian = grams + torch.diag_embed(inv * inv)
        step, info = torch.linalg.solve_ex(hessian, gradient)
        decrement = (gradient * step).sum(dim=-1, keepdim=True)
        damping = torch.where(
            decrement > _PURE_NEWTON_DECREMENT,
            1.0 / (1.0 + torch.sqrt(torch.clamp(decrement, min=0.0))),
            1.0,
        )
        candidate = alpha - damping * step
        failed = (info != 0) | ~(decrement >= 0).squeeze(-1)
        failed = failed | ~(candidate.max(dim=-1).values <= limit.squeeze(-1))
        failed = failed | ~(candidate.min(dim=-1).values > 0)
        dead = dead | failed
        alpha = torch.where(dead[:, None], alpha, candidate)
    product = alpha * (grams @ alpha.unsqueeze(-1)).squeeze(-1)
    residual = torch.linalg.vector_norm(product - 1.0, dim=-1)  # the host's (Euclidean) test
    return alpha, ~dead & (residual <= _ACCEPT_RESIDUAL)


def _nash_attempts_triton(gram: Tensor, ridges: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    from ..kernels import nash_triton

    k = gram.shape[-1]
    gram = gram.contiguous()
    alpha = gram.new_empty((len(NASH_RIDGES), k))
    accepted = torch.empty(len(NASH_RIDGES), dtype=torch.int8, device=gram.device)
    nash_triton.nash_kernel()[(len(NASH_RIDGES),)](
        gram,
        ridges.contiguous(),
        alpha,
        accepted,
        k,
        gram.stride(0),
        ITERATIONS=iterations,
        BLOCK_K=nash_triton.block_size(k),
        MIN_BALANCE=_MIN_BALANCE,
        RUN_OFF=_RUN_OFF,
        PURE_NEWTON_DECREMENT=_PURE_NEWTON_DECREMENT,
        ACCEPT_RESIDUAL=_ACCEPT_RESIDUAL,
    )
    return alpha, accepted.bool()


def _use_triton(gram: Tensor, backend: NashBackend) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not gram.is_cuda):
        return False
    try:
        from ..kernels import nash_triton
    except ImportError:
        if backend == "triton":
            raise ImportError(
                "backend='triton' needs the triton package: pip install 'pub-optim[triton]'"
            ) from None
        _warn_without_triton()
        return False
    if backend == "auto":
        return not nash_triton.interpreted()
    if not gram.is_cuda and not nash_triton.interpreted():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 "
            "before triton is first imported); use backend='torch'"
        )
    return True


@functools.cache
def _warn_without_triton() -> None:
    warnings.warn(
        "the synchronisation-free Nash solver runs as ~3,500 small torch operators on CUDA "
        "without triton (one kernel launch with it): pip install 'pub-optim[triton]'",
        RuntimeWarning,
        stacklevel=4,
    )


def _ridges_on(gram: Tensor) -> Tensor:
    # A tensor built from Python floats is a host-to-device copy (and a synchronisation, from
    # pageable memory); computed on the device it is not: 0, then 1e-8 * 100^i.
    exponents = torch.arange(len(NASH_RIDGES) - 1, dtype=gram.dtype, device=gram.device)
    ladder = FALLBACK_RIDGE * torch.pow(100.0, exponents)
    return torch.cat([ladder.new_zeros(1), ladder])


def min_norm_weights(gram: Tensor, active: Tensor) -> Tensor:
    """``argmin_{alpha in simplex, alpha_k = 0 off active} alpha^T G alpha`` (MGDA, Sener & Koltun
    2018), by enumeration: for every support ``S`` the candidate ``G_S^-1 1`` normalised; the
    answer is the candidate of smallest objective among those with non-negative weights.

    The minimiser's own support is among the candidates (its KKT conditions say that
    ``G_S alpha_S`` is constant), and every admissible candidate lies in the simplex, so the
    smallest objective among them is the minimum. ``2^K - 1`` batched K x K solves: exact, and
    cheap for the K of multi-task models; limited to :data:`MIN_NORM_MAX_TASKS` tasks.
    """
    k = gram.shape[-1]
    if k > MIN_NORM_MAX_TASKS:
        raise ValueError(
            f"the synchronisation-free min-norm solver enumerates 2^K supports and supports up to "
            f"{MIN_NORM_MAX_TASKS} tasks, got K = {k}: use sync_free=False for more tasks"
        )
    device = gram.device
    codes = torch.arange(1, 2**k, device=device)
    supports = ((codes[:, None] >> torch.arange(k, device=device)) & 1).bool()  # [S, K]
    pair = supports[:, :, None] & supports[:, None, :]
    eye = torch.eye(k, dtype=gram.dtype, device=device)
    systems = torch.where(pair, gram, eye)
    rhs = supports.to(gram.dtype)
    solution, info = torch.linalg.solve_ex(systems, rhs)
    total = solution.sum(dim=-1, keepdim=True)
    alpha = torch.where(supports, solution, 0.0) / torch.where(total > 0, total, 1.0)
    objective = (alpha * (alpha @ gram)).sum(dim=-1)
    admissible = (
        (info == 0)
        & (total.squeeze(-1) > 0)
        & (alpha >= 0).all(dim=-1)
        & torch.isfinite(objective)
        & ~(supports & ~active).any(dim=-1)
    )
    best = torch.argmin(torch.where(admissible, objective, torch.inf))
    fallback = active.to(gram.dtype) / torch.clamp(active.sum(), min=1)
    return torch.where(admissible.any(), alpha.index_select(0, best.reshape(1))[0], fallback)


#: Ridge of the equal-projection system (on the cosine matrix, whose diagonal is one): stands in
#: for the pseudo-inverse's cut-off, which needs an eigendecomposition (that synchronises on CUDA).
EQUAL_PROJECTION_RIDGE = 1e-10
#: Steps of iterative refinement after the ridge solve: each one multiplies the ridge's error
#: along an eigenvector of eigenvalue ``lam`` by ``ridge / (lam + ridge)``, so that the solution
#: matches the pseudo-inverse one to ~1e-9 for cosine matrices of condition number up to ~1e6 and
#: to ~1e-6 up to ~1e8 (the ridge alone: ~1e-10 * cond relative).
EQUAL_PROJECTION_REFINEMENTS = 5


def equal_projection_weights(gram: Tensor, active: Tensor, exact_rtol: float) -> Tensor:
    """Weights whose joint update projects equally on every unit task update (IMTL-G, Liu et
    al., ICLR 2021): ``G alpha = sqrt(diag G)``, normalised to sum to one.

    Solved, like the host strategy, in the scaled coordinates ``beta_k = alpha_k |d_k|``:
    ``C beta = 1`` for the cosine matrix ``C = D^-1 G D^-1`` (``D = diag(|d_k|)``), whose
    conditioning does not depend on how different the update norms are. ``(C + 1e-10 I)`` is
    factored once (Cholesky) and the ridge solution refined five times, which brings it to the
    pseudo-inverse solution (on a singular ``C`` both have no component along its null space).
    Same fallback rule as the host strategy: equal weights where no exact solution (every
    projection ``(C beta)_k`` within ``exact_rtol`` of one) with a positive sum exists. The sums
    run over the ``active`` tasks only (an inactive task's unit row gets weight ~1, set to zero
    by the caller).
    """
    k = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram))
    cosines = gram / (norms[:, None] * norms[None, :])
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    cosines = torch.where(eye.bool(), 1.0, cosines)
    ones = torch.ones(k, 1, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(cosines + EQUAL_PROJECTION_RIDGE * eye)
    beta = torch.cholesky_solve(ones, factor)
    for _ in range(EQUAL_PROJECTION_REFINEMENTS):
        beta = beta + torch.cholesky_solve(ones - cosines @ beta, factor)
    mismatch = (cosines @ beta - ones).abs().max()
    alpha = torch.where(active, beta[:, 0] / norms, 0.0)
    total = alpha.sum()
    exact = (info == 0) & (mismatch <= exact_rtol) & torch.isfinite(total)
    usable = exact & (total > 1e-9 * alpha.abs().sum())
    fallback = active.to(gram.dtype) / torch.clamp(active.sum(), min=1)
    return torch.where(usable, alpha / torch.where(usable, total, 1.0), fallback)
