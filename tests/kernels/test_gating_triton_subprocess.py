"""Runs the interpreter tests (gating and Nash kernels, GRec on the gating kernels) in a fresh
process when this one cannot (see ``conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")

from integrations.moe_ranking.gating.triton_ops import triton_interpreted

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(triton_interpreted(), reason="the interpreter tests ran in this process")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd.append(str(HERE / "test_gating_triton_interpreter.py"))
    cmd.append(str(HERE / "test_nash_triton_interpreter.py"))
    cmd.append(str(HERE / "test_grec_triton_interpreter.py"))
    proc = subprocess.run(
        cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
