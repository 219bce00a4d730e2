"""PCGrad as a Gram-matrix strategy: Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020 (arXiv:2001.06782), Algorithm 1.

PCGrad projects each task vector ``g_i`` onto the normal plane of every other task vector ``g_j``
it conflicts with (``<g_i^PC, g_j> < 0``), visiting the other tasks in a random order, and sums the
projected vectors. Every projection subtracts a multiple of an original task vector, so each
projected vector is ``g_i^PC = sum_j C[i, j] g_j`` and the result is ``sum_j alpha_j g_j`` with
``alpha = C.sum(0)``. The coefficients depend only on the Gram matrix (``<g_i^PC, g_j> =
(C[i] @ G)[j]``) and on the visiting order, so PCGrad is an :class:`UpdateBalancer`: on the
gradient Gram matrix (``PUB(..., space="gradient")``) it is exactly PCGrad followed by the wrapped
optimizer's step; on the update Gram matrix it is PCGrad applied to the look-ahead updates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Normalization, UpdateBalancer


def pcgrad_coefficients(gram: np.ndarray, orders: list[np.ndarray]) -> np.ndarray:
    """The ``K x K`` matrix ``C`` with ``g_i^PC = sum_j C[i, j] g_j``.

    Args:
        gram: ``G[i, j] = <g_i, g_j>`` (float64, positive diagonal).
        orders: for each task ``i``, the order in which the tasks ``j != i`` are visited (entries
            equal to ``i`` are skipped, so a full permutation of ``range(K)`` may be passed).
    """
    k = gram.shape[0]
    coefficients = np.eye(k)
    for i in range(k):
        row = coefficients[i]
        for j in orders[i]:
            j = int(j)
            if j == i:
                continue
            inner = float(row @ gram[:, j])  # <g_i^PC, g_j>
            if inner < 0.0:
                row[j] -= inner / gram[j, j]
    return coefficients


class PCGrad(UpdateBalancer):
    """PCGrad (projecting conflicting gradients) on the Gram matrix.

    The weights are ``alpha_j = sum_i C[i, j]`` (see :func:`pcgrad_coefficients`): with
    ``normalization="none"`` they are the paper's coefficients (the joint vector is the *sum* of
    the projected task vectors, ``alpha_j >= 1``); with the default ``"sum"`` they are rescaled to
    sum to one like every other strategy here, so the wrapped optimizer keeps its step size
    (without any conflict PCGrad then equals equal weighting).

    **Randomness.** As in the paper, for each task ``i`` the other tasks are visited in a random
    order, so with ``K >= 3`` conflicting tasks the weights are random. The order comes from this
    instance's own ``numpy.random.Generator``, seeded with ``seed`` (default 0; ``None`` draws a
    seed from the operating system): for each call and each ``i = 0..K-1`` in turn it draws
    ``rng.permutation(K)`` and visits the tasks ``j != i`` in that order. The global torch and
    numpy generators are neither used nor advanced. Every call advances the generator, so the
    same seed and the same sequence of calls give the same weights (e.g. on every DDP rank);
    :meth:`reseed` restarts the sequence. The generator state is part of ``PUB.state_dict()``, so
    a resumed run continues the same sequence. With ``K = 2`` the order does not matter and
    PCGrad is deterministic.

    Args:
        seed: seed of the visiting-order generator (``None``: from the OS).
        normalization: ``"sum"`` (default) or ``"none"`` (see above).
    """

    name = "pcgrad"

    def __init__(self, seed: int | None = 0, normalization: Normalization = "sum") -> None:
        super().__init__(normalization)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the visiting-order generator from ``seed``."""
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def draw_orders(self, k: int) -> list[np.ndarray]:
        """The next ``K`` visiting orders (one permutation of ``range(K)`` per task)."""
        return [self._rng.permutation(k) for _ in range(k)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a state_dict saved before the generator was part of it: keep ours
            return
        if set(state) != {"seed", "generator"}:
            raise ValueError(
                f"not a PCGrad state (expected keys 'seed' and 'generator'), got {sorted(state)}"
            )
        rng = np.random.default_rng()
        rng.bit_generator.state = state["generator"]
        self.seed, self._rng = state["seed"], rng

    def raw_weights(self, gram: Tensor) -> Tensor:
        matrix = gram.cpu().numpy()
        coefficients = pcgrad_coefficients(matrix, self.draw_orders(matrix.shape[0]))
        return torch.from_numpy(coefficients.sum(axis=0)).to(gram.device)

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed!r}, normalization={self.normalization!r})"
