"""Diagnostics of the last balancing step, for logging."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BalanceStats:
    """What the last :meth:`PUB.step` saw and chose (float64 tensors, on the Gram's device).

    Attributes:
        weights: ``[K]`` task weights applied on the shared parameters.
        update_norms: ``[K]`` norms of the per-task updates on the shared parameters (of the
            per-task gradients when ``space="gradient"``).
        cosines: ``[K, K]`` pairwise cosines of those vectors (0 where a norm is zero).
        gram: ``[K, K]`` their Gram matrix.
        solved: whether the weights were solved this step (False: reused, see ``solve_every``).
        step: the balancer's step count after this step.
        task_names: the task names, in the order of the tensors above.
    """

    weights: Tensor
    update_norms: Tensor
    cosines: Tensor
    gram: Tensor
    solved: bool
    step: int
    task_names: tuple[str, ...]

    @staticmethod
    def from_gram(
        gram: Tensor, weights: Tensor, solved: bool, step: int, names: tuple[str, ...]
    ) -> BalanceStats:
        norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0))
        outer = norms[:, None] * norms[None, :]
        cosines = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)
        return BalanceStats(weights, norms, cosines, gram, solved, step, names)

    def as_dict(self, prefix: str = "pub") -> dict[str, float]:
        """Flat ``{name: float}`` for loggers: weights, norms and pairwise cosines by task name."""
        out: dict[str, float] = {}
        names = self.task_names
        for i, name in enumerate(names):
            out[f"{prefix}/weight/{name}"] = float(self.weights[i])
            out[f"{prefix}/update_norm/{name}"] = float(self.update_norms[i])
            for j in range(i + 1, len(names)):
                out[f"{prefix}/cosine/{name}~{names[j]}"] = float(self.cosines[i, j])
        return out
