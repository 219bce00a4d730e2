"""Without an optional dependency of the integration, the ImportError names the extra (and the
command line says so with exit status 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: (blocked module, what is imported or run without it)
CASES = [
    ("pandas", "import integrations.moe_ranking.data"),
    ("pytorch_lightning", "import integrations.moe_ranking.training"),
    ("torchmetrics", "import integrations.moe_ranking.metrics"),
    (
        "matplotlib",
        "from integrations.moe_ranking.plots import plot_runs; plot_runs({}, 'x.png')",
    ),
    (
        "pyarrow",
        "from integrations.moe_ranking.data import load_movielens; load_movielens()",
    ),
]

PRELUDE = "import sys\nsys.modules[{blocked!r}] = None  # makes `import {blocked}` fail\n"


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(("blocked", "statement"), CASES)
def test_import_error_names_the_extra(tmp_path: Path, blocked: str, statement: str) -> None:
    code = PRELUDE.format(blocked=blocked) + (
        "from integrations.moe_ranking._extras import MissingExtraError\n"
        "try:\n"
        f"    {statement}\n"
        "except MissingExtraError as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print('MISSING', exc)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("MISSING"), proc.stdout + proc.stderr[-3000:]
    assert "pub-optim[integrations]" in proc.stdout and repr(blocked) in proc.stdout
    assert "pip install -e '.[integrations]'" in proc.stdout


def test_command_line_without_pandas_exits_2(tmp_path: Path) -> None:
    code = PRELUDE.format(blocked="pandas") + (
        "import runpy\n"
        "sys.argv = ['x', 'fit', '--data', 'synthetic']\n"
        "runpy.run_module('integrations.moe_ranking', run_name='__main__')\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and "pub-optim[integrations]" in proc.stderr
    assert "Traceback" not in proc.stderr
