"""CAGrad as a Gram-matrix strategy: Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021 (arXiv:2110.14048), Algorithm 1.

CAGrad looks for the step ``d`` in a ball around the average vector ``g0 = (1/K) sum_k g_k`` that
maximises the worst task's improvement: ``max_d min_k <g_k, d>`` s.t. ``||d - g0|| <= c ||g0||``.
Its dual is a small convex problem over the simplex,

    w* = argmin_{w in simplex}  <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_k w_k g_k,
    phi = c^2 ||g0||^2,

and the step is ``d = g0 + (sqrt(phi) / ||g_w*||) g_w*``. With ``b = G 1 / K``,
``<g_w, g0> = w^T b``, ``||g_w||^2 = w^T G w`` and ``||g0||^2 = 1^T G 1 / K^2``: everything depends
only on the Gram matrix, so CAGrad is an :class:`UpdateBalancer` with weights
``alpha = 1/K + (sqrt(phi) / ||g_w*||) w*``.

The dual is solved exactly (to rounding) by a primal active-set method whose equality-constrained
subproblems have a closed form (see :func:`cagrad_dual`); the reference code uses
``scipy.optimize.minimize`` (SLSQP) and TorchJD uses cvxpy, neither of which the core depends on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import Normalization, UpdateBalancer

#: Ridge on the (mean-diagonal-one) Gram matrix used by the dual solver: makes ``G`` positive
#: definite (a strictly convex dual with a unique minimiser) when task vectors are colinear.
CAGRAD_RIDGE = 1e-10
#: A KKT multiplier of a bound counts as negative below ``-KKT_TOL`` (relative).
KKT_TOL = 1e-10
#: Two task vectors count as identical when ``|g_i - g_j|^2`` is below this fraction of
#: ``|g_i|^2 + |g_j|^2`` (rounding in a Gram matrix is ~1e-16 of its entries).
DUPLICATE_RTOL = 1e-12


def _share_among_duplicates(gram: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``w`` with the weight of each group of identical task vectors shared equally in the group.

    The dual depends on ``w`` only through ``g_w = sum_k w_k g_k``, so moving weight between
    identical vectors leaves its value unchanged: every such split is a minimiser. Which one
    the active-set method reaches depends on the order of the tasks (the ridge that would pick
    the symmetric one is below its tolerance); sharing equally is the symmetric choice, the same
    whatever the order.
    """
    diag = np.diag(gram)
    spread = diag[:, None] + diag[None, :]
    same = spread - 2.0 * gram <= DUPLICATE_RTOL * spread
    labels = np.argmax(same, axis=1)  # the first task identical to each one
    if np.array_equal(labels, np.arange(len(w))):
        return w
    totals = np.bincount(labels, weights=w)
    counts = np.bincount(labels)
    return totals[labels] / counts[labels]


def _subproblem(
    gram: np.ndarray, b: np.ndarray, s: float, support: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Minimise ``f(w) = b^T w + s sqrt(w^T G w)`` over ``sum(w) = 1`` with ``w`` zero off
    ``support`` (no sign constraints).

    Returns ``(target, None)`` with the minimiser, or ``(u, v)`` when ``f`` is unbounded below along
    ``u + t v`` (``t -> inf``), ``v`` a direction with ``sum(v) = 0``.

    On the support the stationarity conditions ``b + s G w / sqrt(w^T G w) = lambda 1`` give
    ``w = u + t v`` with ``u = G^-1 1 / (1^T G^-1 1)`` (the min-norm affine point, ``G u`` constant,
    so ``u^T G v = 0``), ``v = u (1^T G^-1 b) - G^-1 b`` and ``t = sqrt(w^T G w) / s``, whence
    ``t^2 = u^T G u / (s^2 - v^T G v)``: a minimiser exists iff ``s^2 > v^T G v``.
    """
    sub = gram[np.ix_(support, support)]
    solved = np.linalg.solve(sub, np.stack([np.ones(len(support)), b[support]], axis=1))
    x1, xb = solved[:, 0], solved[:, 1]
    a = float(x1.sum())
    u = x1 / a
    v = u * float(xb.sum()) - xb
    uGu = 1.0 / a
    vGv = max(float(v @ sub @ v), 0.0)
    k = gram.shape[0]
    full_u, full_v = np.zeros(k), np.zeros(k)
    full_u[support], full_v[support] = u, v
    if s * s > vGv * (1.0 + 1e-12):
        t = math.sqrt(uGu / (s * s - vGv))
        return full_u + t * full_v, None
    return full_u, full_v


def cagrad_dual(
    gram: np.ndarray, c: float, ridge: float = 0.0, max_iter: int = 1000
) -> tuple[np.ndarray, float]:
    """``(w*, sqrt(phi))`` of CAGrad's dual.

    ``w* = argmin_{w in simplex} b^T w + sqrt(phi) sqrt(w^T (G + ridge I) w)`` with ``b = G 1 / K``
    and ``sqrt(phi) = c sqrt(1^T G 1) / K``; ``G + ridge I`` must be positive definite. When
    ``phi = 0`` the objective is linear and the best vertex is returned.

    Primal active-set method: start at the best vertex; on the current support solve the
    equality-constrained subproblem in closed form
    (:func:`_subproblem`); if its minimiser is feasible, move there and free the bound with the
    most negative KKT multiplier (stop when none is negative); otherwise (a negative entry, or the
    subproblem unbounded) move towards it until the first weight reaches zero and fix that weight.
    The objective is strictly convex for a positive definite ``G``, so the method terminates at
    the unique minimiser.
    """
    k = gram.shape[0]
    b = gram.sum(axis=1) / k
    s = c * math.sqrt(max(float(gram.sum()), 0.0)) / k
    gram = gram + ridge * np.eye(k)
    vertex = b + s * np.sqrt(np.diag(gram))  # f at each vertex
    start = int(np.argmin(vertex))
    w = np.zeros(k)
    w[start] = 1.0
    if k == 1 or s <= 0.0:
        return w, s

    def gradient(w: np.ndarray) -> np.ndarray:
        gw = gram @ w
        return b + s * gw / math.sqrt(max(float(w @ gw), 1e-300))

    free = np.zeros(k, dtype=bool)
    free[start] = True
    for _ in range(max_iter):
        support = np.flatnonzero(free)
        if len(support) == 1:
            target: np.ndarray | None = w.copy()
            direction = None
        else:
            target, direction = _subproblem(gram, b, s, support)
            if direction is not None:
                target = None
        if target is not None and np.all(target[support] >= 0.0):
            w = np.where(free, np.maximum(target, 0.0), 0.0)
            w /= w.sum()
            grad = gradient(w)
            level = float(grad[support].mean())
            multipliers = grad - level
            multipliers[free] = 0.0
            worst = int(np.argmin(multipliers))
            if multipliers[worst] >= -KKT_TOL * max(1.0, abs(level)):
                return w, s
            free[worst] = True
            continue
        # Move from w along (target - w), or along the unbounded direction, until a weight hits 0.
        step_dir = (target - w) if target is not None else direction
        assert step_dir is not None
        current = w[support]
        move = step_dir[support]
        blocking = move < 0.0
        if not bool(blocking.any()):  # pragma: no cover - sum(move) = 0 and move != 0
            return w, s
        ratios = current[blocking] / -move[blocking]
        j = int(np.argmin(ratios))
        step = float(ratios[j])
        if target is not None:
            step = min(step, 1.0)
        w[support] = np.maximum(current + step * move, 0.0)
        leaving = support[np.flatnonzero(blocking)[j]]
        w[leaving] = 0.0
        free[leaving] = False
        w /= w.sum()
    return w, s  # pragma: no cover - the active-set method terminates long before


class CAGrad(UpdateBalancer):
    """CAGrad (conflict-averse gradient descent) on the Gram matrix.

    Raw weights ``alpha = 1/K + lambda w*`` with ``lambda = sqrt(phi) / ||g_w*||`` (see the module
    docstring): the joint vector is ``g0 + lambda g_w*``. ``normalization="none"`` returns them
    as they are (the reference code's ``rescale=0``; its default ``rescale=1`` divides the step by
    the constant ``1 + c^2``); the default ``"sum"`` rescales them to sum to one (divides by
    ``1 + lambda``), like every other strategy here.

    Degenerate cases: ``c = 0`` or ``g0 = 0`` (e.g. two exactly opposed vectors) give ``phi = 0``
    and equal weights (the step ``g0``); if the minimising combination ``g_w*`` vanishes (the task
    vectors are Pareto-stationary) the correction term has no direction and the weights are also
    ``1/K`` (the step ``g0``). The dual is solved on ``G + 1e-10 I`` (``G`` scaled to mean diagonal
    one); identical task vectors (e.g. ``G = ones((K, K))``) share their group's weight equally,
    so that permuting the tasks permutes the weights.

    Args:
        c: radius of the ball around ``g0``, relative to ``||g0||`` (the paper's default 0.5;
            ``c = 0`` is equal weighting).
        normalization: ``"sum"`` (default) or ``"none"``.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5, normalization: Normalization = "sum") -> None:
        super().__init__(normalization)
        c = float(c)
        if not (c >= 0.0 and math.isfinite(c)):
            raise ValueError(f"CAGrad's c must be finite and non-negative, got {c}")
        self.c = c

    def raw_weights(self, gram: Tensor) -> Tensor:
        matrix = gram.cpu().numpy()
        k = matrix.shape[0]
        equal = np.full(k, 1.0 / k)
        w, s = cagrad_dual(matrix, self.c, ridge=CAGRAD_RIDGE)
        w = _share_among_duplicates(matrix, w)
        norm_gw = math.sqrt(max(float(w @ matrix @ w), 0.0))
        degenerate = s <= 0.0 or norm_gw <= 1e-10 * s  # phi = 0, or g_w* = 0 (see the class)
        weights = equal if degenerate else equal + (s / norm_gw) * w
        return torch.from_numpy(weights).to(gram.device)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c!r}, normalization={self.normalization!r})"
