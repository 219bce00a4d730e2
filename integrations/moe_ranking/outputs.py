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


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any training) if ``path`` exists and is not an empty folder."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output path {str(path)!r} exists and is not a folder")
        if any(path.iterdir()) and not overwrite:
            raise ConfigError(
                f"output folder {str(path)!r} already exists and is not empty; "
                "choose another --out or pass --overwrite"
            )
    return path


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on error it is deleted."""
    final = check_output_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0o700; give the folder the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
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
