"""Equal-magnitude weighting: IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR
2021), applied by PUB to the per-task updates."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import UpdateBalancer

#: Relative cut-off of small singular values in the pseudo-inverse.
PINV_RTOL = 1e-10


class EqualMagnitude(UpdateBalancer):
    """Weights whose joint update has the same projection on every unit task update.

    Solves ``G alpha = c * sqrt(diag G)`` (``alpha ~ pinv(G) sqrt(diag G)``) and normalises. Two
    degenerate cases, by rule: when ``G`` is singular the pseudo-inverse gives the minimum-norm
    solution (exact when one exists, e.g. colinear updates); when the solution's weights do not
    have a positive sum (no joint update makes positive equal progress on every task, e.g.
    exactly opposed updates) the weights fall back to equal weights.
    """

    name = "equal-magnitude"

    def raw_weights(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        norms = torch.sqrt(torch.diagonal(gram))
        alpha = torch.linalg.pinv(gram, rtol=PINV_RTOL, hermitian=True) @ norms
        total = alpha.sum()
        if not bool(total > 1e-9 * alpha.abs().sum()):
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        return alpha / total
