"""scripts/setup.sh (what `make setup` / `make demo` run) notices a changed torch request.

The script runs on a copy of the repository's set-up files whose ``.venv/bin/python`` is a stub
that records its arguments instead of installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
"""


def _checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB)
    python.chmod(0o755)
    return tmp_path


def _setup(checkout: Path, **env: str) -> list[str]:
    """Run the script; return the stub's calls of this run."""
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PUB_TORCH_")}
    proc = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_a_changed_torch_request_reinstalls_torch(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    first = _setup(checkout)
    assert any("install" in c and "torch==2.13.0" in c and "index-url" not in c for c in first)
    assert _setup(checkout) == []  # the same request again: nothing to do
    index = "https://download.pytorch.org/whl/cu128"
    calls = _setup(checkout, PUB_TORCH_INDEX=index)
    assert any(c.startswith("-m pip uninstall") and c.endswith("torch") for c in calls)
    install = next(i for i, c in enumerate(calls) if f"--index-url {index}" in c)
    assert "torch==2.13.0" in calls[install]
    assert install > next(i for i, c in enumerate(calls) if "uninstall" in c)
    assert _setup(checkout, PUB_TORCH_INDEX=index) == []
    calls = _setup(checkout, PUB_TORCH_INDEX=index, PUB_TORCH_SPEC="torch==2.12.0")
    assert any("install" in c and "torch==2.12.0" in c for c in calls)


def test_a_stamp_without_a_record_reinstalls_nothing_but_sets_up(tmp_path: Path) -> None:
    # A .venv set up by an earlier version of the script (an empty stamp): no torch removal.
    checkout = _checkout(tmp_path)
    (checkout / ".venv" / ".pub-optim-setup").write_text("")
    calls = _setup(checkout)
    assert calls and not any("uninstall" in c for c in calls)
    assert any("-e .[all,dev]" in c for c in calls)
