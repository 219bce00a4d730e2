"""The synchronisation-free solvers (``UpdateBalancer.device_weights``) against the host solvers.

The host strategies are the reference (they are themselves pinned by the property tests and the
cvxpy oracle); the device versions must give the same weights where the weights are determined
(full rank), the same invariants where they are not (rank-deficient: the joint update, the Nash
condition, KKT), the same degenerate rules, and must never read a value back to the host: every
call here runs under :func:`no_host_reads`, which fails on ``.item()``, ``bool()``,
``.tolist()``, ``.numpy()`` and the operators that synchronise on CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gram_samplers import (
    GramSpec,
    assert_min_norm_kkt,
    equal_projections,
    gram_specs,
    nash_residual,
    sample_factor,
    sample_gram,
)
from hypothesis import given, settings
from sync_guard import no_host_reads

from pub_optim.solvers.device import MIN_NORM_MAX_TASKS
from pub_optim.strategies import (
    CAGrad,
    Equal,
    EqualMagnitude,
    Fixed,
    MinNorm,
    Pareto,
    UpdateBalancer,
)
from pub_optim.strategies.pcgrad import PCGrad

FEW = settings(max_examples=20, deadline=None)
SOME = settings(max_examples=40, deadline=None)

DEVICE_STRATEGIES = {"pareto": Pareto, "min-norm": MinNorm, "equal-magnitude": EqualMagnitude}
#: Full rank, condition number <= ~1e3: the weights are determined to ~1e-13; the device solvers
#: differ from the host ones by their stopping rules (Newton: fixed count vs residual 1e-13;
#: IMTL-G: a 1e-10 ridge vs the pseudo-inverse, ~1e-10 * cond relative).
WELL_CONDITIONED_ATOL = 1e-7


def device_weights(balancer: UpdateBalancer, gram: torch.Tensor) -> np.ndarray:
    with no_host_reads():
        weights, valid = balancer.device_weights(gram)
    assert weights.dtype == torch.float64 and weights.shape == (gram.shape[0],)
    assert bool(valid)
    out: np.ndarray = weights.numpy()
    assert np.all(np.isfinite(out))
    return out


@pytest.mark.parametrize("name", list(DEVICE_STRATEGIES))
@SOME
@given(spec=gram_specs(max_k=MIN_NORM_MAX_TASKS, full_rank=True))
def test_same_weights_as_the_host_solver_on_full_rank(name: str, spec: GramSpec):
    balancer = DEVICE_STRATEGIES[name]()
    gram = spec.tensor()
    np.testing.assert_allclose(
        device_weights(balancer, gram),
        balancer(gram).numpy(),
        rtol=0.0,
        atol=WELL_CONDITIONED_ATOL,
    )


@FEW
@given(spec=gram_specs(min_k=2, max_k=MIN_NORM_MAX_TASKS, full_rank=False))
def test_pareto_rank_deficient_same_rule_as_the_host(spec: GramSpec):
    # Where a Nash point exists both reach it (residual ~1e-13 on G / mean diag); where none
    # does both take the same ridge of the ladder, so the weights agree too.
    balancer = Pareto(normalization="none")
    gram = spec.matrix()
    scale = float(np.mean(np.diag(gram)))
    host = balancer(torch.from_numpy(gram)).numpy()
    device = device_weights(balancer, torch.from_numpy(gram))
    host_residual = nash_residual(gram, host)
    if host_residual <= 1e-6:
        assert nash_residual(gram, device) <= 1e-6
    np.testing.assert_allclose(device * math.sqrt(scale), host * math.sqrt(scale), atol=1e-5)


def test_ridge_ladder_built_on_the_device_is_the_documented_one():
    # Built from arange/pow on the device (a tensor from Python floats would be a copy from the
    # host); it must equal NASH_RIDGES, i.e. 0 then the host solver's ladder 1e-8 * 100^i.
    from pub_optim.solvers import device

    ladder = device._ridges_on(torch.eye(2, dtype=torch.float64))
    assert ladder.tolist() == list(device.NASH_RIDGES)


def test_pareto_hardest_sampled_case_converges_within_the_fixed_iterations():
    # 16 colinear updates (rank 1): no Nash point, and the ridge the host accepts takes it 60
    # Newton solves (the most over 1,400 sampled and conflicting matrices). The device solver's
    # fixed count must cover it: with 45 iterations its weights differ completely.
    gram = torch.from_numpy(sample_gram(16, 1, 1.0, seed=3))
    balancer = Pareto()
    np.testing.assert_allclose(
        device_weights(balancer, gram), balancer(gram).numpy(), rtol=1e-6, atol=0.0
    )


@FEW
@given(spec=gram_specs(min_k=2, max_k=MIN_NORM_MAX_TASKS, full_rank=False))
def test_min_norm_rank_deficient_kkt_and_joint_update(spec: GramSpec):
    # The minimiser's weights are not unique on colinear updates; its joint update is.
    gram = spec.matrix()
    scale = float(np.mean(np.diag(gram)))
    device = device_weights(MinNorm(), torch.from_numpy(gram))
    host = MinNorm()(torch.from_numpy(gram)).numpy()
    assert_min_norm_kkt(gram / scale, device, tol=1e-8)
    joint_gap = (device - host) @ (gram / scale) @ (device - host)
    assert joint_gap <= 1e-12


@FEW
@given(spec=gram_specs(min_k=2, max_k=MIN_NORM_MAX_TASKS, full_rank=False))
def test_equal_magnitude_rank_deficient_projections(spec: GramSpec):
    gram = spec.matrix()
    device = device_weights(EqualMagnitude(), torch.from_numpy(gram))
    host = EqualMagnitude()(torch.from_numpy(gram)).numpy()
    host_proj = equal_projections(gram, host)
    device_proj = equal_projections(gram, device)
    if np.ptp(host_proj) <= 1e-6 * np.abs(host_proj).max():  # the host found an exact solution
        assert np.ptp(device_proj) <= 1e-5 * np.abs(device_proj).max()
        np.testing.assert_allclose(device_proj, host_proj, rtol=1e-5)
    else:  # both fall back to equal weights
        np.testing.assert_allclose(device, host, atol=0.0)


@pytest.mark.parametrize("name", [*DEVICE_STRATEGIES, "equal"])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_zero_updates_get_weight_zero_and_the_rest_is_balanced_apart(name: str, scale: float):
    factor = sample_factor(4, 4, seed=3)
    factor[1] = 0.0
    factor[3] = 0.0
    gram = torch.from_numpy(scale * factor @ factor.T)
    balancer = (DEVICE_STRATEGIES | {"equal": Equal})[name]()
    np.testing.assert_allclose(
        device_weights(balancer, gram), balancer(gram).numpy(), rtol=0.0, atol=1e-9
    )


@pytest.mark.parametrize("name", [*DEVICE_STRATEGIES, "equal"])
@pytest.mark.parametrize("normalization", ["sum", "none"])
def test_all_zero_updates_give_equal_weights(name: str, normalization: str):
    balancer = (DEVICE_STRATEGIES | {"equal": Equal})[name](normalization=normalization)
    gram = torch.zeros(3, 3, dtype=torch.float64)
    np.testing.assert_array_equal(device_weights(balancer, gram), balancer(gram).numpy())


@pytest.mark.parametrize(
    ("gram", "expected"),
    [
        # Exactly opposed: no Nash point; the ridge gives equal weights (no step).
        ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5]),
        # d and -2d: Nash point of the ridged geometry, as the host solver.
        ([[1.0, -2.0], [-2.0, 4.0]], None),
        # Colinear d and 2d: alpha ~ 1/|d_k| (equal progress), as the host solver.
        ([[1.0, 2.0], [2.0, 4.0]], None),
    ],
)
@pytest.mark.parametrize("name", list(DEVICE_STRATEGIES))
def test_degenerate_pairs_follow_the_host_rule(name: str, gram, expected):
    balancer = DEVICE_STRATEGIES[name]()
    tensor = torch.tensor(gram, dtype=torch.float64)
    device = device_weights(balancer, tensor)
    host = balancer(tensor).numpy()
    np.testing.assert_allclose(device, host, atol=1e-6)
    if expected is not None:
        np.testing.assert_allclose(device, expected, atol=1e-6)


@pytest.mark.parametrize("name", [*DEVICE_STRATEGIES, "equal"])
@pytest.mark.parametrize(
    "bad",
    [
        [[float("nan"), 0.0], [0.0, 1.0]],
        [[1.0, float("inf")], [float("inf"), 1.0]],
        [[-1.0, 0.0], [0.0, 1.0]],
    ],
)
def test_invalid_gram_is_flagged_and_gives_finite_equal_weights(name: str, bad):
    balancer = (DEVICE_STRATEGIES | {"equal": Equal})[name]()
    gram = torch.tensor(bad, dtype=torch.float64)
    with pytest.raises(ValueError):
        balancer(gram)  # the host path raises; the device path reports it in ``valid``
    with no_host_reads():
        weights, valid = balancer.device_weights(gram)
    assert not bool(valid)
    np.testing.assert_array_equal(weights.numpy(), [0.5, 0.5])


def test_fixed_weights_on_the_device_are_the_given_ones_normalised():
    balancer = Fixed([3.0, 1.0])
    gram = torch.eye(2, dtype=torch.float64)
    balancer.device_weights(gram)  # the first call copies the weights to the device
    np.testing.assert_allclose(device_weights(balancer, gram), [0.75, 0.25])


def test_fixed_weights_changed_after_the_first_call_are_used():
    balancer = Fixed([3.0, 1.0])
    gram = torch.eye(2, dtype=torch.float64)
    balancer.device_weights(gram)
    balancer.weights = [1.0, 1.0]
    np.testing.assert_allclose(device_weights(Fixed([1.0, 1.0]), gram), [0.5, 0.5])
    balancer.device_weights(gram)  # copies the new weights
    np.testing.assert_allclose(device_weights(balancer, gram), [0.5, 0.5])


def test_shape_errors_are_raised_before_any_device_work():
    with pytest.raises(ValueError, match="square"):
        Pareto().device_weights(torch.zeros(2, 3, dtype=torch.float64))


def test_min_norm_beyond_its_task_limit_says_what_to_do():
    k = MIN_NORM_MAX_TASKS + 1
    with pytest.raises(ValueError, match="sync_free=False"):
        MinNorm().device_weights(torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("balancer", [PCGrad(), CAGrad()])
def test_strategies_without_a_device_solver_say_so(balancer: UpdateBalancer):
    assert not balancer.supports_sync_free
    with pytest.raises(NotImplementedError, match="sync_free=False"):
        balancer.device_weights(torch.eye(2, dtype=torch.float64))


def test_the_guard_catches_a_host_solver():
    # The guard itself: the host solvers read the Gram matrix back, and it notices.
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        Pareto()(torch.eye(3, dtype=torch.float64))
