"""User-facing pages speak of the project, not of how its work was organised: no references to
issues or work items in docs/ (including the generated results pages) and the READMEs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", *ROOT.glob("integrations/*/README.md")]
)
WORK_ITEM = re.compile(r"\bissues?\s*#?\d+|\bfrom the issue\b|\bwork items?\b", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_work_item_references(page: Path) -> None:
    hits = [
        f"{n}: {line.strip()}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if WORK_ITEM.search(line)
    ]
    assert not hits, "\n".join(hits)
