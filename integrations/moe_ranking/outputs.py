"""Writing results: an output folder that appears complete or not at all.

Everything is written into a hidden sibling folder (``.<name>.partial-<random>``) that is renamed
to the final name only once every file is in place. On any error the partial folder is removed,
so a failed run leaves nothing half-written where the user looks.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Written into every folder :func:`atomic_output_dir` creates: a default output folder that holds
#: it came from an earlier run and is replaced; any other non-empty folder needs ``overwrite``.
MARKER = ".moe-ranking-output"
#: The checkout this package runs from (``integrations/moe_ranking/outputs.py`` -> the root).
CHECKOUT = Path(__file__).resolve().parents[2]


def refuse_unsafe(path: str | Path) -> None:
    """Refuse (whatever ``overwrite`` says) an output folder whose replacement would delete the
    current folder, the checkout or a folder above either, or a git repository."""
    target = Path(path).resolve()
    for label, here in (("the current folder", Path.cwd().resolve()), ("the checkout", CHECKOUT)):
        if target == here or target in here.parents:
            what = label if target == here else f"a folder above {label} ({here})"
            raise ConfigError(
                f"output folder {str(path)!r} is {what}: writing the run there would replace "
                "it; choose a new folder such as outputs/<name>"
            )
    if (target / ".git").exists():
        raise ConfigError(
            f"output folder {str(path)!r} is a git repository; choose a new folder such as "
            "outputs/<name>"
        )


def check_output_dir(path: str | Path, overwrite: bool, replace_own: bool = False) -> Path:
    """Fail early (before any training) when the run may not write to ``path``.

    ``path`` may be absent or an empty folder. A non-empty folder needs ``overwrite``, except
    that ``replace_own`` (default output folders) lets a folder an earlier run wrote (it holds
    :data:`MARKER`) be replaced. Folders that :func:`refuse_unsafe` refuses are never allowed.
    """
    path = Path(path)
    refuse_unsafe(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output path {str(path)!r} exists and is not a folder")
        own = replace_own and (path / MARKER).is_file()
        if any(path.iterdir()) and not (overwrite or own):
            why = f" and has no {MARKER} marker of an earlier run" if replace_own else ""
            raise ConfigError(
                f"output folder {str(path)!r} already exists and is not empty{why}; "
                "remove it, choose another --out or pass --overwrite"
            )
    return path


def _missing_parents(folder: Path) -> list[Path]:
    """Ancestors of ``folder`` (itself included) that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


@contextmanager
def atomic_output_dir(
    path: str | Path, overwrite: bool = False, replace_own: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on error it is deleted.

    On any failure (in the body, or renaming the folder into place) the temporary folder and the
    parent folders made for it are removed, and a previous folder at ``path`` is put back.
    """
    final = check_output_dir(path, overwrite, replace_own)
    created = _missing_parents(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    old: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0o700; give the folder the usual permissions
        (tmp / MARKER).write_text("written by python -m integrations.moe_ranking\n")
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)  # the previous folder, as it was
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts as CSV; the header is the union of keys in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
