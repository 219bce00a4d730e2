"""Griffe extension for the documentation site (mkdocs.yml): Sphinx roles in docstrings.

The docstrings are Google style, but their cross-references use Sphinx roles
(``:class:`GradientView```, ``:meth:`PUB.backward```, ``:mod:`~pub_optim.transforms.fused```),
which mkdocstrings would print literally. This rewrites each role into an *optional*
mkdocs-autorefs reference: a link when the target is rendered somewhere on the site, plain code
otherwise (an unresolved optional reference is not a warning). Targets are resolved in the scope
of the docstring's object, the way Python resolves the name there, then mapped to the path where
the object is defined (the one mkdocstrings registers). ``~`` shows the last component only, as in
Sphinx. An rST literal block (a paragraph ending in ``::`` followed by an indented block) becomes
a fenced Python code block.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj|const):`([^`]+)`")
_EXPLICIT = re.compile(r"^(.*?)\s*<([^<>]+)>$")  # :meth:`title <target>`


def _canonical(obj: griffe.Object | griffe.Alias, dotted: str) -> str:
    """Full path of the object that ``dotted`` names in ``obj``'s scope (best effort)."""
    dotted = dotted.strip().rstrip("()")
    head, _, rest = dotted.partition(".")
    try:
        base = obj.resolve(head)
    except Exception:
        base = head  # already absolute (e.g. "pub_optim.PUB"), or outside the package
    path = f"{base}.{rest}" if rest else base
    try:
        target = obj.modules_collection.get_member(path)  # type: ignore[union-attr]
        return str(target.canonical_path)
    except Exception:
        return path


def _rewrite(obj: griffe.Object | griffe.Alias, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        text = match.group(1).strip()
        explicit = _EXPLICIT.match(text)
        if explicit:
            title, target = explicit.group(1), explicit.group(2).strip().lstrip("~")
        else:
            target = text.lstrip("~")
            title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
        identifier = html.escape(_canonical(obj, target), quote=True)
        code = f"<code>{html.escape(title)}</code>"
        return f'<autoref identifier="{identifier}" optional>{code}</autoref>'

    return _ROLE.sub(replace, text)


def _literal_blocks(text: str) -> str:
    """``Example::`` + blank line + indented block -> ``Example:`` + a fenced python block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if stripped.endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            indent = len(line) - len(line.lstrip())
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
            ):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
                j -= 1
            code = [b for b in block if b.strip()]
            if code:
                inner = min(len(b) - len(b.lstrip()) for b in code)
                pad = " " * indent
                head = stripped[:-2].rstrip()
                if head.strip():
                    out.append(head + ":")
                out.append("")
                out.append(pad + "```python")
                out.extend(pad + b[inner:] if b.strip() else "" for b in block[1:])
                out.append(pad + "```")
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _walk(obj: griffe.Object, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.docstring is not None and ":" in obj.docstring.value:
        obj.docstring.value = _literal_blocks(_rewrite(obj, obj.docstring.value))
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, seen)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` cross-references once a package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
