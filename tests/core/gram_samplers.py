"""Seeded Gram-matrix samplers and reusable property checks for the strategy tests.

The samplers build ``G = A A^T`` from a factor ``A = D U diag(s)`` whose rank, spectrum and row
norms are controlled: ``U`` is a random K x r matrix with orthonormal columns, ``s`` the singular
values (a bounded spread, so that "well conditioned" means something), and ``D`` a diagonal
spread of the update norms (tasks whose updates differ in size, as Adam updates of different
tasks do). The overall scale ``c`` multiplies G and covers 1e-12 .. 1e12.

Hypothesis draws the shape parameters and a seed; numpy builds the matrix from the seed, so every
failing example is reproducible from the printed draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

MAX_K = 16


@dataclass(frozen=True)
class GramSpec:
    """Everything needed to rebuild one sampled Gram matrix."""

    k: int
    rank: int
    scale: float
    seed: int
    norm_spread: float = 10.0
    spectrum_spread: float = 3.0

    def matrix(self) -> np.ndarray:
        return sample_gram(
            self.k, self.rank, self.scale, self.seed, self.norm_spread, self.spectrum_spread
        )

    def tensor(self) -> Tensor:
        return torch.from_numpy(self.matrix())


def sample_factor(
    k: int,
    rank: int,
    seed: int,
    norm_spread: float = 10.0,
    spectrum_spread: float = 3.0,
) -> np.ndarray:
    """A K x rank factor with orthonormal directions, singular values in [1/spread, 1] and row
    norms multiplied by factors log-uniform in [1/norm_spread, 1]."""
    if not 1 <= rank <= k:
        raise ValueError(f"need 1 <= rank <= k, got rank={rank}, k={k}")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((k, rank)))
    singular = np.exp(rng.uniform(-np.log(spectrum_spread), 0.0, size=rank))
    rows = np.exp(rng.uniform(-np.log(norm_spread), 0.0, size=k))
    return rows[:, None] * basis * singular[None, :]


def sample_gram(
    k: int,
    rank: int,
    scale: float,
    seed: int,
    norm_spread: float = 10.0,
    spectrum_spread: float = 3.0,
) -> np.ndarray:
    """``scale * A A^T`` for the factor of :func:`sample_factor` (exactly symmetric, float64)."""
    factor = sample_factor(k, rank, seed, norm_spread, spectrum_spread)
    gram = factor @ factor.T
    gram = 0.5 * (gram + gram.T)
    # Normalise to mean diagonal 1 before scaling, so that ``scale`` is the size of the updates.
    return scale * gram / np.mean(np.diag(gram))


def adam_like_gram(k: int, p: int, seed: int, shared: float = 0.5) -> np.ndarray:
    """Gram matrix of K Adam-like look-ahead updates of P coordinates.

    Gradients are a shared component plus task noise; the second-moment estimate is shared, as
    in PUB's single optimizer state. Entries are of order one, the Gram of order P.
    """
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(p)
    grads = shared * common[None, :] + rng.standard_normal((k, p)) * rng.uniform(0.3, 3.0, (k, 1))
    v = 0.999 * np.mean(grads**2, axis=0) + 1e-3 * rng.random(p)
    updates = -(0.1 * grads) / (np.sqrt(0.001 * grads**2 + 0.999 * v) + 1e-8)
    return updates @ updates.T


@st.composite
def gram_specs(
    draw: st.DrawFn,
    min_k: int = 1,
    max_k: int = MAX_K,
    full_rank: bool | None = None,
    min_exponent: float = -12.0,
    max_exponent: float = 12.0,
    max_norm_spread: float | None = None,
    max_spectrum_spread: float | None = None,
) -> GramSpec:
    """Hypothesis strategy of :class:`GramSpec`.

    ``full_rank=True`` gives well-conditioned matrices (rank K, condition number at most ~1e3);
    ``False`` gives rank 1..K-1 (needs ``min_k >= 2``); ``None`` any rank 1..K.
    ``max_norm_spread`` / ``max_spectrum_spread`` also draw the spread of the update norms / of
    the singular values, log-uniform up to that bound (default: the fixed 10 and 3), for
    ill-conditioned matrices: the condition number of G is up to ``spectrum_spread**2`` from the
    angles, times ``norm_spread**2`` from the norms.
    """
    k = draw(st.integers(min_k, max_k))
    if full_rank is True:
        rank = k
    elif full_rank is False:
        rank = draw(st.integers(1, max(1, k - 1)))
    else:
        rank = draw(st.integers(1, k))
    exponent = draw(st.floats(min_exponent, max_exponent))
    seed = draw(st.integers(0, 2**32 - 1))
    spreads = {}
    if max_norm_spread is not None:
        spreads["norm_spread"] = float(10.0 ** draw(st.floats(0.0, np.log10(max_norm_spread))))
    if max_spectrum_spread is not None:
        exponent_bound = np.log10(max_spectrum_spread)
        spreads["spectrum_spread"] = float(10.0 ** draw(st.floats(0.0, exponent_bound)))
    return GramSpec(k=k, rank=rank, scale=float(10.0**exponent), seed=seed, **spreads)


def permutation(k: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(k)``."""
    return np.random.default_rng(seed).permutation(k)


# ---------------------------------------------------------------- reusable property checks


def weights_of(strategy: object, gram: np.ndarray | Tensor) -> np.ndarray:
    """Call a strategy on a numpy or torch Gram matrix, return the weights as float64 numpy."""
    tensor = gram if isinstance(gram, Tensor) else torch.from_numpy(np.asarray(gram))
    out = strategy(tensor)  # type: ignore[operator]
    assert isinstance(out, Tensor)
    assert out.dtype == torch.float64
    assert out.shape == (tensor.shape[0],)
    result: np.ndarray = out.numpy()
    assert np.all(np.isfinite(result)), f"non-finite weights {result}"
    return result


def assert_normalized(weights: np.ndarray) -> None:
    """Default normalisation: the weights sum to one."""
    assert abs(float(weights.sum()) - 1.0) <= 1e-12, f"weights {weights} do not sum to one"


def assert_permutation_equivariant(
    strategy: object, gram: np.ndarray, perm: np.ndarray, atol: float
) -> None:
    """Permuting the tasks permutes the weights: ``w(P G P^T) = P w(G)``."""
    base = weights_of(strategy, gram)
    permuted = weights_of(strategy, gram[np.ix_(perm, perm)])
    np.testing.assert_allclose(permuted, base[perm], rtol=0.0, atol=atol)


def assert_scale_invariant(strategy: object, gram: np.ndarray, factor: float, atol: float) -> None:
    """Normalised weights do not depend on the scale of the updates: ``w(c G) = w(G)``."""
    np.testing.assert_allclose(
        weights_of(strategy, factor * gram), weights_of(strategy, gram), rtol=0.0, atol=atol
    )


def nash_residual(gram: np.ndarray, alpha: np.ndarray) -> float:
    """``max_k |alpha_k (G alpha)_k - 1|`` (written here, independently of the solver module)."""
    return float(np.max(np.abs(alpha * (gram @ alpha) - 1.0)))


def assert_min_norm_kkt(gram: np.ndarray, alpha: np.ndarray, tol: float) -> None:
    """KKT conditions of ``min a^T G a`` on the simplex (Sener & Koltun, NeurIPS 2018).

    ``(G a)_k >= a^T G a`` for every k, with equality where ``a_k > 0``; ``a >= 0``, sum one.
    ``tol`` is absolute, in the units of G.
    """
    assert np.all(alpha >= 0.0), f"negative min-norm weight {alpha}"
    assert_normalized(alpha)
    g_alpha = gram @ alpha
    level = float(alpha @ g_alpha)
    assert np.all(g_alpha >= level - tol), f"KKT: (G a) = {g_alpha} below a^T G a = {level}"
    support = alpha > 0.0
    np.testing.assert_allclose(g_alpha[support], level, rtol=0.0, atol=tol)


def equal_projections(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``<u, d_k> / |d_k|`` for the joint update ``u = sum a_k d_k``: ``(G a)_k / sqrt(G_kk)``."""
    return (gram @ alpha) / np.sqrt(np.diag(gram))
