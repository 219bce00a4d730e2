"""Baselines: PCGrad and CAGrad as Gram-matrix strategies, uncertainty weighting and FAMO.

Oracles, independent of the code under test:

* PCGrad: the paper's Algorithm 1 run directly on explicit gradient vectors (project, sum), with
  the visiting orders drawn by the documented seeding rule; TorchJD's ``PCGradWeighting`` for
  K = 2 (where the order does not matter); a pinned example computed by hand.
* CAGrad: the reference update formula ``d = g0 + sqrt(phi) / ||g_w|| g_w`` on explicit vectors
  with the dual solved by cvxpy (CLARABEL); for K = 2 the dual is one-dimensional and is solved to
  rounding by bracketing the root of its derivative (scipy ``brentq``); TorchJD's
  ``CAGradWeighting``; the KKT conditions of the dual.
* Uncertainty weighting and FAMO: values computed by hand, and FAMO against a direct
  transcription of the reference code's update (softmax logits, autograd Jacobian, Adam).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pub_optim import PUB
from pub_optim.loss_weighting import FAMO, UncertaintyWeighting
from pub_optim.strategies import STRATEGIES, get_strategy
from pub_optim.strategies.cagrad import CAGrad, cagrad_dual
from pub_optim.strategies.pcgrad import PCGrad

cp = pytest.importorskip("cvxpy")
scipy_optimize = pytest.importorskip("scipy.optimize")


def _gram(vectors: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(vectors @ vectors.T)


# ------------------------------------------------------------------------------------ PCGrad
def pcgrad_direct(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Algorithm 1 of Yu et al. (2020) on explicit vectors: project each g_i off every g_j it
    conflicts with (tasks j != i in a random order), then sum the projected vectors."""
    k = len(vectors)
    total = np.zeros_like(vectors[0])
    for i in range(k):
        order = rng.permutation(k)  # the documented rule: one permutation per task i
        projected = vectors[i].copy()
        for j in order:
            if j == i:
                continue
            inner = projected @ vectors[j]
            if inner < 0:
                projected = projected - inner / (vectors[j] @ vectors[j]) * vectors[j]
        total += projected
    return total


def _conflicting_vectors(rng: np.random.Generator, k: int, dim: int) -> np.ndarray:
    """Random vectors with many negative inner products (a shared component of random sign)."""
    base = rng.standard_normal(dim)
    signs = rng.choice([-1.0, 1.0], size=k)
    signs[:2] = (1.0, -1.0)  # at least one conflicting pair
    return signs[:, None] * base + 0.8 * rng.standard_normal((k, dim))


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_pcgrad_matches_projection_on_explicit_vectors(k: int) -> None:
    rng = np.random.default_rng(100 + k)
    for seed in range(5):
        strategy = PCGrad(seed=seed, normalization="none")
        oracle_rng = np.random.default_rng(seed)
        for _ in range(3):  # successive calls continue the same generator
            vectors = _conflicting_vectors(rng, k, 7) * rng.lognormal(0, 2, size=(k, 1))
            gram = vectors @ vectors.T
            assert (gram < 0).any()
            expected = pcgrad_direct(vectors, oracle_rng)
            weights = strategy(torch.from_numpy(gram)).numpy()
            np.testing.assert_allclose(weights @ vectors, expected, rtol=1e-9, atol=1e-12)
            assert (weights >= 1.0 - 1e-12).all()  # coefficients only ever grow from 1


def test_pcgrad_sum_normalisation_is_the_same_direction() -> None:
    rng = np.random.default_rng(0)
    vectors = _conflicting_vectors(rng, 4, 9)
    raw = PCGrad(seed=3, normalization="none")(_gram(vectors)).numpy()
    normed = PCGrad(seed=3)(_gram(vectors)).numpy()
    np.testing.assert_allclose(normed, raw / raw.sum(), rtol=1e-12)
    assert normed.sum() == pytest.approx(1.0, abs=1e-12)


def test_pcgrad_pinned_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 1): <g1, g2> = -1. g1' = g1 + g2 / 2 = (0.5, 0.5),
    # g2' = g2 + g1 = (0, 1); g1' + g2' = (0.5, 1.5) = 2 g1 + 1.5 g2.
    vectors = np.array([[1.0, 0.0], [-1.0, 1.0]])
    raw = PCGrad(normalization="none")(_gram(vectors)).numpy()
    np.testing.assert_allclose(raw, [2.0, 1.5], rtol=1e-15)
    np.testing.assert_allclose(PCGrad()(_gram(vectors)).numpy(), [4 / 7, 3 / 7], rtol=1e-15)


def test_pcgrad_k2_matches_torchjd_and_is_non_conflicting() -> None:
    weighting = pytest.importorskip("torchjd.aggregation").PCGradWeighting()
    rng = np.random.default_rng(1)
    for _ in range(50):
        vectors = rng.standard_normal((2, 6))
        gram = _gram(vectors)
        ours = PCGrad(normalization="none")(gram)
        np.testing.assert_allclose(ours.numpy(), weighting(gram).numpy(), rtol=1e-12)
        # K = 2: the PCGrad sum has a non-negative inner product with both task vectors.
        assert (vectors @ (ours.numpy() @ vectors) >= -1e-12).all()


def test_pcgrad_without_conflict_is_equal_weighting() -> None:
    rng = np.random.default_rng(2)
    vectors = np.abs(rng.standard_normal((5, 8)))  # all inner products positive
    for seed in (0, 1, None):
        np.testing.assert_allclose(
            PCGrad(seed=seed)(_gram(vectors)).numpy(), np.full(5, 0.2), rtol=1e-14
        )


def test_pcgrad_randomness_is_seeded_and_private() -> None:
    rng = np.random.default_rng(4)
    vectors = [_conflicting_vectors(rng, 5, 6) for _ in range(8)]
    torch_state = torch.random.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()  # type: ignore[index]

    def sequence(strategy: PCGrad) -> np.ndarray:
        return np.stack([strategy(_gram(v)).numpy() for v in vectors])

    first = sequence(PCGrad(seed=11))
    np.testing.assert_array_equal(first, sequence(PCGrad(seed=11)))
    assert not np.array_equal(first, sequence(PCGrad(seed=12)))  # the order matters for K = 5
    restarted = PCGrad(seed=5)
    sequence(restarted)
    restarted.reseed(11)
    np.testing.assert_array_equal(first, sequence(restarted))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # type: ignore[index]


# ------------------------------------------------------------------------------------ CAGrad
def cagrad_direct(vectors: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """CAGrad's update on explicit vectors (Liu et al. 2021, Alg. 1), dual solved by cvxpy;
    returns ``(d, dual objective at the solver's weights)``."""
    k = len(vectors)
    g0 = vectors.mean(axis=0)
    sqrt_phi = c * float(np.linalg.norm(g0))
    w = cp.Variable(k)
    objective = (vectors @ g0) @ w + sqrt_phi * cp.norm(vectors.T @ w)
    problem = cp.Problem(cp.Minimize(objective), [w >= 0, cp.sum(w) == 1])
    problem.solve(solver=cp.CLARABEL)
    weights = np.clip(w.value, 0.0, None)
    weights /= weights.sum()
    gw = weights @ vectors
    value = float(weights @ vectors @ g0 + sqrt_phi * np.linalg.norm(gw))
    return g0 + sqrt_phi / float(np.linalg.norm(gw)) * gw, value


def _dual_objective(vectors: np.ndarray, c: float, w: np.ndarray) -> float:
    g0 = vectors.mean(axis=0)
    return float(w @ vectors @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(w @ vectors))


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 2.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_cagrad_matches_direct_update_formula(k: int, c: float) -> None:
    rng = np.random.default_rng(int(10 * c) + 100 * k)
    for _ in range(4):
        vectors = _conflicting_vectors(rng, k, 30)
        expected, oracle_value = cagrad_direct(vectors, c)
        weights = CAGrad(c=c, normalization="none")(_gram(vectors)).numpy()
        got = weights @ vectors
        # cvxpy stops at a duality gap ~1e-8: its weights (and so d) are accurate to ~1e-5 on
        # these well-conditioned problems; our dual value is never worse than the solver's.
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.linalg.norm(expected))
        w, _ = cagrad_dual(vectors @ vectors.T, c)
        assert _dual_objective(vectors, c, w) <= oracle_value + 1e-12 * max(1.0, abs(oracle_value))
        # sum normalisation divides by 1 + lambda: same direction
        normed = CAGrad(c=c)(_gram(vectors)).numpy()
        np.testing.assert_allclose(normed, weights / weights.sum(), rtol=1e-12)


def test_cagrad_k2_against_one_dimensional_dual() -> None:
    """K = 2: w = (t, 1 - t); the dual is convex in t, its minimiser is the root of f'(t)."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        vectors = _conflicting_vectors(rng, 2, 5) * rng.lognormal(0, 1, size=(2, 1))
        c = [0.2, 0.5, 1.0, 3.0][trial % 4]
        g0 = vectors.mean(axis=0)
        s = c * np.linalg.norm(g0)

        def derivative(
            t: float, v: np.ndarray = vectors, g0: np.ndarray = g0, s: float = s
        ) -> float:
            gw = t * v[0] + (1 - t) * v[1]
            diff = v[0] - v[1]
            return float(diff @ g0 + s * (gw @ diff) / np.linalg.norm(gw))

        if derivative(0.0) >= 0:
            t = 0.0
        elif derivative(1.0) <= 0:
            t = 1.0
        else:
            t = scipy_optimize.brentq(derivative, 0.0, 1.0, xtol=1e-15, rtol=1e-15)
        gw = t * vectors[0] + (1 - t) * vectors[1]
        lam = s / np.linalg.norm(gw)
        expected = np.array([0.5 + lam * t, 0.5 + lam * (1 - t)])
        got = CAGrad(c=c, normalization="none")(_gram(vectors)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_cagrad_matches_torchjd() -> None:
    weighting_cls = pytest.importorskip("torchjd.aggregation").CAGradWeighting
    rng = np.random.default_rng(8)
    for trial in range(20):
        k = 2 + trial % 4
        vectors = _conflicting_vectors(rng, k, 25)
        c = [0.25, 0.5, 0.9][trial % 3]
        ours = CAGrad(c=c, normalization="none")(_gram(vectors)).numpy()
        theirs = weighting_cls(c=c, norm_eps=0.0)(_gram(vectors)).numpy()
        # TorchJD solves the dual with CLARABEL's default tolerances (weights to ~1e-4).
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3)


@pytest.mark.parametrize("k", [3, 4, 6, 8])
def test_cagrad_dual_kkt(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(30):
        vectors = _conflicting_vectors(rng, k, 3 * k)
        gram = vectors @ vectors.T
        gram /= np.diag(gram).mean()
        c = float(rng.uniform(0.05, 2.0))
        w, s = cagrad_dual(gram, c)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
        grad = gram.sum(1) / k + s * gram @ w / math.sqrt(w @ gram @ w)
        support = w > 1e-12
        level = grad[support].mean()
        np.testing.assert_allclose(grad[support], level, atol=1e-9)
        assert (grad[~support] >= level - 1e-9).all()


def test_cagrad_degenerate_cases() -> None:
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(CAGrad(c=0.0)(_gram(vectors)).numpy(), np.full(3, 1 / 3))
    opposed = np.array([[1.0, 2.0], [-1.0, -2.0]])  # g0 = 0: phi = 0
    np.testing.assert_allclose(CAGrad()(_gram(opposed)).numpy(), [0.5, 0.5], rtol=1e-15)
    # Pareto-stationary: g1 + g2 = 0 while g0 != 0; the dual minimiser has g_w = 0 and the
    # primal optimum value 0 is attained by d = g0 (equal weights).
    stationary = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    got = CAGrad(c=0.5)(_gram(stationary)).numpy()
    np.testing.assert_allclose(got, np.full(3, 1 / 3), atol=1e-9)
    colinear = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert np.isfinite(CAGrad()(_gram(colinear)).numpy()).all()
    with pytest.raises(ValueError, match="non-negative"):
        CAGrad(c=-1.0)


def test_cagrad_scale_and_permutation() -> None:
    rng = np.random.default_rng(10)
    vectors = _conflicting_vectors(rng, 4, 12)
    base = CAGrad()(_gram(vectors)).numpy()
    for scale in (1e-9, 1e9):
        np.testing.assert_allclose(CAGrad()(_gram(vectors * scale)).numpy(), base, rtol=1e-7)
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(CAGrad()(_gram(vectors[perm])).numpy(), base[perm], rtol=1e-8)


# -------------------------------------------------------------------------- registration
def test_registered_and_usable_in_gradient_space() -> None:
    assert STRATEGIES["pcgrad"] is PCGrad and STRATEGIES["cagrad"] is CAGrad
    assert isinstance(get_strategy("pcgrad"), PCGrad)
    assert isinstance(get_strategy("CAGrad"), CAGrad)


@pytest.mark.parametrize("name", ["pcgrad", "cagrad"])
def test_pub_gradient_space_step_equals_adam_on_the_direct_direction(name: str) -> None:
    """PUB(Adam, strategy, space="gradient") applies Adam to the direction that the direct
    implementation computes from the explicit per-task gradients of the shared parameters."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3, dtype=torch.float64)
    heads = [torch.nn.Linear(3, 1, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    shared = list(trunk.parameters())

    def losses() -> list[torch.Tensor]:
        h = torch.tanh(trunk(x))
        return [((heads[k](h).squeeze(-1) - (-1) ** k * y[:, k]) ** 2).mean() for k in range(2)]

    # Reference: explicit flat per-task gradients, the direct algorithm, a plain Adam step.
    grads = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses()]
    flat = np.stack([torch.cat([g.flatten() for g in gs]).numpy() for gs in grads])
    if name == "pcgrad":
        direction = pcgrad_direct(flat, np.random.default_rng(0))
    else:
        direction, _ = cagrad_direct(flat, 0.5)
    direction /= float(  # the library's default normalisation: weights sum to one
        np.linalg.lstsq(flat.T, direction, rcond=None)[0].sum()
    )
    params = [p.detach().clone().requires_grad_(True) for p in shared]
    ref = torch.optim.Adam(params, lr=0.1)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = torch.from_numpy(direction[offset : offset + n].copy()).view_as(p)
        offset += n
    ref.step()

    all_params = shared + [p for h in heads for p in h.parameters()]
    opt = PUB(torch.optim.Adam(all_params, lr=0.1), strategy=name, space="gradient")
    opt.zero_grad()
    opt.backward(losses())
    opt.step()
    tol = 1e-9 if name == "pcgrad" else 1e-4  # CAGrad: the cvxpy oracle's accuracy
    for p, q in zip(shared, params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol * 0.1)


# -------------------------------------------------------------------- uncertainty weighting
def test_uncertainty_weighting_by_hand() -> None:
    uw = UncertaintyWeighting(2)
    losses = [torch.tensor(0.3), torch.tensor(2.0)]
    assert uw.combine(losses).item() == pytest.approx(2.3)
    np.testing.assert_allclose(uw.weights().numpy(), [1.0, 1.0])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([math.log(2.0), -math.log(2.0)]))
    # exp(-s) L + s / 2 = 0.3 / 2 + 2.0 * 2 + (log 2 - log 2) / 2
    assert uw.combine(losses).item() == pytest.approx(0.15 + 4.0, rel=1e-6)
    np.testing.assert_allclose(uw.weights().numpy(), [0.5, 2.0], rtol=1e-6)
    total = uw.combine(losses)
    total.backward()
    # d/ds_k = -exp(-s_k) L_k + 1/2
    expected = [-0.5 * 0.3 + 0.5, -2.0 * 2.0 + 0.5]
    np.testing.assert_allclose(uw.log_vars.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(("kind", "optimum"), [("classification", 2.0), ("regression", 1.0)])
def test_uncertainty_weighting_stationary_point(kind: str, optimum: float) -> None:
    """The gradient in s vanishes at exp(s_k) = 2 L_k (classification) or L_k (regression)."""
    losses = torch.tensor([0.2, 1.5, 4.0])
    uw = UncertaintyWeighting(3, kind=kind)  # type: ignore[arg-type]
    with torch.no_grad():
        uw.log_vars.copy_(torch.log(optimum * losses))
    uw.combine(losses).backward()
    np.testing.assert_allclose(uw.log_vars.grad.numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        uw.weights().numpy(), uw.factor / (optimum * losses.numpy()), rtol=1e-6
    )


def test_uncertainty_weighting_is_trained_by_the_model_optimizer() -> None:
    uw = UncertaintyWeighting(2)
    opt = torch.optim.SGD(uw.parameters(), lr=0.1)
    opt.zero_grad()
    uw.combine([torch.tensor(0.25), torch.tensor(1.0)]).backward()
    opt.step()
    # s <- s - 0.1 * (-L + 1/2)
    np.testing.assert_allclose(uw.log_vars.detach().numpy(), [-0.025, 0.05], rtol=1e-6)
    with pytest.raises(ValueError, match="expected 2 task losses"):
        uw.combine([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="kind"):
        UncertaintyWeighting(2, kind="other")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- FAMO
def test_famo_combine_by_hand() -> None:
    famo = FAMO(2)
    l1 = torch.tensor(1.0, requires_grad=True)
    l2 = torch.tensor(math.e, requires_grad=True)
    total = famo.combine([l1, l2])
    d1, d2 = 1.0 + 1e-8, math.e + 1e-8
    c = 0.5 / d1 + 0.5 / d2
    assert total.item() == pytest.approx(0.5 * (math.log(d1) + math.log(d2)) / c, rel=1e-6)
    total.backward()
    # gradient weights z_k / (c D_k) = (1/D_k) / (1/D_1 + 1/D_2): e/(1+e), 1/(1+e)
    expected = [math.e / (1 + math.e), 1 / (1 + math.e)]
    np.testing.assert_allclose([l1.grad.item(), l2.grad.item()], expected, rtol=1e-6)
    np.testing.assert_allclose(famo.weights().numpy(), expected, rtol=1e-6)


def test_famo_first_update_by_hand() -> None:
    famo = FAMO(2)
    famo.combine([torch.tensor(1.0), torch.tensor(2.0)])
    famo.update(torch.tensor([0.5, 1.8]))
    # delta = (log 2, log(2/1.8)); z = (1/2, 1/2); J = diag(z) - z z^T = [[1/4, -1/4], ...]
    delta = np.array([math.log(2.0), math.log(2.0 / 1.8)])
    grad = 0.25 * np.array([delta[0] - delta[1], delta[1] - delta[0]])
    # First Adam step (xi = 0, so no weight decay): xi = -lr * g / (|g| + eps) (bias-corrected)
    expected = -0.025 * grad / (np.abs(grad) + 1e-8)
    np.testing.assert_allclose(famo.logits.detach().numpy(), expected, rtol=1e-5)
    # task 0 improved more: its weight goes down
    assert famo.z()[0] < 0.5 < famo.z()[1]


def test_famo_matches_reference_transcription() -> None:
    """Twenty steps on a toy regression: our FAMO against a direct transcription of the reference
    code's update (autograd through softmax, Adam with weight decay on the logits)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 3) * torch.tensor([0.1, 1.0, 5.0])
    models = [torch.nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    famo = FAMO(3)
    ref_w = torch.zeros(3, requires_grad=True)
    ref_opt = torch.optim.Adam([ref_w], lr=0.025, weight_decay=0.01)
    for _ in range(20):
        # ours
        losses = ((models[0](x) - y) ** 2).mean(0)
        opts[0].zero_grad()
        famo.combine(list(losses)).backward()
        opts[0].step()
        with torch.no_grad():
            famo.update(((models[0](x) - y) ** 2).mean(0))
        # reference transcription
        losses = ((models[1](x) - y) ** 2).mean(0)
        z = torch.softmax(ref_w, -1)
        shifted = losses + 1e-8
        c = (z / shifted).sum().detach()
        opts[1].zero_grad()
        ((shifted.log() * z / c).sum()).backward()
        opts[1].step()
        with torch.no_grad():
            new = ((models[1](x) - y) ** 2).mean(0)
        delta = (losses.detach() + 1e-8).log() - (new + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(ref_w, -1), ref_w, grad_outputs=delta)
        ref_opt.zero_grad()
        ref_w.grad = d
        ref_opt.step()
    torch.testing.assert_close(famo.logits.detach(), ref_w.detach(), rtol=1e-5, atol=1e-7)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(famo.z(), torch.full((3,), 1 / 3))  # the weights moved


def test_famo_errors_and_state() -> None:
    famo = FAMO(2)
    with pytest.raises(RuntimeError, match="combine"):
        famo.update(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="above its minimum"):
        famo.combine([torch.tensor(-1.0), torch.tensor(1.0)])
    famo.combine([torch.tensor(1.0), torch.tensor(2.0)])
    famo.update(torch.tensor([0.5, 1.9]))
    other = FAMO(2)
    other.load_state_dict(famo.state_dict())
    torch.testing.assert_close(other.logits.detach(), famo.logits.detach())
    np.testing.assert_allclose(FAMO(1).weights().numpy(), [1.0])
