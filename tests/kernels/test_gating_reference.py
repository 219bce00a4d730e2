"""The torch reference of ``topk_gating`` against first principles (softmax, topk, the formulas)."""

from __future__ import annotations

import math

import pytest
import torch
from gating_checks import assert_dispatch_metadata, assert_ranked, router_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.moe_ranking.gating import topk_gating

INF = float("inf")
NAN = float("nan")


def _gate(logits, k, task_bias=None, renormalize=True):
    return topk_gating(logits, k, task_bias=task_bias, renormalize=renormalize, backend="torch")


@pytest.mark.parametrize(
    ("n", "e", "k"),
    [(1, 1, 1), (5, 3, 1), (5, 3, 3), (64, 7, 2), (1000, 13, 4), (33, 8, 8), (17, 64, 2)],
)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias", [None, "expert", "row"])
def test_matches_softmax_topk(n, e, k, renormalize, bias):
    gen = torch.Generator().manual_seed(n * 1000 + e * 10 + k)
    logits = torch.randn(n, e, generator=gen) * 3
    task_bias = None
    if bias == "expert":
        task_bias = torch.randn(e, generator=gen)
    elif bias == "row":
        task_bias = torch.randn(n, e, generator=gen)
    out = _gate(logits, k, task_bias, renormalize)

    x = router_logits(logits, task_bias)
    probs = torch.softmax(x, dim=1)
    top_vals, top_ids = torch.topk(probs, k, dim=1)
    # tie-aware: the selected probabilities equal torch.topk's, and ids equal away from ties
    torch.testing.assert_close(probs.gather(1, out.expert_ids), top_vals, rtol=0, atol=0)
    assert_ranked(out, x)
    expected_w = top_vals / top_vals.sum(1, keepdim=True) if renormalize else top_vals
    torch.testing.assert_close(out.weights, expected_w, rtol=1e-6, atol=1e-7)
    assert out.weights.dtype == torch.float32 and out.mean_probs.dtype == torch.float32
    torch.testing.assert_close(out.mean_probs, probs.mean(0), rtol=1e-6, atol=1e-7)
    z = torch.logsumexp(x, dim=1).square().mean()
    torch.testing.assert_close(out.z_loss, z, rtol=1e-6, atol=1e-7)
    frac = torch.bincount(top_ids.reshape(-1), minlength=e).float() / (n * k)
    torch.testing.assert_close(out.load_balancing_loss, e * (frac * probs.mean(0)).sum())
    assert_dispatch_metadata(out, n, e, k)


def test_ties_go_to_lowest_expert_id():
    logits = torch.tensor(
        [
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [1.0, 3.0, 3.0, 1.0, 3.0],
            [-0.0, 0.0, -1.0, 0.0, -0.0],
            [0.0, -0.0, -0.0, 5.0, -3.0],
        ]
    )
    out = _gate(logits, 4)
    assert out.expert_ids.tolist() == [[0, 1, 2, 3], [1, 2, 4, 0], [0, 1, 3, 4], [3, 0, 1, 2]]
    torch.testing.assert_close(out.weights[0], torch.full((4,), 0.25))


def test_nonfinite_rows_have_defined_probabilities():
    logits = torch.tensor(
        [
            [NAN, 1.0, 2.0, NAN],  # NaN counts as -inf
            [INF, 0.0, INF, 5.0],  # +inf entries share the mass
            [-INF, -INF, -INF, -INF],  # uniform
            [NAN, NAN, NAN, NAN],  # uniform
            [INF, NAN, -INF, 1e30],  # one +inf: all the mass
            [-INF, 0.5, -INF, NAN],  # a single finite entry
        ]
    )
    out = _gate(logits, 3, renormalize=False)
    assert out.expert_ids.tolist() == [
        [2, 1, 0],
        [0, 2, 1],
        [0, 1, 2],
        [0, 1, 2],
        [0, 1, 2],
        [1, 0, 2],
    ]
    p12 = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    expected_probs = torch.tensor(
        [
            [0.0, p12[0], p12[1], 0.0],
            [0.5, 0.0, 0.5, 0.0],
            [0.25] * 4,
            [0.25] * 4,
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out.weights, expected_probs.gather(1, out.expert_ids))
    torch.testing.assert_close(out.mean_probs, expected_probs.mean(0))
    lse = torch.tensor(
        [math.log(math.exp(1) + math.exp(2)), math.log(2), math.log(4), math.log(4), 0.0, 0.5]
    )
    torch.testing.assert_close(out.z_loss, lse.square().mean())
    assert torch.isfinite(out.load_balancing_loss)
    assert_dispatch_metadata(out, 6, 4, 3)


def test_nonfinite_rows_pass_no_gradient_and_finite_rows_are_unaffected():
    gen = torch.Generator().manual_seed(0)
    finite = torch.randn(3, 5, generator=gen)
    bad = torch.tensor([[INF, 0.0, 1.0, INF, 2.0], [NAN] * 5])
    logits = torch.cat([finite, bad]).requires_grad_()
    out = _gate(logits, 2)
    loss = (out.weights * torch.arange(1.0, 3.0)).sum() + out.z_loss + out.load_balancing_loss
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert (grad[3:] == 0).all()
    # the finite rows get the gradient they would get alone (up to the 1/N of the mean losses)
    ref = finite.clone().requires_grad_()
    out_ref = _gate(ref, 2)
    loss_ref = (
        (out_ref.weights * torch.arange(1.0, 3.0)).sum()
        + out_ref.z_loss * 3 / 5
        + 5 * (out.expert_counts.float() / 10 * out_ref.mean_probs * 3 / 5).sum()
    )
    (grad_ref,) = torch.autograd.grad(loss_ref, ref)
    torch.testing.assert_close(grad[:3], grad_ref)


def test_partially_masked_row_gradient_is_zero_at_nan_and_minus_inf():
    logits = torch.tensor([[NAN, 0.3, -INF, 1.2, -0.4]], requires_grad=True)
    out = _gate(logits, 2)
    (grad,) = torch.autograd.grad(out.weights[:, 1].sum() + out.z_loss, logits)
    assert torch.isfinite(grad).all()
    assert grad[0, 0] == 0 and grad[0, 2] == 0
    assert (grad[0, [1, 3, 4]] != 0).all()


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias", [None, "expert", "row"])
def test_gradcheck_float64(renormalize, bias):
    gen = torch.Generator().manual_seed(3)
    n, e, k = 6, 5, 2
    logits = torch.randn(n, e, generator=gen, dtype=torch.float64)
    logits[5, 1] = -INF  # a masked entry keeps a zero, finite gradient
    logits.requires_grad_()
    inputs = [logits]
    if bias is not None:
        shape = (e,) if bias == "expert" else (n, e)
        inputs.append(torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True))

    def fn(*args):
        out = _gate(args[0], k, args[1] if len(args) > 1 else None, renormalize)
        assert out.weights.dtype == torch.float64
        return out.weights, out.mean_probs, out.z_loss, out.load_balancing_loss

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 7, generator=gen) * 4).to(dtype)
    bias = torch.randn(7, generator=gen).to(dtype)
    out = _gate(logits, 3, bias)
    ref = _gate(logits.float(), 3, bias.float())
    assert out.weights.dtype == torch.float32
    assert torch.equal(out.expert_ids, ref.expert_ids)
    assert torch.equal(out.weights, ref.weights)
    assert torch.equal(out.z_loss, ref.z_loss)


def test_empty_batch():
    out = _gate(torch.zeros(0, 4), 2)
    assert out.weights.shape == (0, 2)
    assert out.expert_counts.tolist() == [0, 0, 0, 0]
    assert out.expert_offsets.tolist() == [0] * 5
    assert out.dispatch_order.numel() == 0
    assert float(out.z_loss) == 0.0 and float(out.load_balancing_loss) == 0.0


# 1e20 and 3e38: finite router logits whose lse^2 (and, at 3e38, 2 lse) overflows float32.
_VALUES = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 2.5, 1e-8, -40.0, 88.0, 1e20, -1e20, 3e38, -3e38, INF, -INF, NAN]
)


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 12))
    e = draw(st.integers(1, 9))
    k = draw(st.integers(1, e))
    values = draw(st.lists(_VALUES, min_size=n * e, max_size=n * e))
    renormalize = draw(st.booleans())
    return torch.tensor(values, dtype=torch.float32).reshape(n, e), k, renormalize


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_invariants_hold_for_any_input(case):
    logits, k, renormalize = case
    n, e = logits.shape
    logits.requires_grad_(True)
    out = _gate(logits, k, renormalize=renormalize)
    total = out.weights.sum() + out.z_loss + out.load_balancing_loss + out.mean_probs[0]
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
    if renormalize:
        torch.testing.assert_close(out.weights.sum(1), torch.ones(n))
    torch.testing.assert_close(out.mean_probs.sum(), torch.tensor(1.0))
    assert torch.isfinite(out.z_loss) and torch.isfinite(out.load_balancing_loss)
    assert_dispatch_metadata(out, n, e, k)
    # ranking by the sanitised logits: NaN -> -inf, +inf rows keep only their +inf entries
    x = torch.where(torch.isnan(logits), -INF, logits.detach())
    pos = (x == INF).any(1, keepdim=True)
    y = torch.where(pos, torch.where(x == INF, 0.0, -INF), x)
    assert_ranked(out, y)


@pytest.mark.parametrize("value", [1e20, 3e38])
def test_huge_finite_logits_give_a_finite_saturated_z_loss_and_finite_gradients(value):
    # lse^2 overflows float32 for |router logit| beyond ~1.8e19: z_loss saturates at the largest
    # float32 (no gradient through it) instead of inf, and no NaN reaches the logits.
    logits = torch.tensor([[value, 0.0, -3e38], [1.0, 2.0, 3.0]], requires_grad=True)
    out = _gate(logits, 2)
    assert float(out.z_loss) == torch.finfo(torch.float32).max
    (out.weights.sum() + out.z_loss + out.load_balancing_loss).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # a mean of squares that fits is exact, even where the float32 sum of squares would not
    fits = torch.full((4, 2), 1e19)
    expected = float((torch.logsumexp(fits.double(), 1) ** 2).mean())
    assert float(_gate(fits, 1).z_loss) == pytest.approx(expected, rel=1e-6)
