"""The documentation site builds with ``mkdocs build --strict`` and without a single warning, and
reads offline: no script, style or font from the network, maths pre-rendered, pages that link to
``page.html`` files."""

from __future__ import annotations

import os
import re
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
    wrapper = (out / "api" / "wrapper.html").read_text(encoding="utf-8")
    assert 'id="pub_optim.wrapper.PUB"' in wrapper
    assert 'id="pub_optim.wrapper.PUB.backward"' in wrapper
    assert ":class:`" not in wrapper and ":meth:`" not in wrapper
    lightning = (out / "api" / "lightning.html").read_text(encoding="utf-8")
    assert 'id="pub_optim.lightning.UpdateBalancing"' in lightning
    assert 'href="wrapper.html#pub_optim.wrapper.PUB"' in lightning  # a resolved cross-reference


def test_results_index_links_every_results_page(site: tuple[Path, str]) -> None:
    out, _ = site
    index = (out / "results" / "index.html").read_text(encoding="utf-8")
    pages = sorted(p.stem for p in (ROOT / "docs" / "results").glob("*.md") if p.stem != "index")
    assert pages
    for stem in pages:
        assert f'href="{stem}.html"' in index, stem


def _pages(out: Path) -> list[Path]:
    return sorted(out.rglob("*.html"))


def test_maths_is_mathml_rendered_at_build_time(site: tuple[Path, str]) -> None:
    out, _ = site
    method = (out / "method.html").read_text(encoding="utf-8")
    assert method.count("<math") >= 20
    for page in _pages(out):  # no TeX left for a script to typeset
        text = page.read_text(encoding="utf-8")
        assert not re.search(r'class="arithmatex">\\[(\[]', text), page


def test_nothing_is_loaded_from_the_network(site: tuple[Path, str]) -> None:
    out, _ = site
    # (rel="canonical" names the page's published address: nothing is loaded from it)
    tag = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*>")
    remote = re.compile(r'\b(?:src|href)="(?:https?:)?//')
    for page in _pages(out):
        found = [
            t
            for t in tag.findall(page.read_text(encoding="utf-8"))
            if remote.search(t) and 'rel="canonical"' not in t
        ]
        assert not found, f"{page.relative_to(out)} loads {found}"


def test_local_links_resolve_to_files(site: tuple[Path, str]) -> None:
    # Every page, 404.html included (its links are absolute: site_url's path is "/"), links to
    # files of the site: from disk, site/index.html navigates like the served site.
    out, _ = site
    link = re.compile(r'<(?:a|link|script|img)\b[^>]*\b(?:href|src)="([^"]*)"')
    for page in _pages(out):
        for found in link.findall(page.read_text(encoding="utf-8")):
            target = found.split("#")[0].split("?")[0]
            if not target or ":" in target:  # an anchor on the page, or another site
                continue
            path = out / target.lstrip("/") if target.startswith("/") else page.parent / target
            assert path.resolve().is_file(), f"{page.relative_to(out)} links to missing {target}"


def test_sitemap_lists_every_page(site: tuple[Path, str]) -> None:
    out, _ = site
    sitemap = (out / "sitemap.xml").read_text(encoding="utf-8")
    pages = [p for p in _pages(out) if p.name != "404.html"]
    assert sitemap.count("<loc>") == len(pages)


def test_figures_link_to_their_full_size_file(site: tuple[Path, str]) -> None:
    out, _ = site
    checked = 0
    for page in sorted((out / "results").glob("*.html")):
        text = page.read_text(encoding="utf-8")
        for src in re.findall(r'<img\b[^>]*\bsrc="([^"]+\.png)"', text):
            assert f'<a href="{src}" title="full size"><img' in text, (page.name, src)
            checked += 1
    assert checked > 10  # (the results pages hold 15 figures)


def test_quality_study_navigation_entry_is_the_study(site: tuple[Path, str]) -> None:
    out, _ = site
    index = (out / "index.html").read_text(encoding="utf-8")
    entries = re.findall(r'<a href="([^"]+)" class="md-nav__link">\s*<span class="md-ellipsis">'
                         r"\s*Quality study\s*</span>", index)
    assert entries == ["results/study.html"]
