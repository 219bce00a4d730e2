"""The compiled Triton gating kernels on a CUDA device against the torch reference (GPU only)."""

from __future__ import annotations

import pytest
import torch
from gating_checks import assert_dispatch_metadata

from integrations.moe_ranking.gating import resolve_backend, topk_gating

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
triton = pytest.importorskip("triton")

INF = float("inf")
NAN = float("nan")


@pytest.fixture(autouse=True)
def _compiled_triton():
    from integrations.moe_ranking.gating.triton_ops import triton_interpreted

    if triton_interpreted():
        pytest.skip("triton was imported under TRITON_INTERPRET=1 in this process")


def _run(logits, k, task_bias, renormalize, backend, seed=0):
    x = logits.detach().clone().requires_grad_()
    b = None if task_bias is None else task_bias.detach().clone().requires_grad_()
    out = topk_gating(x, k, b, renormalize, backend=backend)
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    gw = torch.randn(out.weights.shape, generator=gen, device=logits.device)
    loss = (out.weights * gw).sum() + out.z_loss + out.load_balancing_loss + out.mean_probs[0]
    grads = torch.autograd.grad(loss, [t for t in (x, b) if t is not None])
    return out, grads


@pytest.mark.parametrize(
    ("n", "e", "k"), [(1, 3, 1), (4097, 7, 2), (65536, 16, 2), (20000, 64, 4), (3000, 13, 13)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [None, "expert", "row"])
def test_cuda_kernels_match_reference(n, e, k, dtype, bias):
    gen = torch.Generator(device="cuda").manual_seed(n + e)
    logits = (torch.randn(n, e, generator=gen, device="cuda") * 3).to(dtype)
    logits[::5] = logits[::5].round()  # ties
    logits[1::97, 0] = NAN
    logits[2::97, 1] = INF
    logits[3::97] = -INF
    task_bias = None
    if bias is not None:
        shape = (e,) if bias == "expert" else (n, e)
        task_bias = torch.randn(*shape, generator=gen, device="cuda").to(dtype)
    ref, grads_ref = _run(logits, k, task_bias, True, "torch")
    out, grads = _run(logits, k, task_bias, True, "triton")
    assert out.backend == "triton"
    assert torch.equal(out.expert_ids, ref.expert_ids)
    torch.testing.assert_close(out.weights, ref.weights, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.expert_counts, ref.expert_counts)
    assert torch.equal(out.expert_offsets, ref.expert_offsets)
    assert torch.equal(out.dispatch_order, ref.dispatch_order)
    torch.testing.assert_close(out.mean_probs, ref.mean_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.z_loss, ref.z_loss, rtol=1e-5, atol=1e-5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, **tol)
    if n <= 5000:
        assert_dispatch_metadata(out, n, e, k)


def test_cuda_kernels_are_deterministic():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(300_000, 16, generator=gen, device="cuda")
    (a, ga), (b, gb) = (_run(logits, 2, None, True, "triton") for _ in range(2))
    for field in ("weights", "expert_ids", "mean_probs", "z_loss", "dispatch_order"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(ga[0], gb[0])


def test_auto_picks_triton_for_cuda_tensors():
    assert resolve_backend(torch.zeros(2, 3, device="cuda")) == "triton"
    assert resolve_backend(torch.zeros(2, 3, device="cuda", dtype=torch.float64)) == "torch"
    assert topk_gating(torch.zeros(4, 3, device="cuda"), 2).backend == "triton"
