"""MkDocs hooks for the documentation site (mkdocs.yml ``hooks:``): benchmark results, maths and
figures.

The benchmark scripts write their pages into ``docs/results/`` and new ones appear over time.
So that a new results page neither fails the strict build (a page missing from the navigation
is a warning there) nor goes unlisted:

* ``on_config`` appends every ``docs/results/*.md`` that mkdocs.yml does not list to the
  "Benchmark results" section of the navigation, titled by its first heading;
* ``on_page_markdown`` replaces the ``<!-- results-table -->`` marker of ``results/index.md``
  with a table linking every results page, with the command that produced it (read from the
  page: its first ``Command: `...` `` line, or the script it says it was produced by);
* ``on_page_content`` renders the maths (``$...$``, ``$$...$$``, marked up by
  ``pymdownx.arithmatex``) to MathML at build time, which browsers display natively: the site
  needs no script and no network to show it. A formula that cannot be converted fails the build;
* ``on_page_content`` also links every figure to its full-size file (wide figures are scaled
  down to the width of the page).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert as latex_to_mathml

RESULTS_SECTION = "Benchmark results"
RESULTS_DIR = "results"
TABLE_MARKER = "<!-- results-table -->"

_COMMAND = re.compile(r"[Cc]ommand:\s*`([^`]+)`")
_PRODUCED_BY = re.compile(r"(?:Produced|Generated) by `([^`]+)`")


def _result_pages(docs_dir: Path) -> list[Path]:
    return sorted(p for p in (docs_dir / RESULTS_DIR).glob("*.md") if p.name != "index.md")


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem.replace("_", " ")


def _command(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    match = _COMMAND.search(text) or _PRODUCED_BY.search(text)
    return f"`{match.group(1)}`".replace("|", "\\|") if match else "see the page"


def _listed(items: Any) -> set[str]:
    """Every page path named anywhere in a nav (sub)tree."""
    found: set[str] = set()
    if isinstance(items, str):
        found.add(items)
    elif isinstance(items, list):
        for item in items:
            found |= _listed(item)
    elif isinstance(items, dict):
        for value in items.values():
            found |= _listed(value)
    return found


def on_config(config: Any, **kwargs: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    docs_dir = Path(config["docs_dir"])
    for entry in nav:
        if isinstance(entry, dict) and RESULTS_SECTION in entry:
            section = entry[RESULTS_SECTION]
            listed = _listed(nav)
            for page in _result_pages(docs_dir):
                uri = f"{RESULTS_DIR}/{page.name}"
                if uri not in listed:
                    section.append({_title(page): uri})
            break
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if page.file.src_uri != f"{RESULTS_DIR}/index.md" or TABLE_MARKER not in markdown:
        return markdown
    rows = ["| results | produced by |", "|---|---|"]
    for result in _result_pages(Path(config["docs_dir"])):
        title = _title(result).replace("|", "\\|")
        rows.append(f"| [{title}]({result.name}) | {_command(result)} |")
    return markdown.replace(TABLE_MARKER, "\n".join(rows))


# pymdownx.arithmatex (generic mode): \( ... \) in a span, \[ ... \] in a div.
_INLINE_MATH = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.DOTALL)
_DISPLAY_MATH = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.DOTALL)
# An <img> with its own src, not already the content of a link.
_LINKED_IMG = re.compile(r"<a\b[^>]*>\s*<img\b[^>]*>\s*</a>", re.DOTALL)
_IMG = re.compile(r'<img\b[^>]*\bsrc="([^"]+)"[^>]*>', re.DOTALL)


def _mathml(tex: str, display: str, page: Any) -> str:
    source = html.unescape(tex).strip()
    try:
        return str(latex_to_mathml(source, display=display))
    except Exception as err:  # any failure of the converter: a build error naming the formula
        where = page.file.src_uri
        raise ValueError(f"{where}: cannot render the formula {source!r}: {err}") from err


def _link_figures(content: str) -> str:
    pieces, last = [], 0
    linked = [m.span() for m in _LINKED_IMG.finditer(content)]
    for match in _IMG.finditer(content):
        if any(a <= match.start() < b for a, b in linked) or "twemoji" in match.group(0):
            continue
        src = match.group(1)
        pieces += [content[last : match.start()], f'<a href="{src}" title="full size">']
        pieces += [match.group(0), "</a>"]
        last = match.end()
    return "".join(pieces) + content[last:]


def on_page_content(content: str, page: Any, **kwargs: Any) -> str:
    content = _DISPLAY_MATH.sub(
        lambda m: f'<div class="arithmatex">{_mathml(m.group(1), "block", page)}</div>', content
    )
    content = _INLINE_MATH.sub(
        lambda m: f'<span class="arithmatex">{_mathml(m.group(1), "inline", page)}</span>', content
    )
    return _link_figures(content)
