"""docs/distributed.md: its complete example is docs/examples/ddp_torchrun.py, run by torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "distributed.md"
EXAMPLE = ROOT / "docs" / "examples" / "ddp_torchrun.py"

pytestmark = pytest.mark.distributed


def test_doc_listing_is_the_example_file() -> None:
    text = DOC.read_text()
    match = re.search(
        r"<!-- include: examples/ddp_torchrun.py -->\n```python\n(.*?)```\n", text, re.DOTALL
    )
    assert match is not None
    assert match.group(1) == EXAMPLE.read_text()


def test_example_runs_under_torchrun_on_two_processes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: parameters identical on 2 ranks" in proc.stdout
    assert "epoch 1: weights" in proc.stdout
