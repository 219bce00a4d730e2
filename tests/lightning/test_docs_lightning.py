"""docs/lightning.md: its complete example is docs/examples/lightning_example.py, and it runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "lightning.md"
EXAMPLE = ROOT / "docs" / "examples" / "lightning_example.py"


def included_block(doc: Path, name: str) -> str:
    """The fenced code block right after ``<!-- include: NAME -->`` in ``doc``."""
    text = doc.read_text()
    match = re.search(
        rf"<!-- include: {re.escape(name)} -->\n```python\n(.*?)```\n", text, flags=re.DOTALL
    )
    assert match is not None, f"{doc.name} has no included listing of {name}"
    return match.group(1)


def test_doc_listing_is_the_example_file() -> None:
    assert included_block(DOC, "examples/lightning_example.py") == EXAMPLE.read_text()


def _run(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-epochs", "1", "--log-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_runs(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "final task weights: {'pub/weight/income'" in out
    assert list(tmp_path.rglob("metrics.csv"))


@pytest.mark.slow
@pytest.mark.distributed
def test_example_runs_unchanged_under_ddp(tmp_path: Path) -> None:
    out = _run(tmp_path, "--strategy", "ddp", "--devices", "2")
    assert "final task weights: {'pub/weight/income'" in out
