"""Diagnostics of the last balancing step, for logging: what was balanced, and whether balancing
can do anything here.

With one shared optimizer state, an adaptive optimizer's per-task look-ahead updates
``d_k = T(g_k; S)`` can be mostly the drift ``d_0 = T(0; S)`` that every task shares (the first
moment of Adam, the momentum of SGD): the update-space Gram matrix is then nearly the same for every
task and any strategy's weights stay near equal. :class:`BalanceDiagnostics` measures this in the
same pass as the Gram matrix (``PUB(diagnostics=True)``, and always in the marginal space): per
task, how much of its update is drift; the gradients' cosines and norms beside the updates'; how
far the weights are from equal. ``docs/diagnostics.md`` reads them on a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .spaces import Space, StepGrams


def _norms_and_cosines(gram: Tensor) -> tuple[Tensor, Tensor]:
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0))
    outer = norms[:, None] * norms[None, :]
    cosines = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)
    return norms, cosines


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1), 0)


@dataclass(frozen=True)
class BalanceDiagnostics:
    """Per-step diagnostics (float64 tensors; ``None`` where the step did not compute them).

    Attributes:
        update_norms, update_cosines: of the look-ahead updates ``d_k`` (``[K]``, ``[K, K]``).
        gradient_norms, gradient_cosines: of the per-task gradients ``g_k`` on the shared
            parameters.
        marginal_norms, marginal_cosines: of the task-attributable parts ``d_k - d_0``.
        drift_norm: ``[K]``, ``||d_0||`` (task ``k``'s own drift with ``state="per_task"``).
        drift_cosine: ``[K]``, ``cos(d_k, d_0)``: near 1 with ``attributable`` small, task
            ``k``'s update is mostly the drift.
        attributable: ``[K]``, ``||d_k - d_0|| / ||d_k||``, the part of task ``k``'s update that
            its gradient accounts for (1: none of it is drift; 0: all of it).
        weights_from_equal: the total variation distance between the normalised weights and
            equal weights, ``0.5 * sum_k |alpha_k / sum(alpha) - 1/K|`` (0: equal weighting;
            at most ``1 - 1/K``).
    """

    update_norms: Tensor | None
    update_cosines: Tensor | None
    gradient_norms: Tensor | None
    gradient_cosines: Tensor | None
    marginal_norms: Tensor | None
    marginal_cosines: Tensor | None
    drift_norm: Tensor | None
    drift_cosine: Tensor | None
    attributable: Tensor | None
    weights_from_equal: float

    @staticmethod
    def from_grams(grams: StepGrams, weights: Tensor) -> BalanceDiagnostics:
        def pair(gram: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            return (None, None) if gram is None else _norms_and_cosines(gram)

        update_norms, update_cosines = pair(grams.lookahead)
        gradient_norms, gradient_cosines = pair(grams.gradient)
        marginal_norms, marginal_cosines = pair(grams.marginal)
        drift_norm = drift_cosine = attributable = None
        if grams.drift_sq is not None and grams.drift_dots is not None:
            drift_norm = torch.sqrt(torch.clamp(grams.drift_sq, min=0.0))
            if marginal_norms is not None:
                # ||d_k|| from the marginal pieces when the look-ahead Gram was not kept:
                # ||d_k||^2 = ||d_k - d_0||^2 + 2 <d_k, d_0> - ||d_0||^2.
                squared = marginal_norms**2 + 2 * grams.drift_dots - grams.drift_sq
                norms = update_norms if update_norms is not None else squared.clamp(0).sqrt()
                drift_cosine = _ratio(grams.drift_dots, norms * drift_norm)
                attributable = _ratio(marginal_norms, norms)
        w = weights.double()
        total = w.sum()
        share = w / total if float(total) != 0.0 else w
        spread = 0.5 * float((share - 1.0 / w.numel()).abs().sum())
        return BalanceDiagnostics(
            update_norms,
            update_cosines,
            gradient_norms,
            gradient_cosines,
            marginal_norms,
            marginal_cosines,
            drift_norm,
            drift_cosine,
            attributable,
            spread,
        )

    def as_dict(self, names: tuple[str, ...], prefix: str = "pub") -> dict[str, float]:
        """Flat ``{name: float}`` for loggers."""
        out: dict[str, float] = {f"{prefix}/weights_from_equal": self.weights_from_equal}
        per_task = {
            "drift_cosine": self.drift_cosine,
            "attributable": self.attributable,
            "drift_norm": self.drift_norm,
            "gradient_norm": self.gradient_norms,
            "lookahead_norm": self.update_norms,
            "marginal_norm": self.marginal_norms,
        }
        for key, values in per_task.items():
            if values is not None:
                for name, value in zip(names, values.tolist(), strict=True):
                    out[f"{prefix}/{key}/{name}"] = value
        pairs = {
            "gradient_cosine": self.gradient_cosines,
            "lookahead_cosine": self.update_cosines,
            "marginal_cosine": self.marginal_cosines,
        }
        for key, matrix in pairs.items():
            if matrix is not None:
                for i, name in enumerate(names):
                    for j in range(i + 1, len(names)):
                        out[f"{prefix}/{key}/{name}~{names[j]}"] = float(matrix[i, j])
        return out


@dataclass(frozen=True)
class BalanceStats:
    """What the last :meth:`PUB.step` saw and chose (float64 tensors, on the Gram's device).

    Attributes:
        weights: ``[K]`` task weights applied on the shared parameters.
        update_norms: ``[K]`` norms of the vectors that were balanced: the per-task updates on
            the shared parameters (``space="update"``), their task-attributable parts
            ``d_k - d_0`` (``"marginal"``), the per-task gradients (``"gradient"``).
        cosines: ``[K, K]`` pairwise cosines of those vectors (0 where a norm is zero).
        gram: ``[K, K]`` their Gram matrix.
        solved: whether the weights were solved this step (False: reused, see ``solve_every``).
        step: the balancer's step count after this step.
        task_names: the task names, in the order of the tensors above.
        space: the space of ``gram``.
        diagnostics: the rest of the pass (``PUB(diagnostics=True)`` or the marginal space), see
            :class:`BalanceDiagnostics`; ``None`` otherwise.
    """

    weights: Tensor
    update_norms: Tensor
    cosines: Tensor
    gram: Tensor
    solved: bool
    step: int
    task_names: tuple[str, ...]
    space: Space = "update"
    diagnostics: BalanceDiagnostics | None = None

    @staticmethod
    def from_gram(
        gram: Tensor, weights: Tensor, solved: bool, step: int, names: tuple[str, ...]
    ) -> BalanceStats:
        norms, cosines = _norms_and_cosines(gram)
        return BalanceStats(weights, norms, cosines, gram, solved, step, names)

    @staticmethod
    def from_grams(
        grams: StepGrams,
        weights: Tensor,
        solved: bool,
        step: int,
        names: tuple[str, ...],
        diagnostics: bool,
    ) -> BalanceStats:
        gram = grams.balanced
        norms, cosines = _norms_and_cosines(gram)
        extra = BalanceDiagnostics.from_grams(grams, weights) if diagnostics else None
        return BalanceStats(weights, norms, cosines, gram, solved, step, names, grams.space, extra)

    def as_dict(self, prefix: str = "pub") -> dict[str, float]:
        """Flat ``{name: float}`` for loggers: weights, norms and pairwise cosines by task name,
        and the diagnostics when they were computed."""
        out: dict[str, float] = {}
        names = self.task_names
        for i, name in enumerate(names):
            out[f"{prefix}/weight/{name}"] = float(self.weights[i])
            out[f"{prefix}/update_norm/{name}"] = float(self.update_norms[i])
            for j in range(i + 1, len(names)):
                out[f"{prefix}/cosine/{name}~{names[j]}"] = float(self.cosines[i, j])
        if self.diagnostics is not None:
            out.update(self.diagnostics.as_dict(names, prefix))
        return out
