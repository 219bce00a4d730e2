"""The Triton Nash kernel (``pub_optim.kernels.nash_triton``) against the torch device solver.

Both run the same attempts (nine ridges) and the same iterations; the test compares every
attempt's iterate and acceptance, at small iteration counts (the interpreter costs ~0.2 s per
iteration at K = 2), plus one full-length solve. Needs triton in interpreter mode (see
``conftest.py``); otherwise ``test_gating_triton_subprocess.py`` runs this module in a fresh
process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pub_optim.kernels.nash_triton import interpreted
from pub_optim.solvers import device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from gram_samplers import sample_gram

pytestmark = pytest.mark.skipif(
    not interpreted(),
    reason="triton imported in compiled mode; test_gating_triton_subprocess.py runs this module",
)


def _attempts(gram: torch.Tensor, iterations: int):
    ridges = device._ridges_on(gram) * torch.diagonal(gram).mean()
    return (
        device._nash_attempts_torch(gram, ridges, iterations),
        device._nash_attempts_triton(gram, ridges, iterations),
    )


@pytest.mark.parametrize(
    ("k", "rank", "seed", "iterations"),
    [(1, 1, 0, 6), (3, 3, 1, 6), (3, 1, 2, 6), (6, 6, 3, 4), (6, 2, 4, 4), (16, 16, 5, 2)],
)
def test_every_attempt_matches_the_torch_solver(k, rank, seed, iterations):
    gram = torch.from_numpy(sample_gram(k, rank, 1.0, seed))
    (alpha_torch, ok_torch), (alpha_triton, ok_triton) = _attempts(gram, iterations)
    assert torch.equal(ok_triton, ok_torch)
    torch.testing.assert_close(alpha_triton, alpha_torch, rtol=1e-12, atol=0.0)


#: Two strongly conflicting tasks and a third: the plain start, then damped Newton steps whose
#: decrement crosses the 1/16 threshold on the unregularised attempt (found by a scan: moving
#: the threshold changes that attempt's iterate).
CONFLICTING = [
    [0.015338570696559804, -0.18893205228831933, -0.014972030860174894],
    [-0.18893205228831933, 2.960677161766605, 0.11024506606464408],
    [-0.014972030860174894, 0.11024506606464408, 0.023984267536835212],
]


@pytest.mark.parametrize(
    ("gram", "iterations"),
    [
        ([[1.0, -1.0], [-1.0, 1.0]], 12),
        ([[1.0, -2.0], [-2.0, 4.0]], 12),
        ([[1.0, 2.0], [2.0, 4.0]], 12),
        (CONFLICTING, 8),  # the damped phase ends at iteration 7 or 8 (threshold-sensitive)
    ],
    ids=["opposed", "anti-colinear", "colinear", "conflicting"],
)
def test_degenerate_geometries_take_the_same_decisions(gram, iterations):
    (alpha_torch, ok_torch), (alpha_triton, ok_triton) = _attempts(
        torch.tensor(gram, dtype=torch.float64), iterations
    )
    assert torch.equal(ok_triton, ok_torch)
    torch.testing.assert_close(alpha_triton, alpha_torch, rtol=1e-12, atol=0.0)


def test_full_solve_gives_the_host_weights():
    from pub_optim.strategies import Pareto

    gram = torch.from_numpy(sample_gram(2, 2, 1.0, 7))
    active = torch.ones(2, dtype=torch.bool)
    # 30 iterations: converged for this matrix (the interpreter takes ~0.2 s per iteration).
    weights = device.nash_weights(gram, active, backend="triton", iterations=30)
    host = Pareto(normalization="none").raw_weights(gram)
    torch.testing.assert_close(weights, host, rtol=1e-10, atol=0.0)


def test_backend_names_are_checked():
    gram = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        device.nash_weights(gram, torch.ones(2, dtype=torch.bool), backend="cuda")  # type: ignore[arg-type]
    assert not device._use_triton(gram, "auto")  # CPU tensors: torch, even with triton present
