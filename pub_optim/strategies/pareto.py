"""Pareto weighting: Nash bargaining (Navon et al., "Multi-Task Learning as a Bargaining Game",
ICML 2022), the strategy the PUB paper (arXiv:2410.05806) uses on the per-task updates."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from ..solvers.device import nash_weights
from ..solvers.nash_newton import solve_nash_newton
from .base import Normalization, UpdateBalancer

ParetoSolver = Literal["newton", "cvxpy", "ccp"]


class Pareto(UpdateBalancer):
    """Maximise ``sum_k log <d_k, u>`` over a ball of joint updates ``u = sum_k alpha_k d_k``.

    The solution satisfies ``alpha_k (G alpha)_k = 1`` for every task (the paper's
    ``D^T D alpha = 1/alpha``).

    Args:
        solver: ``"newton"`` (default): damped Newton on the convex problem
            ``min 1/2 a^T G a - sum log a`` in double precision, no dependency, residual ~1e-13;
            ``"cvxpy"``: the same convex problem as one DPP program compiled once and re-solved
            with new data (needs the ``cvxpy`` extra); ``"ccp"``: the paper's own
            concave-convex procedure (the Nash-MTL formulation, CLARABEL), for fidelity checks.
        normalization: see :class:`UpdateBalancer`; ``"none"`` gives the raw Nash weights, whose
            joint update has squared norm K in the units of the Gram matrix.

    Degenerate geometry: when no Nash point exists (e.g. exactly opposed updates) a small ridge
    is added to ``G`` (see :mod:`pub_optim.solvers.nash_newton`); the cvxpy backends use the
    same rule so that all three agree. If a cvxpy backend fails even so
    (:class:`~pub_optim.solvers.nash_cvxpy.NashSolverError`), the step uses the native solver
    and a ``RuntimeWarning`` says so: no exception escapes, and no default weights are returned
    silently (the paper's code kept the weights at 1 after a swallowed solver error).
    """

    name = "pareto"

    def __init__(self, solver: ParetoSolver = "newton", normalization: Normalization = "sum"):
        super().__init__(normalization)
        if solver not in ("newton", "cvxpy", "ccp"):
            raise ValueError(f"solver must be 'newton', 'cvxpy' or 'ccp', got {solver!r}")
        self.solver: ParetoSolver = solver
        self._cvxpy_backend: object | None = None

    def raw_weights(self, gram: Tensor) -> Tensor:
        matrix = gram.cpu().numpy()
        if self.solver == "newton":
            alpha = solve_nash_newton(matrix)
        else:
            from ..solvers import nash_cvxpy  # optional dependency, imported on use

            if self._cvxpy_backend is None:
                factory = nash_cvxpy.NashDPP if self.solver == "cvxpy" else nash_cvxpy.NashCCP
                self._cvxpy_backend = factory()
            try:
                alpha = self._cvxpy_backend(matrix)  # type: ignore[operator]
            except nash_cvxpy.NashSolverError as exc:
                # Visible, not silent: the weights come from the native solver of the same
                # problem (not from a default), and the warning says why.
                warnings.warn(
                    f"Pareto(solver={self.solver!r}): {exc}. Using the native Newton solver "
                    "for this step.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                alpha = solve_nash_newton(matrix)
        return torch.from_numpy(alpha).to(gram.device)

    def device_raw_weights(self, gram: Tensor, active: Tensor) -> Tensor:
        # The native method, on the device, whatever ``solver`` says (the cvxpy backends run on
        # the host); see :func:`pub_optim.solvers.device.nash_weights`.
        return nash_weights(gram, active)

    def rescale_raw(self, weights: Tensor, scale: float | Tensor) -> Tensor:
        # alpha_k (G alpha)_k = 1 on G / s  <=>  (alpha / sqrt(s)) solves it on G.
        if isinstance(scale, Tensor):
            return weights / torch.sqrt(scale)
        return weights / math.sqrt(scale)

    def __repr__(self) -> str:
        return f"Pareto(solver={self.solver!r}, normalization={self.normalization!r})"
