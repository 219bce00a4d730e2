"""The compiled Triton Nash kernel on a CUDA device against the torch device solver (GPU only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pub_optim.kernels.nash_triton import interpreted
from pub_optim.solvers import device
from pub_optim.strategies import Pareto

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from gram_samplers import sample_gram

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _compiled_triton():
    if interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process")


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5])
def test_kernel_matches_torch_and_the_host_on_cuda(k, rank_fraction):
    rank = max(1, int(k * rank_fraction))
    for seed in range(5):
        host_gram = torch.from_numpy(sample_gram(k, rank, 1.0, seed))
        gram = host_gram.cuda()
        active = torch.ones(k, dtype=torch.bool, device="cuda")
        triton_weights = device.nash_weights(gram, active, backend="triton")
        torch_weights = device.nash_weights(gram, active, backend="torch")
        torch.testing.assert_close(triton_weights, torch_weights, rtol=1e-9, atol=0.0)
        if rank == k:
            host = Pareto(normalization="none").raw_weights(host_gram)
            torch.testing.assert_close(triton_weights.cpu(), host, rtol=1e-7, atol=0.0)


def test_auto_backend_uses_the_kernel_without_synchronising():
    gram = torch.from_numpy(sample_gram(4, 4, 1.0, 0)).cuda()
    active = torch.ones(4, dtype=torch.bool, device="cuda")
    assert device._use_triton(gram, "auto")
    device.nash_weights(gram, active)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        device.nash_weights(gram, active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
