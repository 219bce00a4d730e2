"""Output folders: refused targets, complete-or-nothing writes, the previous folder kept on a
failed rename."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integrations.moe_ranking import data as data_package
from integrations.moe_ranking.cli import main
from integrations.moe_ranking.errors import ConfigError
from integrations.moe_ranking.outputs import (
    CHECKOUT,
    MARKER,
    atomic_output_dir,
    check_output_dir,
)


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded")

    for name in ("load_data", "load_adult", "make_synthetic"):
        monkeypatch.setattr(data_package, name, refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_demo_keeps_a_folder_it_did_not_create(tmp_path: Path, capsys, no_loading) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["demo", "--out", str(out)], capsys)
    assert code == 2 and "already exists and is not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(AssertionError, match="data was loaded"):  # --overwrite passes the check
        main(["demo", "--out", str(out), "--overwrite"])


@pytest.mark.parametrize("command", ["fit", "demo"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_current_folder_checkout_and_parents_are_refused(
    tmp_path: Path, monkeypatch, capsys, no_loading, command: str, overwrite: list[str]
) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    for target in (".", "..", str(tmp_path), "/", str(CHECKOUT), str(CHECKOUT.parent)):
        code, err = run_cli([command, "--out", target, *overwrite], capsys)
        assert code == 2, (target, err)
        assert "error: " in err and "would replace it" in err, err
    assert (work / "notes.txt").read_text() == "keep"


def test_a_git_repository_is_refused(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(ConfigError, match="git repository"):
        check_output_dir(tmp_path / "repo", overwrite=True)


def test_default_folder_replaced_only_when_a_run_wrote_it(tmp_path: Path) -> None:
    out = tmp_path / "outputs" / "run"
    with atomic_output_dir(out, replace_own=True) as folder:
        (folder / "a.txt").write_text("1")
    assert (out / MARKER).is_file() and (out / "a.txt").read_text() == "1"
    with atomic_output_dir(out, replace_own=True) as folder:  # its own earlier output: replaced
        (folder / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    with pytest.raises(ConfigError, match="--overwrite"):  # an explicit folder needs overwrite
        check_output_dir(out, overwrite=False)
    (out / MARKER).unlink()
    with pytest.raises(ConfigError, match="--overwrite"):  # not written by a run
        check_output_dir(out, overwrite=False, replace_own=True)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["run"]


def test_a_failed_body_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as folder:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no partial folder, no parents made for it


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failed_rename_restores_the_previous_folder(
    tmp_path: Path, monkeypatch, failing_call: int
) -> None:
    """Call 1 moves the previous folder aside, call 2 moves the new one into place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old run")
    real_rename = os.rename
    calls = []

    def rename(src, dst, *args, **kwargs):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == failing_call:
            raise OSError("rename failed")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with (
        pytest.raises(OSError, match="rename failed"),
        atomic_output_dir(out, overwrite=True) as folder,
    ):
        (folder / "new.txt").write_text("new run")
    monkeypatch.setattr(os, "rename", real_rename)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old folder left
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert (out / "previous.txt").read_text() == "old run"
