"""Property tests of the task-weighting strategies on sampled Gram matrices.

The invariants come from the method (pub-method.md) and the papers behind each strategy: Nash
bargaining (Navon et al., ICML 2022), MGDA / min-norm (Sener & Koltun, NeurIPS 2018), IMTL-G /
equal-magnitude (Liu et al., ICLR 2021). Matrices come from the seeded samplers of
``gram_samplers`` (rank 1..K, K = 1..16, scale 1e-12..1e12). Tolerances are stated where they
are used, with the reason; "well conditioned" means full rank with condition number <= ~1e3.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from gram_samplers import (
    GramSpec,
    assert_min_norm_kkt,
    assert_normalized,
    assert_permutation_equivariant,
    assert_scale_invariant,
    equal_projections,
    gram_specs,
    nash_residual,
    permutation,
    sample_factor,
    weights_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pub_optim.strategies import (
    Equal,
    EqualMagnitude,
    Fixed,
    MinNorm,
    Pareto,
    UpdateBalancer,
    get_strategy,
)

GRAM_STRATEGIES = {
    "pareto": Pareto,
    "min-norm": MinNorm,
    "equal-magnitude": EqualMagnitude,
}
ALL_STRATEGIES = {**GRAM_STRATEGIES, "equal": Equal}

FEW = settings(max_examples=25, deadline=None)
SOME = settings(max_examples=40, deadline=None)

#: Well-conditioned matrices (cond <= ~1e3): weights are determined to ~1e3 * 1e-16 relative;
#: 1e-9 leaves room for the solvers' own stopping tolerances (Newton stops at residual 1e-13).
WELL_CONDITIONED_ATOL = 1e-9


def _strategy_ids(mapping: dict[str, type[UpdateBalancer]]) -> list[str]:
    return list(mapping)


# ------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@SOME
@given(spec=gram_specs(full_rank=True), perm_seed=st.integers(0, 2**16))
def test_permutation_equivariance_well_conditioned(name: str, spec: GramSpec, perm_seed: int):
    strategy = ALL_STRATEGIES[name]()
    perm = permutation(spec.k, perm_seed)
    assert_permutation_equivariant(strategy, spec.matrix(), perm, atol=WELL_CONDITIONED_ATOL)


@pytest.mark.parametrize("name", ["pareto", "equal-magnitude"])
@FEW
@given(spec=gram_specs(min_k=2, full_rank=False), perm_seed=st.integers(0, 2**16))
def test_permutation_equivariance_rank_deficient(name: str, spec: GramSpec, perm_seed: int):
    # Rank < K: the answer is unique (Nash point or ridge-regularised Nash point; minimum-norm
    # least-squares solution or the equal-weight fallback) but computed from a matrix with a
    # condition number of ~1e8 (Pareto's ridge) or a cut-off at 1e-10 (pinv), so agreement to
    # 1e-6 in the normalised weights is what double precision supports.
    strategy = GRAM_STRATEGIES[name]()
    perm = permutation(spec.k, perm_seed)
    assert_permutation_equivariant(strategy, spec.matrix(), perm, atol=1e-6)


@FEW
@given(spec=gram_specs(min_k=2, full_rank=False), perm_seed=st.integers(0, 2**16))
def test_min_norm_permutation_rank_deficient_joint_update(spec: GramSpec, perm_seed: int):
    # Without the ridge the min-norm weights need not be unique, but the min-norm point
    # u = sum a_k d_k is; G a = D^T u must permute with the tasks, and a^T G a is the same.
    gram = spec.matrix()
    perm = permutation(spec.k, perm_seed)
    strategy = MinNorm()
    base = weights_of(strategy, gram)
    permuted_gram = gram[np.ix_(perm, perm)]
    permuted = weights_of(strategy, permuted_gram)
    atol = 1e-9 * spec.scale  # the 1e-10 ridge moves G a by at most ~1e-10 * mean diagonal
    np.testing.assert_allclose(permuted_gram @ permuted, (gram @ base)[perm], rtol=0, atol=atol)
    assert abs(permuted @ permuted_gram @ permuted - base @ gram @ base) <= atol


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@SOME
@given(
    spec=gram_specs(full_rank=True),
    exponent=st.floats(-6.0, 6.0),
)
def test_scale_invariance_well_conditioned(name: str, spec: GramSpec, exponent: float):
    strategy = ALL_STRATEGIES[name]()
    assert_scale_invariant(strategy, spec.matrix(), 10.0**exponent, atol=WELL_CONDITIONED_ATOL)


@pytest.mark.parametrize("name", ["pareto", "equal-magnitude"])
@FEW
@given(spec=gram_specs(min_k=2, full_rank=False), exponent=st.floats(-6.0, 6.0))
def test_scale_invariance_rank_deficient(name: str, spec: GramSpec, exponent: float):
    # Same tolerance and reason as test_permutation_equivariance_rank_deficient.
    strategy = GRAM_STRATEGIES[name]()
    assert_scale_invariant(strategy, spec.matrix(), 10.0**exponent, atol=1e-6)


@SOME
@given(spec=gram_specs(full_rank=True), exponent=st.floats(-6.0, 6.0))
def test_pareto_raw_weights_scale_as_inverse_sqrt(spec: GramSpec, exponent: float):
    # alpha_k (G alpha)_k = 1 on G  <=>  alpha / sqrt(c) solves it on c G.
    gram = spec.matrix()
    factor = 10.0**exponent
    strategy = Pareto(normalization="none")
    np.testing.assert_allclose(
        weights_of(strategy, factor * gram) * math.sqrt(factor),
        weights_of(strategy, gram),
        rtol=1e-9,
    )


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@FEW
@given(spec=gram_specs())
def test_weights_are_finite_float64_and_sum_to_one(name: str, spec: GramSpec):
    weights = weights_of(ALL_STRATEGIES[name](), spec.matrix())
    assert_normalized(weights)


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@pytest.mark.parametrize("scale", [0.0, 1e-12, 1.0, 1e12])
def test_single_task_gets_weight_one(name: str, scale: float):
    weights = weights_of(ALL_STRATEGIES[name](), np.array([[scale]]))
    assert weights.tolist() == [1.0]


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_single_task_fixed_weight_is_normalised_to_one(scale: float):
    assert weights_of(Fixed([3.5]), np.array([[scale]])).tolist() == [1.0]


@pytest.mark.parametrize("name", ["pareto", "equal-magnitude", "equal"])
@pytest.mark.parametrize("k", [2, 3, 5, 16])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 3e12])
def test_identical_updates_get_equal_weights(name: str, k: int, scale: float):
    # All tasks with the same update d: the symmetric Nash point, the minimum-norm solution of
    # G a = c sqrt(diag G), and equal weighting are all exactly 1/K, so the joint update is
    # exactly the wrapped optimizer's step d.
    weights = weights_of(ALL_STRATEGIES[name](), np.full((k, k), scale))
    np.testing.assert_allclose(weights, np.full(k, 1.0 / k), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 16])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 3e12])
def test_min_norm_identical_updates(k: int, scale: float):
    # Every point of the simplex is a minimiser; the joint update is d for all of them, which is
    # what the invariant needs: weights >= 0 summing to one.
    weights = weights_of(MinNorm(), np.full((k, k), scale))
    assert np.all(weights >= 0.0)
    assert_normalized(weights)
    # The 1e-10 ridge picks the one of smallest |a|, 1/K. It is held in the diagonal
    # 1 + 1e-10 with a relative precision of 1.1e-16 / 1e-10 ~ 1e-6, so that is the precision of
    # the tie-break (measured: 2e-11 at K=3, 1.5e-7 at K=16, i.e. 2.3e-6 relative).
    np.testing.assert_allclose(weights, np.full(k, 1.0 / k), rtol=1e-5, atol=0.0)


@given(
    magnitudes=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=8),
    exponent=st.floats(-12.0, 12.0),
)
@FEW
def test_colinear_updates_follow_each_method(magnitudes: list[float], exponent: float):
    # d_k = c_k d with c_k > 0: G = s c c^T.
    c = np.array(magnitudes)
    gram = 10.0**exponent * np.outer(c, c)
    # Nash: alpha_k c_k (sum_j c_j alpha_j) s = 1 for all k  =>  alpha ∝ 1/c.
    np.testing.assert_allclose(
        weights_of(Pareto(), gram), (1 / c) / np.sum(1 / c), rtol=1e-9, atol=0
    )
    # Equal magnitude: any a with c.a = const has equal projections; the documented rule takes
    # the minimum-norm solution in the scaled coordinates b_k = a_k c_k (equal shares): a ∝ 1/c.
    np.testing.assert_allclose(
        weights_of(EqualMagnitude(), gram), (1 / c) / np.sum(1 / c), rtol=1e-8
    )
    # Min-norm: the joint update (c.a) d is the smallest update c_min d. The ridge r = 1e-10 x
    # mean(c^2) (in units of s) moves the objective (c.a)^2 by at most r, hence c.a by at most
    # r / (2 c_min); and a task with c_j >= 1.01 c_min can hold a weight w only if the ridge
    # saving (<= r) pays for the increase (>= 2 c_min * 0.01 c_min * w): w <= r / (0.02 c_min^2)
    # (<= 5e-5 for c in [0.1, 10]). Near-ties (c_j < 1.01 c_min) may share the weight.
    alpha = weights_of(MinNorm(), gram)
    ridge = 1e-10 * float(np.mean(c**2))
    assert abs(alpha @ c - c.min()) <= ridge / (2 * c.min()) + 1e-12 * c.min()
    far = c >= 1.01 * c.min()
    assert alpha[far].sum() <= ridge / (0.02 * c.min() ** 2) + 1e-12
    # Exact ties share equally (the ridge picks the smallest |a| among the minimisers).
    tied = np.array([c.min(), c.min(), 2 * c.min()])
    np.testing.assert_allclose(
        weights_of(MinNorm(), 10.0**exponent * np.outer(tied, tied)), [0.5, 0.5, 0.0], atol=1e-9
    )


# ------------------------------------------------------------------- defining conditions


@SOME
@given(spec=gram_specs(full_rank=True))
def test_pareto_raw_weights_satisfy_the_nash_condition(spec: GramSpec):
    gram = spec.matrix()
    raw = weights_of(Pareto(normalization="none"), gram)
    assert np.all(raw > 0.0)
    assert nash_residual(gram, raw) <= 1e-9
    # The default normalisation is the same mixture, summing to one.
    np.testing.assert_allclose(weights_of(Pareto(), gram), raw / raw.sum(), rtol=1e-12)


@SOME
@given(spec=gram_specs())
def test_pareto_positive_weights_on_any_rank(spec: GramSpec):
    # Rank < K without a Nash point is solved on G + ridge: the weights stay strictly positive.
    assert np.all(weights_of(Pareto(), spec.matrix()) > 0.0)


@pytest.mark.parametrize("name", _strategy_ids(GRAM_STRATEGIES))
@FEW
@given(spec=gram_specs(min_k=2, full_rank=False))
def test_degenerate_matrices_raise_no_floating_point_warning(name: str, spec: GramSpec):
    # Rank < K (often no Nash point, singular systems): the solvers handle it by rule, without
    # numpy warnings (the native Newton solver runs without an errstate context).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights_of(GRAM_STRATEGIES[name](), spec.matrix())


@SOME
@given(spec=gram_specs())
def test_min_norm_kkt_and_no_task_pushed_backwards(spec: GramSpec):
    gram = spec.matrix()
    alpha = weights_of(MinNorm(), gram)
    # The ridge (1e-10 x mean diagonal) shifts (G a)_k and a^T G a by at most ~2e-10 x mean
    # diagonal; rounding in a K <= 16 solve is far below that.
    tol = 1e-9 * spec.scale
    assert_min_norm_kkt(gram, alpha, tol)
    # Non-conflicting: <d_k, u> = (G a)_k >= 0 for every task.
    assert np.all(gram @ alpha >= -tol)


@SOME
@given(spec=gram_specs(full_rank=True))
def test_equal_magnitude_equal_projections_when_full_rank(spec: GramSpec):
    gram = spec.matrix()
    alpha = weights_of(EqualMagnitude(), gram)
    projections = equal_projections(gram, alpha)
    exact = np.linalg.solve(gram, np.sqrt(np.diag(gram)))
    if exact.sum() > 0.0:
        # G a = c sqrt(diag G) with c > 0: every task progresses by the same amount.
        assert projections.min() > 0.0
        spread = projections.max() - projections.min()
        assert spread <= 1e-9 * projections.max()
    else:
        # No equal-projection update with a positive weight sum: the documented fallback.
        assert alpha.tolist() == [1.0 / spec.k] * spec.k


@SOME
@given(spec=gram_specs(min_k=2))
def test_equal_magnitude_is_exact_or_falls_back(spec: GramSpec):
    # Any rank: the result either has equal positive projections (an exact solution of
    # G a = c sqrt(diag G), c > 0) or is the documented fallback, equal weights. A least-squares
    # compromise with unequal projections is neither.
    gram = spec.matrix()
    alpha = weights_of(EqualMagnitude(), gram)
    projections = equal_projections(gram, alpha)
    fallback = np.allclose(alpha, 1.0 / spec.k, rtol=0, atol=1e-15)
    exact = projections.min() > 0.0 and (
        projections.max() - projections.min() <= 1e-6 * projections.max()
    )
    assert fallback or exact, f"weights {alpha} give projections {projections}"


# --------------------------------------------------------------------- degenerate geometry


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@pytest.mark.parametrize("k", [1, 2, 7])
def test_zero_matrix_gives_equal_weights(name: str, k: int):
    weights = weights_of(ALL_STRATEGIES[name](), np.zeros((k, k)))
    np.testing.assert_allclose(weights, np.full(k, 1.0 / k), rtol=0, atol=1e-16)


@pytest.mark.parametrize("name", _strategy_ids(GRAM_STRATEGIES))
@FEW
@given(spec=gram_specs(min_k=2, max_k=10), data=st.data())
def test_zero_update_task_gets_weight_zero(name: str, spec: GramSpec, data: st.DataObject):
    # A zero update (or one below 1e-12 of the largest squared norm) gets weight exactly 0 and
    # the others are balanced among themselves, exactly as if the task were absent.
    zeros = data.draw(
        st.lists(st.integers(0, spec.k - 1), min_size=1, max_size=spec.k - 1, unique=True)
    )
    _check_zero_update_tasks(name, spec, zeros, data.draw(st.sampled_from([0.0, 1e-7])))


@pytest.mark.parametrize("name", _strategy_ids(GRAM_STRATEGIES))
def test_zero_update_tasks_of_a_matrix_with_one_tiny_realised_row(name: str):
    # Found by hypothesis: the kept row's norm is 6.7e-4 (its basis entry is nearly zero), so
    # rows scaled by 1e-8 of their own norm were not below the threshold: the rule is relative
    # to the largest realised norm, and so is the check.
    spec = GramSpec(k=3, rank=1, scale=1.0, seed=1084083, norm_spread=10.0, spectrum_spread=3.0)
    _check_zero_update_tasks(name, spec, [1, 2], 1e-7)


def _check_zero_update_tasks(name: str, spec: GramSpec, zeros: list[int], tiny: float) -> None:
    # Squared norm 0, or 1e-14 x the largest squared norm of the others: both below the 1e-12
    # threshold of the rule. (Relative to the realised largest row: the sampled row norms can
    # differ by far more than norm_spread, when a row of the random basis is nearly zero.)
    factor = sample_factor(spec.k, spec.rank, spec.seed) * math.sqrt(spec.scale)
    keep = np.setdiff1d(np.arange(spec.k), zeros)
    largest = np.linalg.norm(factor[keep], axis=1).max()
    own = np.linalg.norm(factor[zeros], axis=1, keepdims=True)
    factor[zeros] *= tiny * largest / np.where(own > 0, own, 1.0)
    gram = factor @ factor.T
    strategy = GRAM_STRATEGIES[name]()
    weights = weights_of(strategy, gram)
    assert np.all(weights[zeros] == 0.0)
    # Same numbers up to BLAS rounding (the products are taken over different shapes).
    np.testing.assert_allclose(
        weights[keep], weights_of(strategy, gram[np.ix_(keep, keep)]), rtol=1e-11, atol=1e-12
    )


@pytest.mark.parametrize("name", _strategy_ids(GRAM_STRATEGIES))
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_exactly_opposed_pair_gets_equal_weights(name: str, scale: float):
    # d and -d: no joint update helps both. Pareto (ridge, "no step"), min-norm (the origin is
    # the midpoint) and equal-magnitude (no solution with a positive sum: fallback) all give
    # [1/2, 1/2], whose joint update is zero.
    gram = scale * np.array([[1.0, -1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(
        weights_of(GRAM_STRATEGIES[name](), gram), [0.5, 0.5], rtol=0, atol=1e-12
    )


@given(ratio=st.floats(0.01, 100.0), exponent=st.floats(-12.0, 12.0))
@FEW
def test_opposed_updates_of_different_size(ratio: float, exponent: float):
    # d and -r d: the convex hull contains the origin.
    gram = 10.0**exponent * np.array([[1.0, -ratio], [-ratio, ratio**2]])
    # Min-norm: the origin, at a = (r, 1) / (1 + r).
    np.testing.assert_allclose(
        weights_of(MinNorm(), gram), np.array([ratio, 1.0]) / (1 + ratio), atol=1e-9
    )
    # Pareto: no Nash point; the ridge solution points along the null vector (r, 1): no step.
    alpha = weights_of(Pareto(), gram)
    assert np.all(alpha > 0)
    joint = float(alpha @ gram @ alpha)
    assert joint <= 1e-6 * np.max(np.diag(gram))
    # Equal magnitude: no equal-projection update with positive progress: equal weights.
    assert weights_of(EqualMagnitude(), gram).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@FEW
@given(spec=gram_specs(min_k=3, max_k=8), data=st.data())
def test_opposed_pair_among_others_stays_finite(name: str, spec: GramSpec, data: st.DataObject):
    factor = sample_factor(spec.k, spec.rank, spec.seed)
    i, j = data.draw(st.lists(st.integers(0, spec.k - 1), min_size=2, max_size=2, unique=True))
    factor[j] = -data.draw(st.floats(0.1, 10.0)) * factor[i]
    gram = spec.scale * (factor @ factor.T)
    weights = weights_of(ALL_STRATEGIES[name](), gram)
    assert_normalized(weights)
    if name != "equal-magnitude":  # IMTL-G weights may be negative by design
        assert np.all(weights >= 0.0)


# ------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@pytest.mark.parametrize(
    ("gram", "message"),
    [
        (torch.zeros(2, 3), "square"),
        (torch.zeros(3), "square"),
        (torch.zeros(2, 2, 2), "square"),
        (torch.zeros(0, 0), "K >= 1"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "non-finite"),
    ],
)
def test_invalid_matrix_raises_value_error(name: str, gram: torch.Tensor, message: str):
    with pytest.raises(ValueError, match=message):
        ALL_STRATEGIES[name]()(gram)


@pytest.mark.parametrize("name", _strategy_ids(GRAM_STRATEGIES))
def test_negative_squared_norm_raises_value_error(name: str):
    # A Gram diagonal holds squared norms: a negative one is not a Gram matrix.
    with pytest.raises(ValueError, match="negative"):
        GRAM_STRATEGIES[name]()(torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
@pytest.mark.parametrize("gram", [np.eye(2), [[1.0, 0.0], [0.0, 1.0]], None, 1.0])
def test_non_tensor_raises_type_error(name: str, gram: object):
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ALL_STRATEGIES[name]()(gram)


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
def test_float32_input_gives_float64_weights_equal_to_float64_input(name: str):
    gram = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 0.5]], dtype=torch.float32)
    strategy = ALL_STRATEGIES[name]()
    out = strategy(gram)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, strategy(gram.double()), rtol=0, atol=0)


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
def test_asymmetric_input_is_symmetrised(name: str):
    # Dyadic entries: (G + S + (G + S)^T) / 2 == G exactly in floating point.
    gram = np.array([[2.0, 0.5, 0.125], [0.5, 1.0, 0.25], [0.125, 0.25, 0.5]])
    skew = np.array([[0.0, 0.25, -0.5], [-0.25, 0.0, 0.125], [0.5, -0.125, 0.0]])
    strategy = ALL_STRATEGIES[name]()
    np.testing.assert_array_equal(weights_of(strategy, gram + skew), weights_of(strategy, gram))


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="normalization"):
        Pareto(normalization="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solver"):
        Pareto(solver="ecos")  # type: ignore[arg-type]
    for bad in ([], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weight"):
            Fixed(bad)
    with pytest.raises(ValueError, match="3 weights but there are 2 tasks"):
        Fixed([1.0, 2.0, 3.0])(torch.eye(2))
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("nash")
    with pytest.raises(TypeError, match="strategy must be"):
        get_strategy(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------- baselines and registry


@FEW
@given(
    weights=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=16).filter(lambda w: sum(w) > 0),
    exponent=st.floats(-12.0, 12.0),
)
def test_fixed_weights_ignore_the_geometry(weights: list[float], exponent: float):
    k = len(weights)
    gram = 10.0**exponent * sample_factor(k, k, 0) @ sample_factor(k, k, 0).T
    given_weights = np.array(weights)
    np.testing.assert_allclose(
        weights_of(Fixed(weights), gram), given_weights / given_weights.sum(), rtol=1e-15
    )
    np.testing.assert_array_equal(
        weights_of(Fixed(weights, normalization="none"), gram), given_weights
    )
    # Zero updates do not change fixed weights (the rule for zero updates is for Gram-based
    # strategies only): the same result as on any other matrix, bit for bit.
    np.testing.assert_array_equal(
        weights_of(Fixed(weights), np.zeros((k, k))), weights_of(Fixed(weights), gram)
    )


def test_get_strategy_names_and_instances():
    for name, cls in ALL_STRATEGIES.items():
        assert type(get_strategy(name)) is cls
        assert type(get_strategy(name.upper().replace("-", "_"))) is cls
    instance = MinNorm()
    assert get_strategy(instance) is instance
    fixed = get_strategy([1.0, 3.0])
    assert isinstance(fixed, Fixed)
    assert weights_of(fixed, np.eye(2)).tolist() == [0.25, 0.75]


@pytest.mark.parametrize("name", _strategy_ids(ALL_STRATEGIES))
def test_weights_stay_on_the_input_device_and_do_not_track_gradients(name: str):
    gram = torch.tensor([[1.0, 0.2], [0.2, 2.0]], dtype=torch.float64, requires_grad=True)
    out = ALL_STRATEGIES[name]()(gram)
    assert out.device == gram.device
    assert not out.requires_grad


@pytest.mark.parametrize("noisy_row", [0, 1, 2])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 3e12])
def test_min_norm_equal_updates_with_rounded_gram(noisy_row: int, scale: float):
    # Three bit-identical float32 updates whose Gram matrix came out of torch.mm with one row
    # rounded differently (seen on one CPU: row 1 larger by 6.8e-9, G not even symmetric). The
    # updates are equal, so the tie-break must give them equal weights there too.
    gram = np.full((3, 3), 1.0)
    gram[noisy_row] *= 1.0 + 6.8e-9
    weights = weights_of(MinNorm(), scale * gram)
    np.testing.assert_allclose(weights, np.full(3, 1.0 / 3), rtol=1e-9, atol=0.0)


def test_min_norm_keeps_distinct_updates_apart():
    # Updates that differ by more than the Gram matrix's rounding are not merged: d_1 = 1.001 d
    # is longer than d_0 = d_2 = d, so min-norm puts all the weight on the two short ones.
    c = np.array([1.0, 1.001, 1.0])
    weights = weights_of(MinNorm(), np.outer(c, c))
    np.testing.assert_allclose(weights, [0.5, 0.0, 0.5], atol=1e-6)
