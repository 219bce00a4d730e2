"""The space in which PUB takes the Gram matrix that its strategy balances.

With ``K`` tasks, per-task gradients ``g_k`` and look-ahead updates ``d_k = T(g_k; S)`` of the
wrapped optimizer (Yuan, Cai, Dong, arXiv:2410.05806):

* ``"update"`` (the paper's): ``G = [<d_i, d_j>]``; the applied update is ``sum_k alpha_k d_k``.
* ``"marginal"``: ``G = [<d_i - d_0, d_j - d_0>]`` with ``d_0 = T(0; S)``, what the optimizer would
  apply with a zero gradient (the momentum drift, common to every task); the applied update is
  ``d_0 + sum_k alpha_k (d_k - d_0)`` (equal to the update space's when the weights sum to one) and
  the state advances with ``g* = sum_k alpha_k g_k`` as in PUB. For SGD with momentum ``d_k - d_0``
  is a fixed multiple of ``g_k``, so the weights are the gradient-space weights; for Adam they are
  not. A task with a zero gradient has ``d_k = d_0``: a zero row, and weight zero.
* ``"gradient"``: ``G = [<g_i, g_j>]`` and an ordinary step on ``g*``: the MGDA / IMTL-G / Nash-MTL
  baselines.

:class:`StepGrams` holds what one Gram pass measured; the strategy reads :attr:`StepGrams.balanced`
and :class:`pub_optim.BalanceStats` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Space = Literal["update", "marginal", "gradient"]
SPACES: tuple[Space, ...] = ("update", "marginal", "gradient")


@dataclass
class StepGrams:
    """The float64 matrices of one step's Gram pass (``None``: not computed).

    Attributes:
        space: which of them the strategy balances.
        lookahead: ``[<d_i, d_j>]``.
        marginal: ``[<d_i - d_0, d_j - d_0>]`` (``d_0``: task ``i``'s own drift with one state per
            task).
        gradient: ``[<g_i, g_j>]``.
        drift_dots: ``[K]``, ``<d_k, d_0>``.
        drift_sq: ``[K]``, ``||d_0||^2`` (the same for every task with the shared state).
    """

    space: Space
    lookahead: Tensor | None = None
    marginal: Tensor | None = None
    gradient: Tensor | None = None
    drift_dots: Tensor | None = None
    drift_sq: Tensor | None = None

    @property
    def balanced(self) -> Tensor:
        """The matrix the strategy balances."""
        gram = {"update": self.lookahead, "marginal": self.marginal, "gradient": self.gradient}[
            self.space
        ]
        assert gram is not None, f"the {self.space} Gram matrix was not computed"
        return gram


def marginal_from_augmented(full: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the ``(K + 1) x (K + 1)`` Gram matrix of ``[d_1 .. d_K, d_0]`` (accumulated in float64):
    the look-ahead Gram matrix, the marginal one
    ``<d_i, d_j> - <d_i, d_0> - <d_0, d_j> + <d_0, d_0>``, ``<d_k, d_0>`` and ``||d_0||^2``. A task
    whose update equals the drift bit for bit gets an exactly zero row (each term is the same sum
    of the same products)."""
    k = full.shape[0] - 1
    lookahead = full[:k, :k].clone()
    dots = full[:k, k].clone()
    sq = full[k, k]
    marginal = lookahead - dots[:, None] - dots[None, :] + sq
    return lookahead, marginal, dots, sq.expand(k).clone()


def drift_weight(weights: Tensor, normalized: bool) -> float | Tensor:
    """The weight of ``d_0`` in the marginal space's applied update, beyond what
    ``sum_k alpha_k d_k`` already holds: ``1 - sum_k alpha_k`` (a Python ``0.0`` when the strategy
    normalises its weights to sum to one, so that no look-ahead is spent on it)."""
    if normalized:
        return 0.0
    return 1.0 - weights.sum()


__all__ = ["SPACES", "Space", "StepGrams", "drift_weight", "marginal_from_augmented"]
