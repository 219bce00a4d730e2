"""Input checks and the backend choice of ``topk_gating``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from integrations.moe_ranking import gating
from integrations.moe_ranking.gating import BACKEND_ENV_VAR, resolve_backend, topk_gating

REPO = Path(__file__).resolve().parents[2]


def test_import_does_not_import_triton():
    code = (
        "import sys, torch, integrations.moe_ranking.gating as g\n"
        "g.topk_gating(torch.randn(4, 3), 2)\n"
        "assert 'triton' not in sys.modules, 'gating imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.zeros(2, 3)) == "torch"
    assert topk_gating(torch.zeros(2, 3), 1).backend == "torch"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        topk_gating(torch.zeros(2, 3), 1, backend="triton")


def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="float64"):
        topk_gating(torch.zeros(2, 3, dtype=torch.float64), 1, backend="triton")


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    gating.triton_available.cache_clear()
    try:
        assert resolve_backend(torch.zeros(2, 3)) == "torch"
        with pytest.raises(ImportError, match=r"pub-optim\[triton\]"):
            topk_gating(torch.zeros(2, 3), 1, backend="triton")
    finally:
        gating.triton_available.cache_clear()


def test_environment_switch_forces_a_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        topk_gating(torch.zeros(2, 3), 1)
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert topk_gating(torch.zeros(2, 3), 1).backend == "torch"
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        topk_gating(torch.zeros(2, 3), 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"logits": torch.zeros(3), "k": 1}, ValueError),
        ({"logits": torch.zeros(2, 3, dtype=torch.int64), "k": 1}, TypeError),
        ({"logits": torch.zeros(2, 0), "k": 1}, ValueError),
        ({"logits": torch.zeros(2, 3), "k": 0}, ValueError),
        ({"logits": torch.zeros(2, 3), "k": 4}, ValueError),
        ({"logits": torch.zeros(2, 3), "k": True}, ValueError),
        ({"logits": torch.zeros(2, 3), "k": 1, "task_bias": torch.zeros(2)}, ValueError),
        ({"logits": torch.zeros(2, 3), "k": 1, "task_bias": torch.zeros(3, 3)}, ValueError),
        (
            {"logits": torch.zeros(2, 3), "k": 1, "task_bias": torch.zeros(3, dtype=torch.int32)},
            TypeError,
        ),
        ({"logits": torch.zeros(2, 3), "k": 1, "backend": "cuda"}, ValueError),
    ],
)
def test_bad_inputs_raise(kwargs, error):
    with pytest.raises(error):
        topk_gating(**kwargs)
