"""cvxpy backends of the Nash bargaining solver (extra: ``pip install 'pub-optim[cvxpy]'``).

Both return the raw Nash bargaining weights of Nash-MTL (Navon et al., "Multi-Task Learning as a
Bargaining Game", ICML 2022), i.e. ``alpha > 0`` with ``alpha_k (G alpha)_k = 1`` for every task,
which is what the PUB paper (Yuan, Cai, Dong, arXiv:2410.05806) uses on the Gram matrix of the
per-task updates. They exist as an independent check of the native solver
(:mod:`pub_optim.solvers.nash_newton`) and, for :class:`NashCCP`, as the paper's own formulation.

* :class:`NashDPP` solves the strictly convex problem ``min 1/2 |R a|^2 - sum_k log a_k`` with
  ``G = R^T R`` (its stationarity condition is the Nash condition). ``R`` is a ``cp.Parameter``,
  so the problem is DPP: it is compiled once per K and re-solved with new data.
* :class:`NashCCP` is the concave-convex procedure of Nash-MTL: a sequence of convex programs in
  which the concave part of the objective is linearised around the previous iterate, warm-started,
  at most 20 iterations. The program is not DPP (products and inverses of parameters), so cvxpy
  recompiles it on every solve: it is slow (tens of milliseconds per iteration), and kept for
  fidelity checks.

Both use CLARABEL (ECOS, Nash-MTL's solver, is no longer installed with cvxpy) and both apply the
degenerate rule of the native solver: when ``G`` has no Nash point (a non-negative null vector,
e.g. exactly opposed updates), a ridge ``FALLBACK_RIDGE * trace(G)/K * I`` is added and grown by
a factor 100 up to 8 times, exactly as :func:`~pub_optim.solvers.nash_newton.solve_nash_newton`
does, so that the three solvers agree. A solver failure that the ridge does not resolve raises
:class:`NashSolverError`; nothing is silently replaced by default weights (the paper's public code
named a solver that does not exist, swallowed the error and kept the weights at 1).

Importing this module needs cvxpy; ``import pub_optim`` never imports it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .nash_newton import FALLBACK_RIDGE, nash_residual

try:
    import clarabel  # noqa: F401  (the solver both backends use; cvxpy does not require it)
    import cvxpy as cp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the cvxpy Nash solvers need cvxpy and clarabel: pip install 'pub-optim[cvxpy]'"
    ) from exc

#: Ridge attempts after the unregularised one (1e-8 .. 1e6 times the mean diagonal), as in Newton.
RIDGE_ATTEMPTS = 8
#: Growth factor of the ridge between attempts, as in Newton.
RIDGE_GROWTH = 100.0

#: CLARABEL settings of the DPP backend. With its defaults (gap 1e-8) the Nash residual is ~1e-5.
#: With tight gaps alone it is ~1e-9 typically but up to 6e-5 where CLARABEL stops "almost
#: solved" (9 of 61 test matrices); a shorter maximal step (0.9 of the way to the cone boundary
#: instead of 0.99) avoids most of those stalls: over 171 matrices (K 1..16, ridge-regularised
#: ones included) the residual is <= 9e-7, median 3e-9.
DPP_SOLVER_OPTIONS: dict[str, float | int] = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "tol_ktratio": 1e-10,
    "max_step_fraction": 0.9,
    "max_iter": 200,
}
#: A DPP solution is accepted as a Nash point when its residual is below this. Where no Nash point
#: exists CLARABEL stops at huge weights with a residual of order one; where one exists the
#: residual is ~1e-9 (at worst ~1e-6, also for the ill-conditioned ridge-regularised matrices).
DPP_ACCEPT_RESIDUAL = 1e-4
#: A CCP solution is accepted as a Nash point when its residual is below this.
CCP_ACCEPT_RESIDUAL = 1e-3

_SOLVED = ("optimal", "optimal_inaccurate")
_NO_SOLUTION = ("infeasible", "infeasible_inaccurate", "unbounded", "unbounded_inaccurate")


class NashSolverError(RuntimeError):
    """The cvxpy solver failed on a Gram matrix, with and without the fallback ridge."""


class NashConvergenceWarning(RuntimeWarning):
    """The concave-convex procedure stopped at its iteration limit before converging."""


def _check_gram(gram: np.ndarray) -> np.ndarray:
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"the Gram matrix must be square K x K with K >= 1, got {gram.shape}")
    if not np.all(np.isfinite(gram)):
        raise ValueError("the Gram matrix has non-finite entries")
    if not np.all(np.diag(gram) > 0.0):
        raise ValueError("the Nash solvers need a Gram matrix with a positive diagonal")
    return 0.5 * (gram + gram.T)


def _ridge_sequence(gram: np.ndarray) -> list[float]:
    """0 (no ridge), then the ridges of the native solver, in the order it tries them."""
    k = gram.shape[0]
    first = FALLBACK_RIDGE * float(np.trace(gram)) / k
    return [0.0] + [first * RIDGE_GROWTH**i for i in range(RIDGE_ATTEMPTS)]


def _solve_with_ridge(gram: np.ndarray, attempt: Any, name: str) -> np.ndarray:
    """Run ``attempt(G + ridge*I)`` along the ridge sequence until it returns a Nash point."""
    k = gram.shape[0]
    reasons: list[str] = []
    for ridge in _ridge_sequence(gram):
        matrix = gram + ridge * np.eye(k) if ridge > 0.0 else gram
        alpha, reason = attempt(matrix)
        if alpha is not None:
            return alpha
        reasons.append(f"ridge {ridge:.1e}: {reason}")
    raise NashSolverError(
        f"{name} found no Nash point for this Gram matrix, even with the fallback ridge "
        f"({'; '.join(reasons)}); G = {gram.tolist()}"
    )


class NashDPP:
    """Nash weights from the DPP program ``min 1/2 |R a|^2 - sum log a`` (``G = R^T R``), CLARABEL.

    One compiled problem per K is cached and re-solved with new data. ``R`` is the symmetric
    eigen-factor ``diag(sqrt(max(w, 0))) V^T`` of ``G``, so any PSD ``G`` (of any rank) works.

    Args:
        solver_options: CLARABEL settings (default :data:`DPP_SOLVER_OPTIONS`).

    Calling it on a PSD float64 ``G`` with a positive diagonal returns ``alpha > 0`` with
    ``alpha_k (G alpha)_k = 1`` (residual ~1e-9 typically, ~1e-6 at worst), of the
    ridge-regularised ``G`` when the unregularised one has no Nash point. Raises
    :class:`NashSolverError` if CLARABEL fails even with the largest ridge.
    """

    def __init__(self, solver_options: dict[str, float | int] | None = None) -> None:
        self.solver_options = dict(DPP_SOLVER_OPTIONS if solver_options is None else solver_options)
        self._problems: dict[int, tuple[Any, Any, Any]] = {}

    def problem(self, k: int) -> tuple[Any, Any, Any]:
        """The compiled ``(problem, R, alpha)`` for K tasks (built on first use)."""
        if k not in self._problems:
            alpha = cp.Variable(k, name="alpha")
            factor = cp.Parameter((k, k), name="R")
            objective = 0.5 * cp.sum_squares(factor @ alpha) - cp.sum(cp.log(alpha))
            problem = cp.Problem(cp.Minimize(objective))
            if not problem.is_dpp():  # pragma: no cover - guards against a cvxpy regression
                raise RuntimeError("the Nash DPP program is not DPP; it would recompile per solve")
            self._problems[k] = (problem, factor, alpha)
        return self._problems[k]

    def _attempt(self, gram: np.ndarray) -> tuple[np.ndarray | None, str]:
        problem, factor, alpha = self.problem(gram.shape[0])
        eigenvalues, vectors = np.linalg.eigh(gram)
        factor.value = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T
        with warnings.catch_warnings():
            # "Solution may be inaccurate": the Nash residual below is the accuracy check.
            warnings.filterwarnings("ignore", message=".*inaccurate.*", category=UserWarning)
            try:
                # warm_start=False: a fresh CLARABEL solver per solve. cvxpy otherwise updates
                # the cached one in place, and the result then depends on the previous solves
                # (measured: residual 5.7e-5 or 1.7e-9 on the same matrix).
                problem.solve(solver=cp.CLARABEL, warm_start=False, **self.solver_options)
            except cp.error.SolverError as exc:
                return None, f"solver error ({exc})"
        status = problem.status
        if status not in _SOLVED or alpha.value is None:
            return None, f"status {status}"
        value = np.asarray(alpha.value, dtype=np.float64)
        if not (np.all(np.isfinite(value)) and np.all(value > 0.0)):
            return None, "non-finite or non-positive weights"
        residual = nash_residual(gram, value)
        if not residual <= DPP_ACCEPT_RESIDUAL:
            # CLARABEL reports "optimal" with weights of ~1e13 when the objective is unbounded
            # (no Nash point): the residual is then of order one.
            return None, f"status {status} but Nash residual {residual:.1e}"
        return value, ""

    def __call__(self, gram: np.ndarray) -> np.ndarray:
        gram = _check_gram(gram)
        return _solve_with_ridge(gram, self._attempt, "NashDPP")


class NashCCP:
    """The concave-convex procedure of Nash-MTL (Navon et al., ICML 2022, Sec. 3.3), CLARABEL.

    With ``phi_i(a) = log a_i + log (G a)_i`` and ``phi = sum_i phi_i``, the Nash condition is
    ``phi_i(a) = 0`` for every i. Nash-MTL solves

        min_a  sum_i (G a)_i + phi(a)   s.t.  -phi_i(a) <= 0,  a >= 0

    by linearising the concave ``phi`` around the previous iterate ``a_prev`` (each problem is
    then convex), at most 20 times, warm-started from the previous call's solution, and stopping
    when the iterate no longer moves. As in the reference implementation (``_init_optim_problem``)
    the matrix is divided by its Frobenius norm ``n`` and the constraint reads
    ``-log(a_i n) - log((G/n) a)_i <= 0``, so ``a`` are the Nash weights of ``G`` itself.

    Two corrections to the reference code (documented, not silent):

    * the linearisation needs ``a_prev > 0`` and ``G a_prev > 0``; when the warm start is not
      such a point (e.g. ``a = 1`` and updates in conflict), the linearised problem is unbounded.
      The procedure then first solves ``min sum_i (G a)_i s.t. -phi_i(a) <= 0`` (the problem
      without ``phi``, convex and bounded), whose solution is such a point;
    * a solver failure is not swallowed: the degenerate rule of the native solver applies when
      ``G`` has no Nash point (the constraints are infeasible), and any other failure raises
      :class:`NashSolverError`.

    Args:
        max_iter: iterations of the procedure (Nash-MTL: 20).
        step_tol: stop when ``|a - a_prev| <= step_tol * |a_prev|`` (Nash-MTL: 1e-6, absolute).
        warm_start: start from the previous call's solution when it has the same size (Nash-MTL
            does); otherwise from ``a = 1``.
        solver_options: CLARABEL settings (defaults otherwise; Nash-MTL used ECOS' defaults).

    The residual ``max_k |a_k (G a)_k - 1|`` is typically 1e-9..1e-6: it is limited by the
    interior-point tolerance of each convex program. If the iteration limit is reached while the
    iterate still moves, a :class:`NashConvergenceWarning` is emitted and the last iterate is
    returned (as Nash-MTL does).
    """

    def __init__(
        self,
        max_iter: int = 20,
        step_tol: float = 1e-6,
        warm_start: bool = True,
        solver_options: dict[str, float | int] | None = None,
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter = max_iter
        self.step_tol = step_tol
        self.warm_start = warm_start
        self.solver_options = dict(solver_options or {})
        self.previous_alpha: np.ndarray | None = None
        #: Convex programs solved by the last call (all attempts), for benchmarks and tests.
        self.last_num_solves = 0
        self._problems: dict[int, dict[str, Any]] = {}

    def reset(self) -> None:
        """Forget the warm start (the next call starts from ``a = 1``)."""
        self.previous_alpha = None

    def problem(self, k: int) -> dict[str, Any]:
        """The CCP program for K tasks and its phase-one program (built on first use)."""
        if k not in self._problems:
            alpha = cp.Variable(k, nonneg=True, name="alpha")
            previous = cp.Parameter(k, name="previous_alpha", value=np.ones(k))
            gram = cp.Parameter((k, k), name="G", value=np.eye(k))
            norm = cp.Parameter(1, name="normalization_factor", value=np.ones(1))
            g_alpha = gram @ alpha
            constraints = [-cp.log(alpha[i] * norm) - cp.log(g_alpha[i]) <= 0 for i in range(k)]
            # First-order term of phi(a) = sum log a_i + sum log (G a)_i around ``previous``.
            inverse = 1.0 / (gram @ previous)
            if k == 1:  # cvxpy refuses ``@`` with a 1 x 1 operand
                weighted = cp.multiply(inverse, cp.reshape(gram, (1,), order="C"))
            else:
                weighted = inverse @ gram
            phi_gradient = 1.0 / previous + weighted
            phi_linear = phi_gradient @ (alpha - previous)
            ccp = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi_linear / norm), constraints)
            phase_one = cp.Problem(cp.Minimize(cp.sum(g_alpha)), constraints)
            self._problems[k] = {
                "ccp": ccp,
                "phase_one": phase_one,
                "alpha": alpha,
                "previous": previous,
                "gram": gram,
                "norm": norm,
            }
        return self._problems[k]

    def _solve(self, problem: Any) -> str:
        self.last_num_solves += 1
        with warnings.catch_warnings():
            # The CCP program is not DPP by construction; cvxpy warns about it on every solve.
            warnings.filterwarnings("ignore", message=".*not DPP.*", category=UserWarning)
            # "Solution may be inaccurate": the Nash residual is checked after the procedure.
            warnings.filterwarnings("ignore", message=".*inaccurate.*", category=UserWarning)
            try:
                # A fresh CLARABEL solver per program (see NashDPP): the warm start of the
                # procedure is the linearisation point, as in Nash-MTL.
                problem.solve(solver=cp.CLARABEL, warm_start=False, **self.solver_options)
            except cp.error.SolverError as exc:
                return f"solver error ({exc})"
        return str(problem.status)

    def _attempt(self, gram: np.ndarray) -> tuple[np.ndarray | None, str]:
        k = gram.shape[0]
        parts = self.problem(k)
        norm = float(np.linalg.norm(gram))
        scaled = gram / norm
        parts["gram"].value = scaled
        parts["norm"].value = np.array([norm])
        alpha_var = parts["alpha"]

        start = self.previous_alpha if self.warm_start else None
        if start is None or start.shape != (k,):
            start = np.ones(k)
        if not (np.all(start > 0.0) and np.all(scaled @ start > 0.0)):
            status = self._solve(parts["phase_one"])
            if status in _NO_SOLUTION:
                return None, f"phase one {status} (no Nash point)"
            if status not in _SOLVED or alpha_var.value is None:
                raise NashSolverError(f"NashCCP phase one failed: status {status}, G = {gram}")
            start = np.asarray(alpha_var.value, dtype=np.float64)
            if not (np.all(start > 0.0) and np.all(scaled @ start > 0.0)):
                return None, "phase one solution on the boundary (no Nash point)"

        alpha = start
        moved = math.inf
        for _ in range(self.max_iter):
            parts["previous"].value = alpha
            status = self._solve(parts["ccp"])
            if status in _NO_SOLUTION:
                return None, f"CCP step {status} (no Nash point)"
            if status not in _SOLVED or alpha_var.value is None:
                raise NashSolverError(f"NashCCP step failed: status {status}, G = {gram}")
            new = np.asarray(alpha_var.value, dtype=np.float64)
            if not (np.all(np.isfinite(new)) and np.all(new > 0.0)):
                return None, "CCP step left the domain (no Nash point)"
            moved = float(np.linalg.norm(new - alpha))
            scale = float(np.linalg.norm(alpha))
            alpha = new
            if moved <= self.step_tol * scale:
                break
        else:
            warnings.warn(
                f"NashCCP stopped after {self.max_iter} iterations with the iterate still moving "
                f"by {moved:.1e}; Nash residual {nash_residual(gram, alpha):.1e}",
                NashConvergenceWarning,
                stacklevel=4,
            )
        residual = nash_residual(gram, alpha)
        if not residual <= CCP_ACCEPT_RESIDUAL:
            return None, f"CCP converged to a point with Nash residual {residual:.1e}"
        return alpha, ""

    def __call__(self, gram: np.ndarray) -> np.ndarray:
        gram = _check_gram(gram)
        self.last_num_solves = 0
        alpha = _solve_with_ridge(gram, self._attempt, "NashCCP")
        self.previous_alpha = alpha.copy()
        return alpha
