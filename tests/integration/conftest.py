"""Shared fixtures for the reference-integration tests (small synthetic data, one thread)."""

from __future__ import annotations

import pytest
import torch

from integrations.moe_ranking.data import MultiTaskData, make_synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    """The cores are shared and the models tiny: one thread is faster and reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic() -> MultiTaskData:
    return make_synthetic(n_train=600, n_val=200, n_test=200, conflict=0.5, seed=3)


@pytest.fixture(scope="session")
def synthetic_funnel() -> MultiTaskData:
    return make_synthetic(n_train=600, n_val=200, n_test=200, funnel=True, seed=4)
