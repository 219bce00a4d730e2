"""Suite-wide settings: GPU-only tests skip with a reason where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (none on this machine); runs wherever torch.cuda.is_available()"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
