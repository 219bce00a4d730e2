"""What ties a study record to the code that produced it, and the rule that one report covers one
code state only.

Every run record carries :func:`provenance`: the git commit it ran at, a ``dirty`` flag, the
``code_id`` (a hash of the git trees of the code the study runs: ``pub_optim``, ``integrations``,
``benchmarks/study`` without its records, ``pyproject.toml``), the versions of python, torch,
Lightning, numpy and pub_optim, and the CPU model. Committing a tranche's records moves HEAD but
not ``code_id``, so tranches at one code state form one study; any change to the code changes it.

What is reproducible: on one machine (same CPU model, same versions, one torch thread), a run is
bit-for-bit identical when repeated (``tests/study`` checks it). Across CPU models it is not:
float reductions take other vector paths, early stopping can pick another epoch, and per-seed mean
AUC has been seen to move by up to 1.3e-3 between two x86 machines with the same python, torch and
Lightning versions. So a report pools runs of one CPU model only, and says which.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: The code a study run executes; a change to any of it makes another study.
CODE_PATHS = ("pub_optim", "integrations", "benchmarks/study", "pyproject.toml")
#: The study's own outputs and its schedule, which change while it runs and are not code: the
#: records, the records of the balancing check, and the plan (re-planned from the spread of the
#: first tranches; which seeds run is in every record's key).
OUTPUT_PATHS = (
    "benchmarks/study/records",
    "benchmarks/study/records_balancing_check",
    "benchmarks/study/plan.json",
)


class ProvenanceError(ValueError):
    """Records that cannot make one report (mixed code, dirty tree, missing provenance)."""


def _git(*args: str, repo: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _is_output(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OUTPUT_PATHS)


def code_state(repo: Path = REPO) -> dict[str, Any]:
    """``{"commit", "dirty", "dirty_files", "code_id"}`` of the checkout at ``repo``."""
    try:
        commit = _git("rev-parse", "HEAD", repo=repo).strip()
        listing = _git("ls-tree", "-r", "HEAD", "--", *CODE_PATHS, repo=repo)
        status = _git(
            "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS, repo=repo
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ProvenanceError(
            f"cannot read the git state of {repo} ({exc}); the study records the commit it ran "
            "at, so run it from a git checkout"
        ) from exc
    tree = [line for line in listing.splitlines() if not _is_output(line.split("\t", 1)[-1])]
    dirty = sorted(
        line[3:] for line in status.splitlines() if line.strip() and not _is_output(line[3:])
    )
    return {
        "commit": commit,
        "dirty": bool(dirty),
        "dirty_files": dirty[:20],
        "code_id": hashlib.sha256("\n".join(tree).encode()).hexdigest()[:12],
    }


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    import numpy
    import pytorch_lightning
    import torch

    import pub_optim

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "numpy": numpy.__version__,
        "pub_optim": getattr(pub_optim, "__version__", "unknown"),
    }


def provenance(repo: Path = REPO) -> dict[str, Any]:
    """Everything a record needs to say which code, versions and machine produced it."""
    return {**code_state(repo), "versions": versions(), "cpu_model": cpu_model()}


def check_one_code_state(
    records: Sequence[dict[str, Any]], allow_dirty: bool = False
) -> dict[str, Any]:
    """The shared provenance of ``records``; :class:`ProvenanceError` unless they are one study.

    One study = every record has provenance, none ran on a dirty tree (``allow_dirty`` lets a
    smoke check through, marked as such), and all share one ``code_id``, one set of versions and
    one CPU model.
    """
    if not records:
        raise ProvenanceError("no records")
    missing = [r for r in records if "provenance" not in r]
    if missing:
        raise ProvenanceError(
            f"{len(missing)} of {len(records)} records carry no provenance (commit, versions, "
            "CPU); they predate provenance and cannot be tied to the code: rerun them at one "
            "commit"
        )
    dirty = [r for r in records if r["provenance"].get("dirty")]
    if dirty and not allow_dirty:
        files = sorted({f for r in dirty for f in r["provenance"].get("dirty_files", [])})
        raise ProvenanceError(
            f"{len(dirty)} records ran on a checkout with uncommitted code changes "
            f"({', '.join(files[:5]) or '?'}): commit the code and rerun them"
        )
    for field, what in (
        ("code_id", "code states"),
        ("versions", "version sets"),
        ("cpu_model", "CPU models"),
    ):
        seen: dict[str, list[str]] = {}
        for r in records:
            value = r["provenance"].get(field)
            seen.setdefault(repr(value), []).append(r["provenance"].get("commit", "?")[:10])
        if len(seen) > 1:
            detail = "; ".join(
                f"{v} ({len(c)} runs, e.g. commit {c[0]})" for v, c in list(seen.items())[:4]
            )
            raise ProvenanceError(
                f"the records mix {len(seen)} {what}: {detail}. One report covers the runs of "
                "one code state on one kind of machine; rerun the others at this commit or "
                "report them separately"
            )
    first = records[0]["provenance"]
    commits = sorted({r["provenance"]["commit"] for r in records})
    return {**first, "commits": commits, "dirty": bool(dirty)}
