"""The extension point: an :class:`UpdateBalancer` maps a K x K Gram matrix to K task weights.

PUB (Yuan, Cai, Dong, "A Parameter Update Balancing Algorithm for Multi-task Ranking Models in
Recommendation Systems", arXiv:2410.05806) computes the Gram matrix ``G[i, j] = <d_i, d_j>`` of the
per-task *updates* ``d_k`` and chooses weights ``alpha`` from it alone. The same balancers applied
to the Gram matrix of per-task *gradients* are the classic gradient-balancing baselines.

A new strategy is one short subclass that implements :meth:`UpdateBalancer.raw_weights`. The base
class does everything that is common to all of them:

* validation: a square, symmetric (it is symmetrised), finite matrix with a non-negative
  diagonal (squared norms), else ``ValueError``;
* scale: the matrix is divided by its mean diagonal before ``raw_weights`` sees it, so every
  strategy works on numbers of order one whatever the scale of the updates (1e-12 .. 1e12);
* degenerate geometry, by a documented rule (see :meth:`UpdateBalancer.__call__`);
* normalisation: by default the weights sum to one, so that the balancer chooses the mixture and
  the wrapped optimizer keeps its step size (our decision: the paper is silent on it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

Normalization = Literal["sum", "none"]

#: A task whose update has a squared norm below this fraction of the largest one counts as zero.
ZERO_UPDATE_RTOL = 1e-12


class UpdateBalancer(ABC):
    """Base class of the task-weighting strategies.

    Args:
        normalization: ``"sum"`` (default) rescales the weights to sum to one; ``"none"`` returns
            the strategy's own raw weights, in the units of the Gram matrix it was given (e.g. the
            Nash bargaining weights of Nash-MTL, whose joint update has squared norm K).

    Calling a balancer on a Gram matrix ``G`` returns a float64 tensor of K weights on G's device.
    Degenerate cases follow one rule for every Gram-based strategy:

    * all updates zero (``trace(G) == 0``): equal weights ``1/K``;
    * some updates zero (squared norm below ``1e-12`` times the largest): those tasks get weight
      0 and the strategy balances the others among themselves;
    * anything else a strategy cannot resolve (e.g. no equal-projection solution with a positive
      sum) is handled by that strategy and described in its docstring; no exception escapes from
      a solver.
    """

    #: Registry name, e.g. ``"pareto"``.
    name: str = ""
    #: Whether zero updates are dropped before :meth:`raw_weights` (False for G-free baselines).
    uses_gram: bool = True

    def __init__(self, normalization: Normalization = "sum") -> None:
        if normalization not in ("sum", "none"):
            raise ValueError(f"normalization must be 'sum' or 'none', got {normalization!r}")
        self.normalization: Normalization = normalization

    @abstractmethod
    def raw_weights(self, gram: Tensor) -> Tensor:
        """Weights for a float64 Gram matrix with mean diagonal 1 and no zero row.

        Returns K weights (float64, same device). Called with ``K >= 1``.
        """

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        """Like :meth:`raw_weights`, as a fixed sequence of tensor operations on ``gram``'s device
        (no host-device synchronisation: no ``bool()``, ``.item()``, ``.cpu()`` on its values).

        ``gram`` is K x K with mean diagonal 1 over the ``active`` tasks (a ``[K]`` bool tensor);
        an inactive task (zero update) appears as an orthogonal unit row, and its weight is set to
        zero afterwards. Optional: strategies without it cannot run in ``PUB(sync_free=True)``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no synchronisation-free solver: use sync_free=False"
        )

    @property
    def supports_sync_free(self) -> bool:
        """Whether :meth:`device_weights` works for this strategy."""
        return type(self).device_raw_weights is not UpdateBalancer.device_raw_weights

    def device_weights(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """What calling the balancer returns, without host-device synchronisation.

        Returns ``(weights, valid)``: ``valid`` is a 0-d bool tensor, False where ``gram`` is
        not finite or has a negative diagonal (where calling the balancer raises ``ValueError``);
        the weights are then equal weights, always finite. The degenerate rules are those of
        :meth:`__call__`, written with ``torch.where``.
        """
        _check_shape(gram)
        k = gram.shape[0]
        gram = gram.detach().to(torch.float64)
        eye = torch.eye(k, dtype=torch.float64, device=gram.device)
        diag = torch.diagonal(gram)
        valid = torch.isfinite(gram).all() & (diag >= 0).all()
        gram = torch.where(valid, 0.5 * (gram + gram.T), eye)
        diag = torch.diagonal(gram)
        equal = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        if not self.uses_gram:
            weights = self.device_raw_weights(gram, torch.ones_like(diag, dtype=torch.bool))
        else:
            largest = diag.max()
            active = diag > ZERO_UPDATE_RTOL * largest
            count = active.sum()
            scale = torch.where(count > 0, (diag * active).sum() / count.clamp(min=1), 1.0)
            pair = active[:, None] & active[None, :]
            scaled = torch.where(pair, gram / scale, eye)
            raw = self.rescale_raw(self.device_raw_weights(scaled, active), scale)
            weights = torch.where(largest > 0, torch.where(active, raw, 0.0), equal)
        weights = torch.where(valid, weights, equal)
        if self.normalization == "none":
            return weights, valid
        total = weights.sum()
        positive = total > 1e-12 * weights.abs().sum()
        return torch.where(positive, weights / torch.where(positive, total, 1.0), equal), valid

    def rescale_raw(self, weights: Tensor, scale: float | Tensor) -> Tensor:
        """Map raw weights computed on ``G / scale`` back to the units of ``G``.

        Strategies whose raw weights are scale-free (they sum to one) keep the default.
        """
        return weights

    def __call__(self, gram: Tensor) -> Tensor:
        gram = validate_gram(gram)
        k = gram.shape[0]
        if not self.uses_gram:
            return self._normalize(self.raw_weights(gram))
        diag = torch.diagonal(gram)
        largest = diag.max()
        if not bool(largest > 0):
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        active = diag > ZERO_UPDATE_RTOL * largest
        if bool(active.all()):
            scale = diag.mean()
            weights = self.rescale_raw(self.raw_weights(gram / scale), scale)
        else:
            sub = gram[active][:, active]
            scale = torch.diagonal(sub).mean()
            weights = torch.zeros(k, dtype=torch.float64, device=gram.device)
            weights[active] = self.rescale_raw(self.raw_weights(sub / scale), scale)
        return self._normalize(weights)

    def state_dict(self) -> dict[str, Any]:
        """What changes while training (random generators): saved by ``PUB.state_dict()`` so
        that a resumed run continues identically. Empty for deterministic strategies."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state, but the state_dict holds {sorted(state)}: "
                "was it saved with another strategy?"
            )

    def _normalize(self, weights: Tensor) -> Tensor:
        if self.normalization == "none":
            return weights
        total = weights.sum()
        if not bool(total > 1e-12 * weights.abs().sum()):
            raise FloatingPointError(  # pragma: no cover - strategies guarantee a positive sum
                f"{type(self).__name__} produced weights with a non-positive sum: {weights}"
            )
        return weights / total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalization={self.normalization!r})"


def validate_gram(gram: Tensor) -> Tensor:
    """Check that ``gram`` is a finite square matrix with a non-negative diagonal; return it
    symmetrised, in float64."""
    _check_shape(gram)
    gram = gram.detach().to(torch.float64)
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(
            "the Gram matrix has non-finite entries: some task update or gradient is NaN or "
            "infinite (check the losses, lower the learning rate, or use a GradScaler)"
        )
    diagonal = torch.diagonal(gram)
    if bool((diagonal < 0).any()):
        raise ValueError(
            "the Gram matrix has a negative diagonal entry, but its diagonal holds squared norms "
            f"<d_k, d_k> >= 0: got {diagonal.tolist()}"
        )
    return 0.5 * (gram + gram.T)


def _check_shape(gram: object) -> None:
    """A tensor of shape K x K with K >= 1 (checked on the host: shapes need no synchronisation)."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"the Gram matrix must be a torch.Tensor, got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(
            f"the Gram matrix must be square K x K with K >= 1, got {tuple(gram.shape)}"
        )
