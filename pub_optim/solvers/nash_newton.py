"""Native solver of the Nash bargaining condition ``alpha_k (G alpha)_k = 1``.

The condition is the stationarity condition of the strictly convex problem

    min_{alpha > 0}  f(alpha) = 1/2 alpha^T G alpha - sum_k log alpha_k,

whose gradient is ``G alpha - 1/alpha`` and Hessian ``G + diag(1/alpha^2)`` (positive definite for
any PSD ``G``). ``f`` is self-concordant: the damped Newton method of Nesterov and Nemirovskii
(step ``1/(1+lam)`` with the Newton decrement ``lam``, full steps once ``lam <= 1/4``) stays in the
domain without a line search and converges quadratically in a handful of iterations for small K,
from a starting point given by one symmetric Sinkhorn step. This is the same solution that
Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022) reaches with a
sequence of convex programs, at a tiny fraction of the cost.

When no Nash point exists (exactly opposed or otherwise conflicting updates whose Gram matrix has
a positive null vector) ``f`` is unbounded below; the solver then adds a ridge
``ridge * trace(G)/K * I`` and solves again, which yields the bargaining solution of the
regularised geometry (for two exactly opposed updates: equal weights, i.e. no step). An attempt
succeeds when Newton converges (residual below ``tol``, or the Newton decrement at its rounding
floor) to a point whose residual is below 1e-6: where a Nash point exists that residual is ~1e-13
for well-conditioned G and ~1e-8 for the ill-conditioned ridge-regularised ones; where none exists
the iterates run off and it is of order one. The decision does not depend on rounding noise, so
scaling or permuting G does not switch the ridge that is used.
"""

from __future__ import annotations

import math

import numpy as np

#: Ridge (relative to the mean diagonal) added when the unregularised problem has no solution.
FALLBACK_RIDGE = 1e-8
#: Newton decrement squared below which the full Newton step is taken (quadratic phase).
_PURE_NEWTON_DECREMENT = 1.0 / 16.0
#: Newton decrement squared below which the Nash residual is evaluated (quadratic convergence
#: then makes it ~ the square of this after the step).
_CHECK_DECREMENT = 1e-12
#: Newton decrement squared below which the iterate is the minimiser to rounding: the weights are
#: then within ~1e-7 of it in relative terms before the last (quadratic) step, far closer after.
#: Ill-conditioned problems (the ridge-regularised ones) reach this while their Nash residual
#: still fluctuates at its rounding floor (~1e-8 for a ridge of 1e-8).
_FLOOR_DECREMENT = 1e-14
#: Weights this many times their natural scale ``1/|d_k|`` count as running off to infinity (no
#: Nash point). A Nash point that large could not be accepted anyway: the rounding floor of its
#: residual, ~1e-16 (alpha_k |d_k|)^2, would exceed ``_ACCEPT_RESIDUAL``. Stopping there also
#: keeps the Newton system away from numerically singular (a NaN step, should one still occur,
#: ends the attempt; ``solve_nash_newton`` keeps numpy from warning about it).
_RUN_OFF = 1e6
#: The Sinkhorn start needs every ``(C 1)_k`` above this (else the plain start is used).
_MIN_BALANCE = 0.05
#: A converged iterate is accepted as a Nash point when its residual is below this. The floor of
#: the residual of a ridge-regularised problem is ~1e-8; where no Nash point exists the Newton
#: iterates run off and the residual is of order one.
_ACCEPT_RESIDUAL = 1e-6


def _solve_spd_public(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.full_like(rhs, np.nan)


try:
    # ``np.linalg.solve`` spends most of its ~10 us on a K x K system in Python-level checks and
    # an ``errstate`` context; the gufunc under it (private, stable since numpy 1.8) takes ~3 us.
    # A singular system gives NaN (which ``_newton`` treats as a failure) instead of raising.
    # Fallback if the private module ever changes: the public API.
    from numpy.linalg import _umath_linalg

    _solve1 = _umath_linalg.solve1

    def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        # No ``errstate`` here (it costs as much as the solve): ``solve_nash_newton`` opens one
        # per solve; ``_RUN_OFF`` keeps the system away from singular in most cases.
        return _solve1(matrix, rhs, signature="dd->d")

    _solve_spd(np.eye(2), np.ones(2))  # fail here, not in a solve, if the gufunc changed
except Exception:  # pragma: no cover - depends on numpy's private layout
    _solve_spd = _solve_spd_public


def nash_residual(gram: np.ndarray, alpha: np.ndarray) -> float:
    """``max_k |alpha_k (G alpha)_k - 1|``: zero exactly at the Nash bargaining point."""
    return float(np.max(np.abs(alpha * (gram @ alpha) - 1.0)))


def _initial_point(gram: np.ndarray) -> np.ndarray | None:
    """Best multiple of ``1/sqrt(diag G)``: exact for K = 2 and for orthogonal updates."""
    direction = 1.0 / np.sqrt(np.diag(gram))
    curvature = float(direction @ gram @ direction)
    if not curvature > 0.0:
        return None
    return direction * math.sqrt(gram.shape[0] / curvature)


def _balanced_point(gram: np.ndarray) -> np.ndarray | None:
    """One symmetric Sinkhorn step from ``1/sqrt(diag G)``.

    With ``alpha = s / sqrt(diag G)`` the Nash condition reads ``s_k (C s)_k = 1`` for the
    correlation matrix ``C`` (a symmetric matrix balancing problem); one step of its fixed-point
    iteration ``s <- sqrt(s / (C s))`` from ``s = 1`` gives ``s = 1/sqrt(C 1)``, exact to first
    order in the correlations and a better start than :func:`_initial_point` (one Newton
    iteration fewer, typically). ``None`` where ``C 1`` is not clearly positive (conflicting
    updates; a task whose correlations nearly cancel would start at a huge weight).
    """
    inv_norm = gram.diagonal() ** -0.5
    row = gram.dot(inv_norm)
    row *= inv_norm  # C 1
    if not min(row.tolist()) > _MIN_BALANCE:
        return None
    row **= -0.5
    row *= inv_norm
    return row


def _newton(gram: np.ndarray, tol: float, max_iter: int) -> np.ndarray | None:
    """Damped Newton method for a self-concordant function (Nesterov & Nemirovskii).

    ``f`` is a sum of a convex quadratic and ``-log``: it is standard self-concordant, so with the
    Newton decrement ``lam = sqrt(grad^T H^-1 grad)`` the step ``1/(1+lam)`` always stays inside
    the domain and decreases ``f`` by at least ``lam - log(1+lam)``, and the full step converges
    quadratically once ``lam <= 1/4`` (Boyd & Vandenberghe, Convex Optimization, Sec. 9.6). No
    evaluation of ``f`` is needed (a backtracking test on ``f`` fails near the solution, where
    the decrease is below the rounding error of ``f``, and stalls the iteration), and the Nash
    residual is only evaluated once the decrement says that the iterate is close. For K <= 16
    the cost is the number of numpy calls, which this loop keeps to eight per iteration (and to the
    cheapest form of each: ``dot`` and ``reciprocal`` rather than ``@`` and ``1/x``, Python's
    ``max`` over ``tolist()`` rather than a numpy reduction; each saves ~0.5-2 us at K <= 16).
    """
    limit = -1.0  # set on the first damped step (the balanced start is within it)
    alpha = _balanced_point(gram)
    if alpha is None:
        alpha = _initial_point(gram)
        if alpha is None:
            return None
        limit = _RUN_OFF * float((gram.diagonal() ** -0.5).max())
        if not float(alpha.max()) <= limit:
            return None  # even the best multiple of 1/|d_k| is beyond it: no Nash point
    k = gram.shape[0]
    gram_diagonal = gram.diagonal()
    hessian = gram.copy()  # only its diagonal changes: G + diag(1/alpha^2)
    hessian_diagonal = hessian.reshape(-1)[:: k + 1]  # a view: writes go to ``hessian``
    add, reciprocal, matvec = np.add, np.reciprocal, gram.dot
    error = math.inf
    for _ in range(max_iter):
        inv = reciprocal(alpha)
        gradient = matvec(alpha)
        gradient -= inv
        inv *= inv
        add(gram_diagonal, inv, out=hessian_diagonal)
        step = _solve_spd(hessian, gradient)
        decrement = float(gradient.dot(step))  # lam^2; NaN if the system was singular
        if decrement > _PURE_NEWTON_DECREMENT:
            step *= 1.0 / (1.0 + math.sqrt(decrement))
            alpha = alpha - step
            if limit < 0.0:
                limit = _RUN_OFF * float((gram.diagonal() ** -0.5).max())
            # (``max`` of a short list: a tenth of the cost of a numpy reduction. A NaN step has
            # a NaN decrement, which takes the branch below, so ``alpha`` has no NaN here.)
            if not max(alpha.tolist()) <= limit:
                return None  # running off to infinity: no Nash point for this geometry
            continue
        if not decrement >= 0.0:
            return None
        alpha = alpha - step
        if decrement <= _CHECK_DECREMENT:
            residual = alpha * matvec(alpha)
            residual -= 1.0
            # Euclidean norm: one numpy call, and an upper bound of the max-norm residual.
            error = math.sqrt(float(residual.dot(residual)))
            if error <= tol or decrement <= _FLOOR_DECREMENT:
                break  # converged, or as exact as double precision allows
    # Accept a point that is as good as double precision allows even if ``tol`` was too strict.
    if error <= _ACCEPT_RESIDUAL and min(alpha.tolist()) > 0.0:
        return alpha
    return None


def _solve_two(gram: np.ndarray, tol: float) -> np.ndarray | None:
    """Closed form for K = 2 (the initial point, in Python floats): ``alpha_k ~ 1/|d_k|``."""
    a, b, _, c = gram.ravel().tolist()
    shrink = 1.0 + b / math.sqrt(a * c)  # 1 + cos(d_1, d_2)
    if not shrink > 0.0:
        return None
    x = 1.0 / math.sqrt(a * shrink)
    y = 1.0 / math.sqrt(c * shrink)
    if max(abs(x * (a * x + b * y) - 1.0), abs(y * (b * x + c * y) - 1.0)) <= tol:
        return np.array([x, y])
    return None


def solve_nash_newton(gram: np.ndarray, tol: float = 1e-13, max_iter: int = 100) -> np.ndarray:
    """Raw Nash bargaining weights for a PSD Gram matrix with a positive diagonal.

    Args:
        gram: K x K symmetric positive semi-definite matrix (float64) with a positive diagonal.
        tol: target Nash residual ``max_k |alpha_k (G alpha)_k - 1|`` (an ill-conditioned
            problem stops earlier, at the rounding floor of its residual; see the module docstring).
        max_iter: Newton iterations per attempt.

    Returns:
        ``alpha > 0`` with ``alpha_k (G alpha)_k = 1`` (of the ridge-regularised G when the
        unregularised one has no solution; see the module docstring).
    """
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    if k == 1:
        return np.array([1.0 / math.sqrt(gram[0, 0])])
    if k == 2:
        closed = _solve_two(gram, tol)
        if closed is not None:
            return closed
    # A numerically singular Newton system (near-degenerate G) gives a NaN step, which ends that
    # attempt; numpy's flag for it is not a warning here (one context per solve: the loop itself
    # has none, see ``_solve_spd``).
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        alpha = _newton(gram, tol, max_iter)
        if alpha is not None:
            return alpha
        ridge = FALLBACK_RIDGE * float(np.trace(gram)) / k
        for _ in range(8):  # 1e-8 .. 1e6 times the mean diagonal
            alpha = _newton(gram + ridge * np.eye(k), tol, max_iter)
            if alpha is not None:
                return alpha
            ridge *= 100.0
    # Unreachable for a PSD input (a ridge this large makes G diagonal-dominant); kept finite.
    return 1.0 / np.sqrt(np.diag(gram) + ridge)
