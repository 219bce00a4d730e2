"""The Triton gating kernels under the Triton interpreter (CPU tensors) against the torch reference.

Needs triton imported in interpreter mode (``conftest.py``); otherwise this module is skipped here
and run in a subprocess by ``test_gating_triton_subprocess.py``. Sizes are small and blocks large:
the interpreter costs ~10 ms per program instance.
"""

from __future__ import annotations

import pytest
import torch
from gating_checks import assert_dispatch_metadata
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.moe_ranking.gating import GatingOutput, topk_gating

pytest.importorskip("triton")
pytest.importorskip("numpy")

from integrations.moe_ranking.gating.triton_ops import (
    triton_interpreted,
    triton_topk_gating,
)

pytestmark = pytest.mark.skipif(
    not triton_interpreted(),
    reason="triton imported in compiled mode; test_gating_triton_subprocess.py runs this module",
)

INF = float("inf")
NAN = float("nan")
ATOL = 1e-5  # weights, statistics and gradients in float32


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _both(logits, k, task_bias=None, renormalize=True, **launch):
    """Run the reference and the kernels on separate leaf copies; return outputs and inputs."""

    def leaves():
        x = logits.detach().clone().requires_grad_(logits.dtype.is_floating_point)
        b = None if task_bias is None else task_bias.detach().clone().requires_grad_()
        return x, b

    xr, br = leaves()
    xt, bt = leaves()
    ref = topk_gating(xr, k, br, renormalize, backend="torch")
    if launch:
        out = triton_topk_gating(xt, k, bt, renormalize, **launch)
    else:
        out = topk_gating(xt, k, bt, renormalize, backend="triton")
    assert out.backend == "triton"
    return ref, out, (xr, br), (xt, bt)


def _loss(out: GatingOutput, gen: torch.Generator) -> torch.Tensor:
    n, k = out.weights.shape
    gw = torch.randn(n, k, generator=gen)
    gm = torch.randn(out.mean_probs.shape[0], generator=gen)
    return (
        (out.weights * gw).sum()
        + (out.mean_probs * gm).sum()
        + 0.3 * out.z_loss
        + 0.7 * out.load_balancing_loss
    )


def _assert_same(ref: GatingOutput, out: GatingOutput) -> None:
    # Both select on the same float32 router logits with the same tie rule: ids are equal exactly.
    assert torch.equal(out.expert_ids, ref.expert_ids)
    assert out.weights.dtype == torch.float32
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=ATOL)
    assert torch.equal(out.expert_counts, ref.expert_counts)
    assert torch.equal(out.expert_offsets, ref.expert_offsets)
    assert torch.equal(out.dispatch_order, ref.dispatch_order)
    torch.testing.assert_close(out.mean_probs, ref.mean_probs, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.z_loss, ref.z_loss, rtol=ATOL, atol=ATOL)
    torch.testing.assert_close(
        out.load_balancing_loss, ref.load_balancing_loss, rtol=ATOL, atol=ATOL
    )


def _assert_same_grads(ref, out, inputs_ref, inputs_out, seed=0, rtol=ATOL, atol=ATOL):
    wrt_ref = [t for t in inputs_ref if t is not None]
    wrt_out = [t for t in inputs_out if t is not None]
    grads_ref = torch.autograd.grad(_loss(ref, torch.Generator().manual_seed(seed)), wrt_ref)
    grads_out = torch.autograd.grad(_loss(out, torch.Generator().manual_seed(seed)), wrt_out)
    for g_out, g_ref, leaf in zip(grads_out, grads_ref, wrt_out, strict=True):
        assert g_out.dtype == leaf.dtype and g_out.shape == leaf.shape
        assert torch.isfinite(g_out).all()
        torch.testing.assert_close(g_out.float(), g_ref.float(), rtol=rtol, atol=atol)


SHAPES = [(1, 1, 1), (5, 3, 1), (5, 3, 3), (37, 7, 2), (64, 8, 8), (1000, 13, 4), (100, 64, 2)]


@pytest.mark.parametrize(("n", "e", "k"), SHAPES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias", [None, "expert", "row"])
def test_forward_and_backward_match_reference(n, e, k, renormalize, bias):
    gen = torch.Generator().manual_seed(7 * n + e + k)
    logits = torch.randn(n, e, generator=gen) * 3
    task_bias = {
        None: None,
        "expert": torch.randn(e, generator=gen),
        "row": torch.randn(n, e, generator=gen),
    }[bias]
    ref, out, inputs_ref, inputs_out = _both(logits, k, task_bias, renormalize)
    _assert_same(ref, out)
    assert_dispatch_metadata(out, n, e, k)
    _assert_same_grads(ref, out, inputs_ref, inputs_out)


@pytest.mark.parametrize(
    ("n", "e", "k", "block_n", "num_programs"),
    [(1000, 13, 4, 64, 3), (37, 7, 2, 4, 4), (300, 5, 5, 32, 2), (129, 16, 1, 16, 8)],
)
def test_several_programs_and_tiles(n, e, k, block_n, num_programs):
    gen = torch.Generator().manual_seed(n)
    logits = torch.randn(n, e, generator=gen)
    logits[::7] = logits[::7].round()  # plenty of ties across tiles and programs
    task_bias = torch.randn(e, generator=gen)
    ref, out, inputs_ref, inputs_out = _both(
        logits, k, task_bias, block_n=block_n, num_programs=num_programs
    )
    _assert_same(ref, out)
    assert_dispatch_metadata(out, n, e, k)
    _assert_same_grads(ref, out, inputs_ref, inputs_out)


def test_ties_and_signed_zeros():
    logits = torch.tensor(
        [
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [1.0, 3.0, 3.0, 1.0, 3.0],
            [-0.0, 0.0, -1.0, 0.0, -0.0],
            [0.0, -0.0, -0.0, 5.0, -3.0],
        ]
    )
    ref, out, *_ = _both(logits, 4)
    assert out.expert_ids.tolist() == [[0, 1, 2, 3], [1, 2, 4, 0], [0, 1, 3, 4], [3, 0, 1, 2]]
    _assert_same(ref, out)


@pytest.mark.parametrize("renormalize", [True, False])
def test_nonfinite_rows(renormalize):
    logits = torch.tensor(
        [
            [NAN, 1.0, 2.0, NAN, 0.5],
            [INF, 0.0, INF, 5.0, -INF],
            [-INF] * 5,
            [NAN] * 5,
            [INF, NAN, -INF, 1e30, 3.0],
            [-INF, 0.5, -INF, NAN, -INF],
            [0.1, -0.2, 0.3, 0.4, -0.5],
        ]
    )
    ref, out, inputs_ref, inputs_out = _both(logits, 3, torch.zeros(5), renormalize)
    _assert_same(ref, out)
    assert torch.isfinite(out.weights).all()
    assert torch.isfinite(out.z_loss) and torch.isfinite(out.load_balancing_loss)
    assert_dispatch_metadata(out, 7, 5, 3)
    _assert_same_grads(ref, out, inputs_ref, inputs_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "same"])
def test_low_precision_inputs(dtype, bias_dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(200, 7, generator=gen) * 4).to(dtype)
    task_bias = None
    if bias_dtype is not None:
        task_bias = torch.randn(7, generator=gen).to(dtype if bias_dtype == "same" else bias_dtype)
    ref, out, inputs_ref, inputs_out = _both(logits, 2, task_bias)
    _assert_same(ref, out)
    # gradients are rounded to the input dtype by both paths: compare at that precision
    _assert_same_grads(ref, out, inputs_ref, inputs_out, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("bias_shape", ["expert", "row"])
def test_float32_bias_of_half_logits_gets_a_float32_gradient(bias_shape):
    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(60, 5, generator=gen) * 2).half()
    bias = torch.randn(5 if bias_shape == "expert" else (60, 5), generator=gen)
    ref, out, (xr, br), (xt, bt) = _both(logits, 2, bias)
    loss_seed = torch.Generator().manual_seed(0)
    g_ref = torch.autograd.grad(_loss(ref, loss_seed), [xr, br])
    g_out = torch.autograd.grad(_loss(out, torch.Generator().manual_seed(0)), [xt, bt])
    assert g_out[1].dtype == torch.float32
    torch.testing.assert_close(g_out[1], g_ref[1], rtol=ATOL, atol=ATOL)
    torch.testing.assert_close(g_out[0], g_ref[0])  # float16 tolerances


def test_expanded_and_missing_output_gradients():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 6, generator=gen)
    for pick in (lambda o: o.weights.sum(), lambda o: o.z_loss, lambda o: o.load_balancing_loss):
        ref, out, (xr, _), (xt, _) = _both(logits, 2)
        (g_ref,) = torch.autograd.grad(pick(ref), xr)
        (g_out,) = torch.autograd.grad(pick(out), xt)
        torch.testing.assert_close(g_out, g_ref, rtol=0, atol=ATOL)


def test_non_contiguous_logits_and_empty_batch():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 40, generator=gen).t()  # [40, 6], column-major
    ref, out, *_ = _both(logits, 3)
    _assert_same(ref, out)
    ref, out, *_ = _both(torch.zeros(0, 5), 2)
    _assert_same(ref, out)


def test_kernels_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from integrations.moe_ranking.gating.triton_ops import _kernels

    assert all(isinstance(kernel, InterpretedFunction) for kernel in _kernels())


# 1e20 and 3e38: finite router logits whose lse^2 overflows float32 (z_loss saturates).
_VALUES = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 2.5, 1e-8, -40.0, 88.0, 1e20, -1e20, 3e38, -3e38, INF, -INF, NAN]
)


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 10))
    e = draw(st.integers(1, 9))
    k = draw(st.integers(1, e))
    values = draw(st.lists(_VALUES, min_size=n * e, max_size=n * e))
    return torch.tensor(values).reshape(n, e), k, draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(_cases())
def test_matches_reference_on_adversarial_values(case):
    logits, k, renormalize = case
    ref, out, inputs_ref, inputs_out = _both(logits, k, None, renormalize)
    _assert_same(ref, out)
    _assert_same_grads(ref, out, inputs_ref, inputs_out)
