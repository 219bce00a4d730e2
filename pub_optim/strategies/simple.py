"""Baselines that do not look at the geometry: equal weights and fixed user weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Normalization, UpdateBalancer


class Equal(UpdateBalancer):
    """Equal weighting, ``alpha_k = 1/K`` (the usual summed / averaged multi-task loss)."""

    name = "equal"
    uses_gram = False

    def raw_weights(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        return self.raw_weights(gram)


class Fixed(UpdateBalancer):
    """Fixed, user-given non-negative task weights (normalised to sum to one by default)."""

    name = "fixed"
    uses_gram = False

    def __init__(self, weights: Sequence[float], normalization: Normalization = "sum") -> None:
        super().__init__(normalization)
        values = [float(w) for w in weights]
        if not values:
            raise ValueError("Fixed needs at least one weight")
        if any(not (w >= 0.0) or w == float("inf") for w in values) or sum(values) <= 0.0:
            raise ValueError(
                f"fixed weights must be finite, non-negative and not all zero, got {values}"
            )
        self.weights = values
        self._on_device: dict[tuple[torch.device, tuple[float, ...]], Tensor] = {}

    def raw_weights(self, gram: Tensor) -> Tensor:
        if gram.shape[0] != len(self.weights):
            raise ValueError(
                f"Fixed was given {len(self.weights)} weights but there are {gram.shape[0]} tasks"
            )
        return torch.tensor(self.weights, dtype=torch.float64, device=gram.device)

    def __repr__(self) -> str:
        return f"Fixed({self.weights}, normalization={self.normalization!r})"

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        # Copied to the device once per set of weights (a host-to-device copy), then reused.
        key = (gram.device, tuple(self.weights))
        if key not in self._on_device or gram.shape[0] != len(self.weights):
            self._on_device = {key: self.raw_weights(gram)}  # (raises on a wrong number of tasks)
        return self._on_device[key]
