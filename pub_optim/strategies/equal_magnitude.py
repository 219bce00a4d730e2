"""Equal-magnitude weighting: IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR
2021), applied by PUB to the per-task updates."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.device import equal_projection_weights
from .base import UpdateBalancer

#: Relative cut-off of small singular values in the pseudo-inverse.
PINV_RTOL = 1e-10
#: ``G alpha = sqrt(diag G)`` counts as solved exactly below this relative mismatch. Solutions on
#: full-rank G with condition number up to ~1e9 are within 2e-7; without an exact solution the
#: mismatch is of the order of the norms.
EXACT_RTOL = 1e-6


class EqualMagnitude(UpdateBalancer):
    """Weights whose joint update has the same projection on every unit task update.

    Solves ``G alpha = c * sqrt(diag G)`` (``alpha ~ pinv(G) sqrt(diag G)``) and normalises. Two
    degenerate cases, by rule: when ``G`` is singular and an exact solution exists (e.g. colinear
    updates) the pseudo-inverse gives the one of minimum norm; when no exact solution exists
    (``sqrt(diag G)`` outside the range of a singular ``G``, e.g. updates ``d`` and ``-2 d``) or
    its weights do not have a positive sum (no joint update makes positive equal progress on
    every task, e.g. exactly opposed updates) the weights fall back to equal weights. (A
    least-squares compromise would not have equal projections: for ``d`` and ``-2 d`` it is
    ``(-1, 2)``, a step that moves the first task backwards.)
    """

    name = "equal-magnitude"

    def raw_weights(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        norms = torch.sqrt(torch.diagonal(gram))
        alpha = torch.linalg.pinv(gram, rtol=PINV_RTOL, hermitian=True) @ norms
        total = alpha.sum()
        mismatch = (gram @ alpha - norms).abs().max()
        exact = bool(mismatch <= EXACT_RTOL * norms.max())
        if not (exact and bool(total > 1e-9 * alpha.abs().sum())):
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        return alpha / total

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        return equal_projection_weights(gram, active, EXACT_RTOL)
