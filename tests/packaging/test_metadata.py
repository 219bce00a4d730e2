"""pyproject.toml's metadata: an SPDX licence with its text shipped, and extras that install on
every platform (Triton publishes wheels for Linux only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

PLATFORMS = {
    "linux": {"sys_platform": "linux", "platform_system": "Linux"},
    "macos": {"sys_platform": "darwin", "platform_system": "Darwin"},
    "windows": {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt"},
}


def _requirements(extra: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
    """The requirements of an extra, with the project's own extras it names expanded."""
    found = []
    for text in PROJECT["optional-dependencies"][extra]:
        req = Requirement(text)
        if req.name == PROJECT["name"]:
            for inner in sorted(req.extras - seen):
                found += _requirements(inner, seen | {extra})
        else:
            found.append(req)
    return found


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_triton_is_only_required_on_linux(platform: str) -> None:
    env = {**default_environment(), **PLATFORMS[platform]}
    for extra in PROJECT["optional-dependencies"]:
        names = {r.name for r in _requirements(extra) if r.marker is None or r.marker.evaluate(env)}
        assert ("triton" in names) == (platform == "linux" and extra in ("triton", "all")), extra


def test_licence_is_an_spdx_expression_with_its_text() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639


def test_project_urls_are_absolute() -> None:
    urls = PROJECT["urls"]
    assert urls and all(re.match(r"https://\S+$", u) for u in urls.values())


def test_only_pub_optim_is_packaged() -> None:
    """The checkout's integrations/, benchmarks/ and scripts/ stay out of the wheel: nothing is
    installed under a generic top-level name (tests/packaging/test_wheel.py checks a built
    wheel)."""
    from setuptools import find_packages

    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "pub_optim" in packages
    assert all(p == "pub_optim" or p.startswith("pub_optim.") for p in packages), packages
    assert (ROOT / "integrations" / "moe_ranking" / "__main__.py").is_file()  # in the checkout
