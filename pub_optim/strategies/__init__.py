"""Task-weighting strategies: each maps a K x K Gram matrix to K weights."""

from __future__ import annotations

from collections.abc import Sequence

from .base import UpdateBalancer, validate_gram
from .cagrad import CAGrad
from .equal_magnitude import EqualMagnitude
from .min_norm import MinNorm
from .pareto import Pareto
from .pcgrad import PCGrad
from .simple import Equal, Fixed

STRATEGIES: dict[str, type[UpdateBalancer]] = {
    "pareto": Pareto,
    "min-norm": MinNorm,
    "equal-magnitude": EqualMagnitude,
    "equal": Equal,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
}

StrategyLike = str | Sequence[float] | UpdateBalancer


def get_strategy(strategy: StrategyLike) -> UpdateBalancer:
    """Build a strategy from a name, a sequence of fixed weights, or return an instance as is."""
    if isinstance(strategy, UpdateBalancer):
        return strategy
    if isinstance(strategy, str):
        key = strategy.lower().replace("_", "-")
        if key not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}, a sequence "
                "of fixed weights, or an UpdateBalancer instance"
            )
        return STRATEGIES[key]()
    if isinstance(strategy, Sequence):
        return Fixed([float(w) for w in strategy])
    raise TypeError(
        f"strategy must be a name, a sequence of weights or an UpdateBalancer, got {strategy!r}"
    )


__all__ = [
    "STRATEGIES",
    "Equal",
    "EqualMagnitude",
    "Fixed",
    "MinNorm",
    "Pareto",
    "StrategyLike",
    "UpdateBalancer",
    "get_strategy",
    "validate_gram",
]
