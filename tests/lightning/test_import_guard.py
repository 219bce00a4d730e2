"""``import pub_optim`` does not import Lightning; ``pub_optim.lightning`` says what to install."""

from __future__ import annotations

import subprocess
import sys

CHECK_CORE = """
import sys
import pub_optim, pub_optim.distributed
bad = [m for m in ("pytorch_lightning", "lightning", "lightning_fabric") if m in sys.modules]
assert not bad, bad
"""

CHECK_MISSING = """
import sys
for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
    sys.modules[name] = None  # makes the import fail, as if not installed
try:
    import pub_optim.lightning
except ImportError as err:
    print(err)
else:
    raise SystemExit("imported without Lightning")
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_core_import_does_not_pull_in_lightning() -> None:
    result = _run(CHECK_CORE)
    assert result.returncode == 0, result.stderr


def test_missing_lightning_names_the_extra() -> None:
    result = _run(CHECK_MISSING)
    assert result.returncode == 0, result.stderr
    assert "pip install 'pub-optim[lightning]'" in result.stdout
