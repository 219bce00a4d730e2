"""MkDocs hooks for the documentation site (mkdocs.yml ``hooks:``): the benchmark results.

The benchmark scripts write their pages into ``docs/results/`` and new ones appear over time.
So that a new results page neither fails the strict build (a page missing from the navigation
is a warning there) nor goes unlisted:

* ``on_config`` appends every ``docs/results/*.md`` that mkdocs.yml does not list to the
  "Benchmark results" section of the navigation, titled by its first heading;
* ``on_page_markdown`` replaces the ``<!-- results-table -->`` marker of ``results/index.md``
  with a table linking every results page, with the command that produced it (read from the
  page: its first ``Command: `...` `` line, or the script it says it was produced by).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
