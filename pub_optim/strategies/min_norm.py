"""Min-norm weighting: MGDA (Désidéri 2012; Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018), applied by PUB to the per-task updates."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..solvers.device import min_norm_weights
from .base import UpdateBalancer

#: Ridge on the (mean-diagonal-one) Gram matrix: makes the minimiser unique when updates are
#: colinear, so that equal tasks get equal weights; moves the objective by at most 1e-10.
MIN_NORM_RIDGE = 1e-10
#: Two tasks whose rows of the (mean-diagonal-one) Gram matrix agree to this absolute tolerance
#: have the same update as far as the matrix can tell: a Gram matrix of float32 updates carries
#: rounding of about 1e-8 relative (measured: one row of ``torch.mm`` off by 6.8e-9 for three
#: bit-identical updates), 100 times the ridge, so the ridge alone cannot break their tie.
DUPLICATE_ATOL = 1e-6


def min_norm_simplex(gram: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """``argmin_{alpha in simplex} alpha^T G alpha`` by a primal active-set method.

    Exact (up to rounding) and finite for a positive definite ``G``; ``K`` is small. Closed form
    for ``K = 2``. The joint update ``sum_k alpha_k d_k`` is then the min-norm point of the convex
    hull of the task updates, with a non-negative inner product with every one of them.
    """
    k = gram.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        a, b, c = gram[0, 0], gram[0, 1], gram[1, 1]
        denom = a - 2.0 * b + c
        t = 0.5 if denom <= 0.0 else min(1.0, max(0.0, (c - b) / denom))
        return np.array([t, 1.0 - t])
    free = np.zeros(k, dtype=bool)
    start = int(np.argmin(np.diag(gram)))
    free[start] = True
    alpha = np.zeros(k)
    alpha[start] = 1.0
    for _ in range(max_iter):
        idx = np.flatnonzero(free)
        sub = gram[np.ix_(idx, idx)]
        solution = np.linalg.solve(sub, np.ones(len(idx)))
        target = solution / solution.sum()
        if np.all(target >= 0.0):
            alpha = np.zeros(k)
            alpha[idx] = target
            g_alpha = gram @ alpha
            level = float(alpha @ g_alpha)  # (G alpha)_k on the support
            slack = g_alpha - level  # KKT multipliers of the bounds (up to a factor 2)
            slack[free] = 0.0
            worst = int(np.argmin(slack))
            if slack[worst] >= -1e-14 * max(1.0, abs(level)):
                return alpha
            free[worst] = True
            continue
        # Move towards ``target`` until the first weight hits zero, then fix it at zero.
        current = alpha[idx]
        direction = target - current
        blocking = direction < 0.0
        ratios = current[blocking] / -direction[blocking]
        j = int(np.argmin(ratios))
        step = float(ratios[j])
        alpha[idx] = np.maximum(current + step * direction, 0.0)
        leaving = idx[np.flatnonzero(blocking)[j]]
        alpha[leaving] = 0.0
        free[leaving] = False
        alpha /= alpha.sum()
    return alpha  # pragma: no cover - the active-set method terminates long before


def duplicate_groups(gram: np.ndarray, atol: float) -> list[list[int]]:
    """Tasks grouped by equal rows of ``gram`` (to ``atol``), in order of first appearance.

    Rows ``i`` and ``j`` are equal when ``|G_il - G_jl| <= atol`` and ``|G_li - G_lj| <= atol``
    for every ``l``: then ``||d_i - d_j||^2 = G_ii - G_ij - G_ji + G_jj <= 2 atol`` and no
    weighting can tell the two updates apart by more than the matrix's own rounding.
    """
    k = gram.shape[0]
    groups: list[list[int]] = []
    for i in range(k):
        for group in groups:
            j = group[0]
            if (
                np.max(np.abs(gram[i] - gram[j])) <= atol
                and np.max(np.abs(gram[:, i] - gram[:, j])) <= atol
            ):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


class MinNorm(UpdateBalancer):
    """MGDA on the Gram matrix: the convex combination of task updates with the smallest norm.

    ``alpha = argmin_{alpha >= 0, sum alpha = 1} alpha^T G alpha``. The joint step has a
    non-negative inner product with every task's update (no task is pushed backwards). When the
    minimiser is not unique (colinear updates) a ridge of 1e-10 times the mean diagonal selects
    the one of smallest Euclidean norm in ``alpha``. Tasks whose rows of ``G`` agree to 1e-6 of
    the mean diagonal (updates equal up to float32 rounding) count as one task and share its
    weight equally, on every machine, whatever rounding its matrix product has.
    """

    name = "min-norm"

    def raw_weights(self, gram: Tensor) -> Tensor:
        matrix = gram.cpu().numpy()
        groups = duplicate_groups(matrix, DUPLICATE_ATOL)
        # One task per group of duplicates (the group's mean row and column), then its weight
        # split equally among the members: what the ridge selects for exactly equal updates.
        member = np.zeros((len(groups), matrix.shape[0]))
        for g, group in enumerate(groups):
            member[g, group] = 1.0 / len(group)
        reduced = member @ matrix @ member.T
        reduced = 0.5 * (reduced + reduced.T) + MIN_NORM_RIDGE * np.eye(len(groups))
        weights = min_norm_simplex(reduced) @ member
        return torch.from_numpy(weights).to(gram.device)

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return min_norm_weights(gram + MIN_NORM_RIDGE * eye, active)
