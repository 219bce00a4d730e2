"""GRec with the Triton gating kernels (under the Triton interpreter, CPU tensors) against the same
model on the torch gating path: logits, auxiliary losses and router gradients, every routing.

Skipped when triton was imported in compiled mode; ``test_gating_triton_subprocess.py`` then runs
this module in a fresh interpreter-mode process (see ``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("numpy")

from integrations.moe_ranking.data import make_synthetic
from integrations.moe_ranking.gating.triton_ops import triton_interpreted
from integrations.moe_ranking.models import InputLayer
from integrations.moe_ranking.models.grec import ROUTINGS, GRec

pytestmark = pytest.mark.skipif(
    not triton_interpreted(),
    reason="triton imported in compiled mode; test_gating_triton_subprocess.py runs this module",
)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("routing", ROUTINGS)
def test_grec_triton_gating_matches_torch(routing: str) -> None:
    data = make_synthetic(n_train=32, n_val=4, n_test=4, seed=0)
    batch = data.train.batch(slice(0, 12))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        inputs = InputLayer(data.cat_cardinalities, len(data.num_names), embed_dim=4)
        model = GRec(
            inputs, data.task_names, routing=routing, top_k=2, d_model=8, expert_hidden=(8,),
            capacity_factor=1.0, gating_backend=backend,
        )  # fmt: skip
        logits = model(batch)
        aux = model.aux_losses()
        assert {g.backend for g in model.last_gating.values()} == {backend}
        (sum(v.sum() for v in logits.values()) + sum(aux.values())).backward()
        results[backend] = (logits, aux, model.router.weight.grad.clone(), model.last_dropped)
    torch_out, triton_out = results["torch"], results["triton"]
    for t in data.task_names:
        torch.testing.assert_close(triton_out[0][t], torch_out[0][t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(triton_out[1][t], torch_out[1][t], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(triton_out[2], torch_out[2], rtol=1e-4, atol=1e-6)
    assert triton_out[3] == torch_out[3]
