"""The install path the docs give for a user: build a wheel from the checkout, install it in a
fresh virtual environment, import it from there (not from the checkout). The wheel holds
``pub_optim`` only (the integration, benchmarks and scripts run from a checkout)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

CHECK = """
import importlib.metadata as md, importlib.util, pathlib, sys
import torch
import pub_optim
from pub_optim import PUB

here = pathlib.Path(pub_optim.__file__).resolve()
assert here.is_relative_to(pathlib.Path(sys.prefix).resolve()), here  # the wheel, not the checkout
assert (here.parent / "py.typed").is_file()
meta = md.metadata("pub-optim")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
files = [str(f) for f in md.files("pub-optim")]
assert any(f.endswith("licenses/LICENSE") for f in files), files
# the library only: nothing under a generic top-level name such as `integrations`
assert importlib.util.find_spec("integrations") is None
model = torch.nn.Linear(3, 2)
opt = PUB(torch.optim.Adam(model.parameters(), lr=0.1))
x = torch.randn(4, 3)
opt.zero_grad()
opt.backward({"a": model(x)[:, 0].pow(2).mean(), "b": model(x)[:, 1].abs().mean()})
opt.step()
print("ok", meta["Version"])
"""


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_wheel_installs_into_a_fresh_venv_and_works(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # --no-build-isolation: the build requirement (setuptools) of this environment, so the test
    # needs no index.
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        dist,
        ROOT,
    )
    (wheel,) = dist.glob("pub_optim-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pub_optim"}, top
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # torch and numpy (the only runtime dependencies) come from this environment: a .pth puts its
    # site-packages after the fresh venv's own (the editable pub_optim of this environment is
    # not on that path: its finder is loaded by a .pth file, which a path entry does not run).
    fresh = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    (fresh / "deps-from-dev-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the fresh venv's own setuptools (if its Python bundles one) is older than what torch needs
    _run(python, "-m", "pip", "uninstall", "-q", "-y", "setuptools")
    _run(python, "-m", "pip", "install", "--no-index", "-q", wheel)
    out = _run(python, "-c", CHECK, cwd=tmp_path)
    assert out.startswith("ok ")
