"""Synthetic two-task data with a knob for how much the tasks conflict.

The construction follows the synthetic study of the MMoE paper (Ma et al., KDD 2018): two unit
weight vectors ``u1, u2`` with a chosen cosine, task scores
``u_t . x + sum_i sin(a_i u_t . x + b_i)`` (a non-linear function of one direction per task),
plus per-category effects mixed with the same cosine, then a threshold at the median (balanced
labels) after Gaussian noise.

``conflict`` in [0, 1] sets the cosine between the task directions to ``1 - 2 * conflict``:
0 gives two identical tasks, 0.5 unrelated tasks competing for capacity, 1 opposed tasks (one
task's positives are the other's negatives in the shared representation).

With ``funnel=True`` the second task is nested in the first (``ctcvr`` = ``ctr`` and a second
condition), for the ESMM option.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .base import MultiTaskData, Split


def _directions(dim: int, cosine: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors in R^dim with the given cosine."""
    a, b = rng.standard_normal(dim), rng.standard_normal(dim)
    u1 = a / np.linalg.norm(a)
    b = b - (b @ u1) * u1
    v = b / np.linalg.norm(b)
    u2 = cosine * u1 + np.sqrt(max(0.0, 1.0 - cosine**2)) * v
    return u1, u2


def make_synthetic(
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 1000,
    conflict: float = 0.5,
    num_features: int = 16,
    cat_fields: int = 3,
    cat_cardinality: int = 12,
    noise: float = 0.3,
    funnel: bool = False,
    seed: int = 0,
) -> MultiTaskData:
    """Generate the data (all splits from the same distribution, seeded).

    Categorical ids are generated directly as vocabulary ids in ``[2, cat_cardinality + 2)``;
    ids 0 (out-of-vocabulary) and 1 (missing) are reserved as for real data and never drawn.
    """
    if not 0.0 <= conflict <= 1.0:
        raise ValueError(f"conflict must be in [0, 1], got {conflict}")
    if min(n_train, n_val, n_test) < 1:
        raise ValueError("every split needs at least one row")
    rng = np.random.default_rng(seed)
    cosine = 1.0 - 2.0 * conflict
    u1, u2 = _directions(num_features, cosine, rng)
    freq, phase = rng.normal(size=5), rng.normal(size=5)
    effects1 = rng.standard_normal((cat_fields, cat_cardinality))
    effects_other = rng.standard_normal((cat_fields, cat_cardinality))
    effects2 = cosine * effects1 + np.sqrt(max(0.0, 1.0 - cosine**2)) * effects_other
    n = n_train + n_val + n_test
    x = rng.standard_normal((n, num_features))
    cats = rng.integers(0, cat_cardinality, size=(n, cat_fields))

    def score(u: np.ndarray, effects: np.ndarray) -> np.ndarray:
        proj = x @ u
        nonlinear = np.sin(np.outer(proj, freq) + phase).sum(axis=1)
        cat_effect = effects[np.arange(cat_fields), cats].sum(axis=1) / np.sqrt(cat_fields)
        return proj + nonlinear + cat_effect + noise * rng.standard_normal(n)

    s1, s2 = score(u1, effects1), score(u2, effects2)
    y1 = s1 > np.median(s1)
    y2 = (y1 & (s2 > np.median(s2))) if funnel else (s2 > np.median(s2))
    labels = np.stack([y1, y2], axis=1).astype(np.float32)
    cat_t = torch.from_numpy(cats + 2)
    num_t = torch.from_numpy(x.astype(np.float32))
    lab_t = torch.from_numpy(labels)
    bounds = [0, n_train, n_train + n_val, n]
    splits = [
        Split(cat_t[a:b].clone(), num_t[a:b].clone(), lab_t[a:b].clone())
        for a, b in itertools.pairwise(bounds)
    ]
    tasks = ("ctr", "ctcvr") if funnel else ("task_a", "task_b")
    return MultiTaskData(
        name="synthetic",
        task_names=tasks,
        cat_names=tuple(f"cat_{i}" for i in range(cat_fields)),
        cat_cardinalities=(cat_cardinality + 2,) * cat_fields,
        num_names=tuple(f"x_{i}" for i in range(num_features)),
        train=splits[0],
        val=splits[1],
        test=splits[2],
        funnel=tasks if funnel else None,  # type: ignore[arg-type]
        info={"conflict": conflict, "cosine": cosine, "seed": seed, "funnel": funnel},
    )
