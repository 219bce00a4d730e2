"""Provenance of the study's records: the code state of a git checkout, the runner's refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.study import provenance, run_study
from benchmarks.study.provenance import ProvenanceError, code_state
from benchmarks.study.train import RunKey, Settings

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SETTINGS = Settings(
    epochs=1,
    batch_size=128,
    patience=1,
    data_options={"synthetic": {"n_train": 300, "n_val": 100, "n_test": 100, "seed": 2}},
)


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo, check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("pub_optim/a.py", "benchmarks/study/run.py", "docs/x.md", "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x = 1\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "one")
    return root


def test_code_state_follows_the_code_not_the_records(repo: Path) -> None:
    first = code_state(repo)
    assert not first["dirty"] and len(first["commit"]) == 40
    # The study's own outputs and other folders neither dirty the tree nor change the code id.
    record = repo / "benchmarks/study/records/full-x/adult/mmoe/equal/seed0.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    (repo / "docs/x.md").write_text("changed\n")
    (repo / "benchmarks/study/plan.json").write_text("{}")  # re-planning is not a code change
    check = repo / "benchmarks/study/records_balancing_check/full-y/seed0.json"
    check.parent.mkdir(parents=True)
    check.write_text("{}")
    assert code_state(repo)["dirty"] is False
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "records")
    second = code_state(repo)
    assert second["commit"] != first["commit"] and second["code_id"] == first["code_id"]
    # A change to the code, uncommitted (tracked or new file) then committed.
    (repo / "pub_optim/a.py").write_text("x = 2\n")
    dirty = code_state(repo)
    assert dirty["dirty"] and dirty["dirty_files"] == ["pub_optim/a.py"]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "code")
    assert code_state(repo)["code_id"] != first["code_id"]
    (repo / "pub_optim/new.py").write_text("y = 1\n")
    assert code_state(repo)["dirty_files"] == ["pub_optim/new.py"]


def test_code_state_outside_git_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvenanceError, match="from a git checkout"):
        code_state(tmp_path)


def _state(code_id: str, dirty: bool = False) -> dict:
    return {"commit": "f" * 40, "dirty": dirty, "dirty_files": ["pub_optim/a.py"] if dirty else [],
            "code_id": code_id}  # fmt: skip


def test_runner_refuses_a_dirty_checkout_and_stale_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [RunKey("synthetic", "mmoe", "equal", 0)]
    quiet = {"log": lambda _: None}
    monkeypatch.setattr(run_study, "code_state", lambda: _state("A", dirty=True))
    with pytest.raises(ProvenanceError, match="uncommitted changes"):
        run_study.execute(keys, SETTINGS, tmp_path, jobs=1, **quiet)
    assert not keys[0].path(tmp_path).exists()  # refused before any work
    monkeypatch.setattr(run_study, "code_state", lambda: _state("A"))
    monkeypatch.setattr(provenance, "code_state", lambda repo=None: _state("A"))
    assert run_study.execute(keys, SETTINGS, tmp_path, jobs=1, **quiet)[:2] == (1, 0)
    record = json.loads(keys[0].path(tmp_path).read_text())
    origin = record["provenance"]
    assert origin["code_id"] == "A" and origin["dirty"] is False
    assert set(origin["versions"]) == {"python", "torch", "pytorch_lightning", "numpy", "pub_optim"}
    assert origin["cpu_model"]
    assert record["started_utc"] <= record["finished_utc"]  # ISO 8601, so strings order
    assert record["started_utc"].endswith("Z") and "T" in record["started_utc"]
    assert run_study.execute(keys, SETTINGS, tmp_path, jobs=1, **quiet)[:2] == (0, 1)
    # The code changed: its records are stale, refused unless retrained.
    monkeypatch.setattr(run_study, "code_state", lambda: _state("B"))
    monkeypatch.setattr(provenance, "code_state", lambda repo=None: _state("B"))
    with pytest.raises(ProvenanceError, match="ran at other code"):
        run_study.execute(keys, SETTINGS, tmp_path, jobs=1, **quiet)
    assert run_study.execute(keys, SETTINGS, tmp_path, jobs=1, rerun_stale=True, **quiet)[:2] == (
        1,
        0,
    )
    assert json.loads(keys[0].path(tmp_path).read_text())["provenance"]["code_id"] == "B"


def test_cli_dirty_checkout_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run_study, "code_state", lambda: _state("A", dirty=True))
    argv = ["--quick", "--datasets", "adult", "--models", "mmoe", "--methods", "equal",
            "--cache", str(tmp_path), "--no-report"]  # fmt: skip
    assert run_study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "commit them first" in err
    assert not list(tmp_path.rglob("*.json"))
