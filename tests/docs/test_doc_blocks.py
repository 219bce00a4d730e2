"""The rules that keep every documentation example either run or skipped with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_blocks import MarkerError, blocks, pages, untagged_fences

FENCE = "```"


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text.replace("'''", FENCE), encoding="utf-8")
    return page


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_fence_names_its_language(page: Path) -> None:
    """An untagged fence would hide a Python example from the runner: tag it (```text, ...)."""
    assert untagged_fences(page) == [], f"{page}: fences without a language tag"


def test_blocks_share_order_and_take_the_skip_reason(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "# t\n\n'''python\na = 1\n'''\n\n"
        "<!-- docs-test: skip (needs a GPU (CUDA); run by tests/kernels) -->\n"
        "'''python\nb = a\n'''\n\n"
        "'''bash\necho not python\n'''\n\n"
        "* a list item:\n\n  '''py\n  c = a + 1\n  '''\n",
    )
    found = blocks(page)
    assert [b.code for b in found] == ["a = 1\n", "b = a\n", "c = a + 1\n"]
    assert [b.skip for b in found] == [None, "needs a GPU (CUDA); run by tests/kernels", None]


def test_a_marker_may_stand_above_an_include_comment(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "<!-- docs-test: skip (run by its own test) -->\n<!-- include: examples/x.py -->\n"
        "'''python\nx = 1\n'''\n",
    )
    assert [b.skip for b in blocks(page)] == ["run by its own test"]


@pytest.mark.parametrize(
    "text",
    [
        "<!-- docs-test: skip -->\n'''python\nx = 1\n'''\n",  # no reason
        "<!-- docs-test: skip () -->\n'''python\nx = 1\n'''\n",  # empty reason
        "<!-- docs-test: skipp (typo) -->\n'''python\nx = 1\n'''\n",  # unknown directive
        "<!-- docs-test: skip (reason) -->\n\n'''python\nx = 1\n'''\n",  # not directly above
        "<!-- docs-test: skip (reason) -->\n'''bash\nls\n'''\n",  # not a Python block
    ],
)
def test_malformed_or_stray_markers_are_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(MarkerError):
        blocks(_page(tmp_path, text))
