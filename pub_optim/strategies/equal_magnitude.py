"""Equal-magnitude weighting: IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR
2021), applied by PUB to the per-task updates."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.device import equal_projection_weights
from .base import UpdateBalancer

#: Relative cut-off of small singular values in the pseudo-inverse (of the cosine matrix).
PINV_RTOL = 1e-10
#: ``G alpha = sqrt(diag G)`` counts as solved exactly when every projection of the joint update
#: on a unit task update is within this relative mismatch of the others. Solutions on full-rank G
#: with a cosine matrix of condition number up to ~1e9 are within 2e-7; without an exact solution
#: the mismatch is of order one.
EXACT_RTOL = 1e-6


class EqualMagnitude(UpdateBalancer):
    """Weights whose joint update has the same projection on every unit task update.

    Solves ``G alpha = c * sqrt(diag G)`` and normalises. It is solved in the scaled coordinates
    ``beta_k = alpha_k |d_k|`` (the length of task k's share of the joint update): with the
    cosine matrix ``C = D^-1 G D^-1``, ``D = diag(|d_k|)``, the system is ``C beta = c 1``, whose
    conditioning depends on the angles between the updates only, not on how different their
    norms are (an update 1e-5 as long as another one is solved as exactly as an equal one).

    Two degenerate cases, by rule: when ``C`` is singular and an exact solution exists (e.g.
    colinear updates) the pseudo-inverse gives the one of minimum norm in ``beta`` (for updates
    ``d`` and ``2 d``: ``beta = (1/2, 1/2)``, each task contributes the same length,
    ``alpha = (2/3, 1/3)``); when no exact solution exists (``1`` outside the range of a singular
    ``C``, e.g. updates ``d`` and ``-2 d``) or its weights do not have a positive sum (no joint
    update makes positive equal progress on every task, e.g. exactly opposed updates) the weights
    fall back to equal weights. (A least-squares compromise would not have equal projections: for
    ``d`` and ``-2 d`` it is ``(-1, 2)``, a step that moves the first task backwards.)
    """

    name = "equal-magnitude"

    def raw_weights(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        norms = torch.sqrt(torch.diagonal(gram))
        cosines = gram / torch.outer(norms, norms)
        cosines.fill_diagonal_(1.0)
        ones = torch.ones(k, dtype=torch.float64, device=gram.device)
        beta = torch.linalg.pinv(cosines, rtol=PINV_RTOL, hermitian=True) @ ones
        mismatch = (cosines @ beta - ones).abs().max()
        alpha = beta / norms
        total = alpha.sum()
        exact = bool(mismatch <= EXACT_RTOL)
        if not (exact and bool(total > 1e-9 * alpha.abs().sum())):
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        return alpha / total

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        return equal_projection_weights(gram, active, EXACT_RTOL)
