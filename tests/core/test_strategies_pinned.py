"""Pinned weights on fixed small Gram matrices, derived by hand (or by an independent solver).

Each matrix is written as the Gram matrix of explicit updates so that the derivations below can be
checked on paper. "pareto" is Nash bargaining (Navon et al., ICML 2022), "min-norm" MGDA (Sener &
Koltun, NeurIPS 2018), "equal-magnitude" IMTL-G (Liu et al., ICLR 2021).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pub_optim.strategies import Equal, EqualMagnitude, Fixed, MinNorm, Pareto

SQRT2 = math.sqrt(2.0)

# (a) Orthogonal updates of norms 2 and 1: G = diag(4, 1).
#   pareto:          a_k (G a)_k = G_kk a_k^2 = 1  =>  a = (1/2, 1); normalised (1/3, 2/3).
#   min-norm (K=2):  t = (G22 - G12) / (G11 - 2 G12 + G22) = 1/5  =>  (1/5, 4/5).
#   equal-magnitude: G a = c (2, 1)  =>  a ∝ (1/2, 1)  =>  (1/3, 2/3).
CASE_A = np.diag([4.0, 1.0])

# (b) d1 = (1, 0), d2 = (1, 1): G = [[1, 1], [1, 2]], cos = 1/sqrt(2).
#   pareto (K=2):    a_k ∝ 1/|d_k| = (1, 1/sqrt2), raw a = (1, 1/sqrt2) / sqrt(1 + cos).
#   min-norm:        t = (2 - 1) / (1 - 2 + 2) = 1  =>  (1, 0) (d1 is the foot of the segment).
#   equal-magnitude: a1 + a2 = c, a1 + 2 a2 = sqrt2 c  =>  a ∝ (2 - sqrt2, sqrt2 - 1),
#                    i.e. ∝ (1, 1/sqrt2) as pareto.
CASE_B = np.array([[1.0, 1.0], [1.0, 2.0]])

# (c) Orthogonal updates of norms 1, 2, 3: G = diag(1, 4, 9).
#   pareto: a = (1, 1/2, 1/3), normalised (6, 3, 2)/11; min-norm: a ∝ 1/G_kk  =>  (36, 9, 4)/49;
#   equal-magnitude: a_k G_kk = c sqrt(G_kk)  =>  a ∝ 1/sqrt(G_kk), the same as pareto.
CASE_C = np.diag([1.0, 4.0, 9.0])

# (d) d1 = (1, 0), d2 = (0, 1), d3 = (2, 2): G = [[1, 0, 2], [0, 1, 2], [2, 2, 8]] (rank 2).
#   pareto: by symmetry a = (x, x, y): x (x + 2y) = 1 and y (4x + 8y) = 1. The first gives
#     y = (1 - x^2) / (2x); substituting, 2 (1 - x^2) + 2 (1 - x^2)^2 / x^2 = 1, i.e. x^2 = 2/3:
#     a = (sqrt(2/3), sqrt(2/3), sqrt(3/2)/6). Null vector (2, 2, -1) is not >= 0: a Nash point.
#   min-norm: the hull's closest point to 0 is (1/2, 1/2) on [d1, d2]: a = (1/2, 1/2, 0)
#     (KKT: G a = (1/2, 1/2, 2) >= a^T G a = 1/2).
#   equal-magnitude: range(G) = {v : v3 = 2 v1 + 2 v2} and sqrt(diag G) = (1, 1, 2 sqrt2) is not
#     in it (4 != 2 sqrt2): no exact solution, documented fallback (1/3, 1/3, 1/3).
CASE_D = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [2.0, 2.0, 8.0]])
CASE_D_RAW_PARETO = np.array([math.sqrt(2 / 3), math.sqrt(2 / 3), math.sqrt(1.5) / 6])

# (e) Unit updates with cosines 0.8 (1, 2), 0.5 (2, 3), 0 (1, 3): G = [[1, .8, 0], [.8, 1, .5],
#   [0, .5, 1]] (det 0.11 > 0).
#   equal-magnitude: sqrt(diag) = 1, G x = 1 gives x2 = -0.3/0.11 = -30/11, x1 = 35/11,
#     x3 = 26/11, sum 31/11 > 0  =>  (35, -30, 26)/31 (IMTL-G may give negative weights).
#   min-norm: the unconstrained optimum has a negative weight; on the support {1, 3} (G = I)
#     a = (1/2, 0, 1/2), KKT: G a = (1/2, 0.65, 1/2) >= 1/2. G > 0, so it is the minimiser.
#   pareto: no closed form; the 30-digit solution of the three equations a_k (G a)_k = 1 by
#     mpmath.findroot (an independent solver; re-derived in test_case_e_pareto_by_mpmath).
CASE_E = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.5], [0.0, 0.5, 1.0]])
CASE_E_RAW_PARETO = np.array(
    [0.78791663789397937242, 0.60156644988386219184, 0.86085397446705272847]
)

PINNED = [
    ("a", CASE_A, "pareto", [1 / 3, 2 / 3]),
    ("a", CASE_A, "min-norm", [0.2, 0.8]),
    ("a", CASE_A, "equal-magnitude", [1 / 3, 2 / 3]),
    ("b", CASE_B, "pareto", [SQRT2 / (1 + SQRT2), 1 / (1 + SQRT2)]),
    ("b", CASE_B, "min-norm", [1.0, 0.0]),
    ("b", CASE_B, "equal-magnitude", [2 - SQRT2, SQRT2 - 1]),
    ("c", CASE_C, "pareto", [6 / 11, 3 / 11, 2 / 11]),
    ("c", CASE_C, "min-norm", [36 / 49, 9 / 49, 4 / 49]),
    ("c", CASE_C, "equal-magnitude", [6 / 11, 3 / 11, 2 / 11]),
    ("d", CASE_D, "pareto", list(CASE_D_RAW_PARETO / CASE_D_RAW_PARETO.sum())),
    ("d", CASE_D, "min-norm", [0.5, 0.5, 0.0]),
    ("d", CASE_D, "equal-magnitude", [1 / 3, 1 / 3, 1 / 3]),
    ("e", CASE_E, "pareto", list(CASE_E_RAW_PARETO / CASE_E_RAW_PARETO.sum())),
    ("e", CASE_E, "min-norm", [0.5, 0.0, 0.5]),
    ("e", CASE_E, "equal-magnitude", [35 / 31, -30 / 31, 26 / 31]),
]

RAW_PARETO = [
    ("a", CASE_A, [0.5, 1.0]),
    ("b", CASE_B, [1 / math.sqrt(1 + 1 / SQRT2), 1 / math.sqrt(2 * (1 + 1 / SQRT2))]),
    ("c", CASE_C, [1.0, 0.5, 1 / 3]),
    ("d", CASE_D, list(CASE_D_RAW_PARETO)),
    ("e", CASE_E, list(CASE_E_RAW_PARETO)),
]

FACTORIES = {"pareto": Pareto, "min-norm": MinNorm, "equal-magnitude": EqualMagnitude}


def _weights(strategy: object, gram: np.ndarray) -> np.ndarray:
    out = strategy(torch.from_numpy(gram))  # type: ignore[operator]
    assert out.dtype == torch.float64
    return out.numpy()


@pytest.mark.parametrize("scale", [1.0, 1e-9, 7.5e10])
@pytest.mark.parametrize(
    ("case", "gram", "name", "expected"), PINNED, ids=[f"{c}-{n}" for c, _, n, _ in PINNED]
)
def test_pinned_normalised_weights(
    case: str, gram: np.ndarray, name: str, expected: list[float], scale: float
):
    weights = _weights(FACTORIES[name](), scale * gram)
    # Min-norm carries a 1e-10 ridge (mean diagonal units): it moves these weights by < 1e-9.
    atol = 1e-9 if name == "min-norm" else 1e-12
    np.testing.assert_allclose(weights, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("case", "gram", "expected"), RAW_PARETO, ids=[c for c, _, _ in RAW_PARETO]
)
@pytest.mark.parametrize("solver", ["newton", "cvxpy", "ccp"])
def test_pinned_raw_pareto_weights(case: str, gram: np.ndarray, expected: list[float], solver):
    if solver != "newton":
        pytest.importorskip("cvxpy", reason="the cvxpy solvers need the 'cvxpy' extra")
    weights = _weights(Pareto(solver=solver, normalization="none"), gram)
    # Newton: residual ~1e-13. DPP and CCP (CLARABEL): residual ~1e-9 typically, ~1e-6 at worst
    # (on CASE_C the DPP solve ends "almost solved" at 1.3e-6), and the weights err as much.
    rtol = {"newton": 1e-12, "cvxpy": 1e-5, "ccp": 1e-5}[solver]
    np.testing.assert_allclose(weights, expected, rtol=rtol, atol=0)


def test_case_e_pareto_by_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    gram = [[mpmath.mpf(str(v)) for v in row] for row in CASE_E]

    def equations(*alpha):
        return [alpha[i] * sum(gram[i][j] * alpha[j] for j in range(3)) - 1 for i in range(3)]

    root = mpmath.findroot(equations, (0.7, 0.5, 0.8))
    np.testing.assert_allclose([float(v) for v in root], CASE_E_RAW_PARETO, rtol=1e-15)


@pytest.mark.parametrize("solver", ["newton", "cvxpy", "ccp"])
def test_opposed_pair_pinned_for_every_solver(solver: str):
    # d and -d: no Nash point; the ridge rule gives equal weights (no step) for every backend.
    gram = np.array([[1.0, -1.0], [-1.0, 1.0]])
    if solver == "newton":
        weights = _weights(Pareto(solver=solver), gram)
    else:
        pytest.importorskip("cvxpy", reason="the cvxpy solvers need the 'cvxpy' extra")
        from pub_optim.solvers.nash_cvxpy import NashConvergenceWarning

        with warnings.catch_warnings():
            # The CCP converges linearly on the ridge-regularised matrix (condition number 2e8)
            # and may stop at its 20-iteration limit, with a warning; the result is still
            # symmetric. That the warning is raised is tested in test_cvxpy_oracle.py.
            warnings.simplefilter("ignore", NashConvergenceWarning)
            weights = _weights(Pareto(solver=solver), gram)
    np.testing.assert_allclose(weights, [0.5, 0.5], rtol=0, atol=1e-9)


def test_pinned_baselines():
    gram = CASE_E
    np.testing.assert_array_equal(_weights(Equal(), gram), np.full(3, 1 / 3))
    np.testing.assert_allclose(_weights(Fixed([1.0, 2.0, 5.0]), gram), [0.125, 0.25, 0.625])
    np.testing.assert_array_equal(
        _weights(Fixed([1.0, 2.0, 5.0], normalization="none"), gram), [1.0, 2.0, 5.0]
    )
