"""The documentation site builds with ``mkdocs build --strict`` and without a single warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip(
    "mkdocs",
    reason="the documentation site needs the docs extra: pip install -e '.[docs]' (part of [dev])",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        # Material prints a banner about MkDocs 2.0 on every build; it is not about these docs.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, log


def test_site_builds(site: tuple[Path, str]) -> None:
    out, log = site
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (out / "index.html").is_file()


def test_api_reference_is_rendered(site: tuple[Path, str]) -> None:
    """mkdocstrings rendered the objects, Sphinx roles became links, the math is marked up."""
    out, _ = site
    wrapper = (out / "api" / "wrapper" / "index.html").read_text(encoding="utf-8")
    assert 'id="pub_optim.wrapper.PUB"' in wrapper
    assert 'id="pub_optim.wrapper.PUB.backward"' in wrapper
    assert ":class:`" not in wrapper and ":meth:`" not in wrapper
    lightning = (out / "api" / "lightning" / "index.html").read_text(encoding="utf-8")
    assert 'id="pub_optim.lightning.UpdateBalancing"' in lightning
    assert 'href="../wrapper/#pub_optim.wrapper.PUB"' in lightning  # a resolved cross-reference
    assert 'class="arithmatex"' in (out / "method" / "index.html").read_text(encoding="utf-8")


def test_results_index_links_every_results_page(site: tuple[Path, str]) -> None:
    out, _ = site
    index = (out / "results" / "index.html").read_text(encoding="utf-8")
    pages = sorted(p.stem for p in (ROOT / "docs" / "results").glob("*.md") if p.stem != "index")
    assert pages
    for stem in pages:
        assert f'href="../{stem}/"' in index or f'href="{stem}/"' in index, stem
