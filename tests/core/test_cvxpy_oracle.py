"""Independent oracles for the strategies, and the cvxpy backends of the pareto strategy.

* min-norm (MGDA, Sener & Koltun, NeurIPS 2018) against a cvxpy QP on the simplex;
* pareto (Nash bargaining, Navon et al., ICML 2022): native Newton vs the cvxpy DPP program vs
  the Nash-MTL concave-convex procedure on the same matrices;
* equal-magnitude (IMTL-G, Liu et al., ICLR 2021) against numpy's least-squares solver;
* the cvxpy extra stays optional: ``import pub_optim`` never imports it and a missing cvxpy
  gives an ``ImportError`` that says how to install it.

Tests that need cvxpy skip, with the reason, when it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from gram_samplers import GramSpec, gram_specs, nash_residual, sample_gram, weights_of
from hypothesis import given, settings

from pub_optim.solvers.nash_newton import solve_nash_newton
from pub_optim.strategies import EqualMagnitude, MinNorm, Pareto

ROOT = Path(__file__).resolve().parents[2]
CVXPY_REASON = "the cvxpy oracles need the 'cvxpy' extra (pip install 'pub-optim[cvxpy]')"
INSTALL_HINT = "pip install 'pub-optim[cvxpy]'"


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cvxpy", reason=CVXPY_REASON)


@pytest.fixture(scope="module")
def nash_cvxpy(cp):
    from pub_optim.solvers import nash_cvxpy

    return nash_cvxpy


def _scaled(gram: np.ndarray) -> np.ndarray:
    """What the strategies hand to their solvers: G divided by its mean diagonal."""
    return gram / np.mean(np.diag(gram))


def _factor(gram: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(gram)
    return np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T


# --------------------------------------------------------------------- optional dependency


_IMPORT_CHECK = """
import sys, torch, pub_optim, pub_optim.strategies
from pub_optim.strategies import Pareto
Pareto(solver='ccp'); Pareto(solver='cvxpy')
Pareto()(torch.eye(3, dtype=torch.float64))
print('cvxpy imported:', 'cvxpy' in sys.modules or 'pub_optim.solvers.nash_cvxpy' in sys.modules)
sys.modules['cvxpy'] = None  # from here on, ``import cvxpy`` fails as if it were not installed
for solver in ('cvxpy', 'ccp'):
    try:
        Pareto(solver=solver)(torch.eye(2, dtype=torch.float64))
    except ImportError as exc:
        print('ImportError:', exc)
    else:
        print('no ImportError')
"""


@pytest.fixture(scope="module")
def import_check() -> str:
    """Run the import checks once, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_pub_optim_does_not_import_cvxpy(import_check: str):
    assert "cvxpy imported: False" in import_check, import_check


def test_missing_cvxpy_raises_import_error_with_install_hint(import_check: str):
    assert "no ImportError" not in import_check, import_check
    assert import_check.count(INSTALL_HINT) == 2, import_check


# ------------------------------------------------------------------------ min-norm vs a QP


def _simplex_qp(cp, gram: np.ndarray) -> np.ndarray:
    k = gram.shape[0]
    alpha = cp.Variable(k)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(_factor(gram) @ alpha)), [alpha >= 0, cp.sum(alpha) == 1]
    )
    problem.solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=200
    )
    assert problem.status in ("optimal", "optimal_inaccurate"), problem.status
    return np.asarray(alpha.value)


@settings(max_examples=30, deadline=None)
@given(spec=gram_specs())
def test_min_norm_matches_a_simplex_qp(cp, spec: GramSpec):
    gram = spec.matrix()
    ours = weights_of(MinNorm(), gram)
    oracle = _simplex_qp(cp, _scaled(gram))
    # Objective, in units of the mean diagonal: ours is exact up to its 1e-10 ridge; the QP is
    # an interior-point solution to ~1e-10. Ours may not be worse than the oracle.
    scaled = _scaled(gram)
    ours_value = float(ours @ scaled @ ours)
    oracle_value = float(oracle @ scaled @ oracle)
    assert ours_value <= oracle_value + 1e-9
    if spec.rank == spec.k:
        # Full rank, condition <= ~1e3: the minimiser is unique and well determined; the QP's
        # weights are within ~1e-6 of it (the interior point stops at a gap of 1e-12).
        np.testing.assert_allclose(ours, oracle, rtol=0, atol=1e-5)


# ----------------------------------------------------------------- pareto: three solvers


@settings(max_examples=10, deadline=None)
@given(spec=gram_specs(min_k=2, max_k=12, full_rank=True))
def test_pareto_newton_dpp_and_ccp_agree(nash_cvxpy, spec: GramSpec):
    gram = _scaled(spec.matrix())
    newton = solve_nash_newton(gram)
    dpp = nash_cvxpy.NashDPP()(gram)
    ccp_backend = nash_cvxpy.NashCCP()
    with warnings.catch_warnings():
        warnings.simplefilter("error", nash_cvxpy.NashConvergenceWarning)
        ccp = ccp_backend(gram)
    assert nash_residual(gram, newton) <= 1e-12
    assert nash_residual(gram, dpp) <= 1e-5
    assert nash_residual(gram, ccp) <= 1e-5
    # The CCP's own accuracy (residual <= 1e-5) bounds the agreement of the mixtures.
    for other in (dpp, ccp):
        np.testing.assert_allclose(other / other.sum(), newton / newton.sum(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dpp, newton, rtol=1e-5)


@pytest.mark.parametrize("solver", ["cvxpy", "ccp"])
@pytest.mark.parametrize("spec", [GramSpec(k=5, rank=5, scale=3e-9, seed=7)])
def test_pareto_strategy_backends_match_newton(cp, solver: str, spec: GramSpec):
    gram = spec.matrix()
    expected = weights_of(Pareto(), gram)
    np.testing.assert_allclose(weights_of(Pareto(solver=solver), gram), expected, atol=1e-5)
    raw = weights_of(Pareto(solver=solver, normalization="none"), gram)
    assert nash_residual(gram, raw) <= 1e-5


@pytest.mark.parametrize(
    "gram",
    [
        np.array([[1.0, -1.0], [-1.0, 1.0]]),  # d, -d
        np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),  # d, -d, e
    ],
    ids=["opposed", "opposed-plus-one"],
)
def test_no_nash_point_every_backend_uses_the_same_ridge(nash_cvxpy, gram: np.ndarray):
    # No Nash point: every solver regularises with the same ridge (1e-8 x mean diagonal) and
    # finds the Nash point of G + ridge * I.
    ridge = 1e-8 * np.trace(gram) / gram.shape[0]
    regularised = gram + ridge * np.eye(gram.shape[0])
    newton = solve_nash_newton(gram)
    dpp = nash_cvxpy.NashDPP()(gram)
    with pytest.warns(nash_cvxpy.NashConvergenceWarning):
        # cond(G + ridge I) = 2e8: the CCP converges linearly and stops at 20 iterations, warned.
        ccp = nash_cvxpy.NashCCP()(gram)
    assert nash_residual(regularised, newton) <= 1e-6
    assert nash_residual(regularised, dpp) <= 1e-4
    assert nash_residual(regularised, ccp) <= 1e-3
    for other in (dpp, ccp):
        np.testing.assert_allclose(other / other.sum(), newton / newton.sum(), atol=1e-5)


def test_ccp_phase_one_where_the_reference_linearisation_is_unbounded(cp, nash_cvxpy):
    # d1 = (1, 0), d2 = (-1, 0.2), d3 = (0, 1): G 1 = (0, 0.24, 1.2) is not positive, so the
    # Nash-MTL linearisation around alpha = 1 (log of (G 1)_1 = 0) has no bounded solution. A
    # Nash point exists (the null vector (1, 1, -0.2) is not >= 0).
    updates = np.array([[1.0, 0.0], [-1.0, 0.2], [0.0, 1.0]])
    gram = updates @ updates.T
    backend = nash_cvxpy.NashCCP()
    parts = backend.problem(3)
    norm = float(np.linalg.norm(gram))
    parts["gram"].value, parts["norm"].value = gram / norm, np.array([norm])
    parts["previous"].value = np.full(3, 1.0 + 1e-3)  # just inside the domain of the log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not DPP", "inaccurate"
        parts["ccp"].solve(solver=cp.CLARABEL)
    assert parts["ccp"].status not in ("optimal",)  # the reference's first step fails here
    alpha = backend(gram)  # phase one, then the procedure
    assert backend.last_num_solves >= 2
    newton = solve_nash_newton(gram)
    assert nash_residual(gram, alpha) <= 1e-5
    np.testing.assert_allclose(alpha / alpha.sum(), newton / newton.sum(), atol=1e-5)


def test_ccp_warm_start_from_the_previous_solution(nash_cvxpy):
    gram = _scaled(sample_gram(4, 4, 1.0, seed=3))
    backend = nash_cvxpy.NashCCP()
    first = backend(gram)
    cold = backend.last_num_solves
    again = backend(gram)
    assert backend.last_num_solves == 1 < cold  # started at the solution: one program
    np.testing.assert_allclose(again, first, rtol=1e-6)
    backend.reset()
    backend(gram)
    assert backend.last_num_solves == cold


def test_dpp_program_is_compiled_once_per_k(nash_cvxpy):
    backend = nash_cvxpy.NashDPP()
    problem = backend.problem(4)[0]
    assert problem.is_dpp()
    for seed in range(3):
        gram = _scaled(sample_gram(4, 4, 1.0, seed))
        assert nash_residual(gram, backend(gram)) <= 1e-5
        assert backend.problem(4)[0] is problem
    assert backend.problem(3)[0] is not problem


def test_solver_failure_raises_instead_of_returning_ones(nash_cvxpy, monkeypatch, cp):
    def broken(self, *args, **kwargs):
        raise cp.error.SolverError("forced failure")

    monkeypatch.setattr(cp.Problem, "solve", broken)
    gram = _scaled(sample_gram(3, 3, 1.0, seed=0))
    with pytest.raises(nash_cvxpy.NashSolverError, match="forced failure"):
        nash_cvxpy.NashDPP()(gram)
    with pytest.raises(nash_cvxpy.NashSolverError, match="forced failure"):
        nash_cvxpy.NashCCP()(gram)
    # Through the strategy: no exception, a warning, and the native solver's weights.
    for solver in ("cvxpy", "ccp"):
        with pytest.warns(RuntimeWarning, match="native Newton solver"):
            weights = weights_of(Pareto(solver=solver), gram)
        np.testing.assert_array_equal(weights, weights_of(Pareto(), gram))


def test_backends_validate_their_input(nash_cvxpy):
    for backend in (nash_cvxpy.NashDPP(), nash_cvxpy.NashCCP()):
        with pytest.raises(ValueError, match="square"):
            backend(np.zeros((2, 3)))
        with pytest.raises(ValueError, match="non-finite"):
            backend(np.array([[1.0, np.nan], [np.nan, 1.0]]))
        with pytest.raises(ValueError, match="positive diagonal"):
            backend(np.array([[1.0, 0.0], [0.0, 0.0]]))


# --------------------------------------------------------- equal-magnitude vs least squares


@settings(max_examples=40, deadline=None)
@given(spec=gram_specs())
def test_equal_magnitude_matches_least_squares(spec: GramSpec):
    gram = spec.matrix()
    norms = np.sqrt(np.diag(gram))
    # G alpha = sqrt(diag G) in the scaled coordinates beta_k = alpha_k |d_k|: C beta = 1 with
    # the cosine matrix C (the documented rule picks the minimum-norm beta when C is singular).
    cosines = gram / np.outer(norms, norms)
    beta, *_ = np.linalg.lstsq(cosines, np.ones(spec.k), rcond=None)  # SVD-based (LAPACK gelsd)
    solution = beta / norms
    exact = np.max(np.abs(cosines @ beta - 1.0)) <= 1e-6
    if spec.rank == spec.k:
        assert exact  # full rank, condition <= ~1e3
    ours = weights_of(EqualMagnitude(), gram)
    if exact and solution.sum() > 0:
        # The minimum-norm exact solution, normalised (unique when G has full rank).
        np.testing.assert_allclose(ours, solution / solution.sum(), rtol=1e-7, atol=1e-9)
    else:
        # No equal-projection solution with a positive sum: the documented fallback.
        np.testing.assert_allclose(ours, np.full(spec.k, 1 / spec.k), rtol=0, atol=1e-16)
