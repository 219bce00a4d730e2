"""Datasets with train-only preprocessing: UCI Adult (the default), MovieLens-100K, AliExpress,
River Flow 1 (eight regression tasks) and synthetic tasks."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adult import load_adult
from .aliexpress import load_aliexpress
from .base import BINARY, REGRESSION, Batch, MultiTaskData, Split, make_loader
from .movielens import load_movielens
from .rf1 import load_rf1
from .synthetic import make_synthetic

DATASETS = ("adult", "movielens", "aliexpress", "rf1", "synthetic")

__all__ = [
    "BINARY",
    "DATASETS",
    "REGRESSION",
    "Batch",
    "MultiTaskData",
    "Split",
    "load_adult",
    "load_aliexpress",
    "load_data",
    "load_movielens",
    "load_rf1",
    "make_loader",
    "make_synthetic",
]


def load_data(name: str, **options: Any) -> MultiTaskData:
    """Load dataset ``name`` with loader-specific keyword options (None values are dropped)."""
    options = {k: v for k, v in options.items() if v is not None}
    loaders = {
        "adult": load_adult,
        "movielens": load_movielens,
        "aliexpress": load_aliexpress,
        "rf1": load_rf1,
        "synthetic": make_synthetic,
    }
    if name not in loaders:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name](**options)  # type: ignore[operator]
