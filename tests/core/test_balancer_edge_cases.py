"""Edge cases of the strategies: updates of very different lengths, ill-conditioned and colinear
geometry, and floating-point warnings, each against an independent reference (numpy, or the
defining property of the strategy).

Equal-magnitude is IMTL-G (Liu et al., ICLR 2021), CAGrad is Liu et al., NeurIPS 2021, the Nash
solver is Nash-MTL's bargaining condition (Navon et al., ICML 2022).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gram_samplers import (
    GramSpec,
    assert_permutation_equivariant,
    equal_projections,
    gram_specs,
    permutation,
    weights_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sync_guard import no_host_reads

from pub_optim.solvers.device import MIN_NORM_MAX_TASKS
from pub_optim.solvers.nash_newton import solve_nash_newton
from pub_optim.strategies import CAGrad, EqualMagnitude, Pareto

SOME = settings(max_examples=60, deadline=None)


def _device(gram: np.ndarray) -> np.ndarray:
    with no_host_reads():
        weights, valid = EqualMagnitude().device_weights(torch.from_numpy(gram))
    assert bool(valid)
    out: np.ndarray = weights.numpy()
    return out


def _numpy_equal_projection(gram: np.ndarray) -> np.ndarray:
    """Raw IMTL-G weights, ``G alpha = sqrt(diag G)``, by numpy's LU solve on the cosine matrix
    (an independent implementation)."""
    norms = np.sqrt(np.diag(gram))
    beta = np.linalg.solve(gram / np.outer(norms, norms), np.ones(len(norms)))
    return beta / norms


# ------------------------------------------------------------------------ equal-magnitude
@pytest.mark.parametrize("cosine", [0.9, 0.5, 0.0, -0.3])
@pytest.mark.parametrize("ratio", [1e-5, 1e-3, 1.0])
def test_equal_magnitude_updates_of_very_different_lengths(cosine: float, ratio: float) -> None:
    # Two updates of norms 1 and `ratio` (squared norm 1e-10 is above the 1e-12 zero threshold).
    # The exact solution: beta = (1, 1) / (1 + cos) in units of the norms, alpha ∝ (1, 1/ratio).
    gram = np.array([[1.0, cosine * ratio], [cosine * ratio, ratio**2]])
    expected = np.array([ratio, 1.0]) / (1.0 + ratio)
    for weights in (weights_of(EqualMagnitude(), gram), _device(gram)):
        np.testing.assert_allclose(weights, expected, rtol=1e-9)
        projections = equal_projections(gram, weights)
        np.testing.assert_allclose(projections, projections[0], rtol=1e-9)


@SOME
@given(
    spec=gram_specs(
        max_k=MIN_NORM_MAX_TASKS, full_rank=True, max_norm_spread=1e6, max_spectrum_spread=1e3
    )
)
def test_equal_magnitude_ill_conditioned_host_device_and_numpy_agree(spec: GramSpec) -> None:
    # Norms up to 1e6 apart and angles that make the cosine matrix's condition number up to
    # ~1e6 (G's up to ~1e18): equal projections, numpy's answer, and the same weights from the
    # synchronisation-free solver as from the host one.
    gram = spec.matrix()
    host = weights_of(EqualMagnitude(), gram)
    raw = _numpy_equal_projection(gram)
    positive = raw.sum() / np.abs(raw).sum()
    if positive <= 1e-12:  # no equal-projection update with a positive sum: the fallback
        np.testing.assert_allclose(host, np.full(spec.k, 1.0 / spec.k), rtol=1e-15)
    elif positive >= 1e-6:  # (in between, rounding decides; the sum is 1e-9 of the weights)
        reference = raw / raw.sum()
        scale = np.abs(reference).max()
        np.testing.assert_allclose(host, reference, rtol=0.0, atol=1e-8 * scale)
        projections = equal_projections(gram, host)
        np.testing.assert_allclose(projections, projections.mean(), rtol=1e-8)
    np.testing.assert_allclose(_device(gram), host, rtol=0.0, atol=1e-7 * np.abs(host).max())


def test_equal_magnitude_colinear_updates_contribute_equal_lengths() -> None:
    # d and 2d: singular; the minimum-norm solution in the scaled coordinates beta_k =
    # alpha_k |d_k| is beta = (1/2, 1/2): alpha = (2/3, 1/3), each task's share has length 2/3.
    gram = np.array([[1.0, 2.0], [2.0, 4.0]])
    for weights in (weights_of(EqualMagnitude(), gram), _device(gram)):
        np.testing.assert_allclose(weights, [2 / 3, 1 / 3], rtol=1e-9)


# ----------------------------------------------------------------------------------- CAGrad
def test_cagrad_identical_tasks_get_equal_weights() -> None:
    for k in (2, 3, 5):
        weights = weights_of(CAGrad(), np.ones((k, k)))
        np.testing.assert_allclose(weights, np.full(k, 1.0 / k), rtol=1e-9)


@SOME
@given(
    norms=st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=2, max_size=6),
    perm_seed=st.integers(0, 2**32 - 1),
)
def test_cagrad_permutation_equivariant_on_colinear_tasks(
    norms: list[float], perm_seed: int
) -> None:
    # Updates n_k * u along one direction, with ties among the n_k.
    n = np.array(norms)
    assert_permutation_equivariant(CAGrad(), np.outer(n, n), permutation(len(n), perm_seed), 1e-9)


# --------------------------------------------------------------------------- Nash (Newton)
def _near_degenerate_gram(seed: int) -> np.ndarray:
    """Gram matrix (mean diagonal one) of K <= 6 vectors in 1-3 dimensions, of norms 1e-3..1e3,
    often with a nearly opposed pair and a nearly colinear one (relative gaps 1e-16..1e-6)."""
    rng = np.random.default_rng(seed)
    k, dim = int(rng.integers(2, 7)), int(rng.integers(1, 4))
    v = rng.standard_normal((k, dim)) * 10 ** rng.uniform(-3, 3, size=(k, 1))
    if rng.random() < 0.5:
        v[1] = -v[0] * (1 + 10 ** rng.uniform(-16, -6))
    if rng.random() < 0.3:
        noise = 10 ** rng.uniform(-12, -6) * rng.standard_normal(dim)
        v[-1] = v[0] * (1 + 10 ** rng.uniform(-16, -6)) + noise
    gram = v @ v.T
    return gram / np.diag(gram).mean()


@pytest.mark.parametrize("seed", [50, 59])  # each gave "invalid value encountered"
def test_newton_nash_solver_emits_no_floating_point_warning(seed: int) -> None:
    gram = _near_degenerate_gram(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = weights_of(Pareto(), gram)
    assert abs(weights.sum() - 1.0) <= 1e-12


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_newton_nash_solver_silent_on_near_degenerate_geometry(seed: int) -> None:
    gram = _near_degenerate_gram(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = solve_nash_newton(gram)
    assert np.all(np.isfinite(raw)) and np.all(raw > 0)
