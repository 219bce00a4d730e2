"""Invalid option values: exit status 2 and an ``error:`` line before any data is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations.moe_ranking import data as data_package
from integrations.moe_ranking.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any data loading fails the test (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    for name in ("load_data", "load_adult", "load_movielens", "make_synthetic"):
        monkeypatch.setattr(data_package, name, refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


FIT = ["fit", "--data", "synthetic", "--n-train", "50", "--epochs", "1"]

BAD_FIT = [
    (["--model", "sparse-moe", "--top-k", "9"], "--top-k 9 exceeds the number of experts (8"),
    (["--model", "sparse-moe", "--experts", "1", "--top-k", "1"], "needs at least 2 experts"),
    (["--model", "sparse-moe", "--experts", "1"], "needs at least 2 experts"),
    (["--model", "sparse-moe", "--experts", "4", "--top-k", "5"], "--top-k 5 exceeds"),
    (["--model", "sparse-moe", "--esmm", "--funnel", "--top-k", "9"], "--top-k 9 exceeds"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--seed", "-3"], "--seed must be an integer from 0 to 4294967295"),
    (["--seed", str(2**32)], "--seed must be an integer from 0"),
    (["--conflict", "nan"], "--conflict must be in [0, 1]"),
    (["--conflict", "1.5"], "--conflict must be in [0, 1]"),
    (["--model", "ple", "--experts", "3"], "--experts applies to --model mmoe, sparse-moe or grec"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_FIT)
def test_fit_refuses_bad_values_before_loading(
    tmp_path: Path, capsys, no_loading, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    code, err = run_cli([*FIT, *extra, "--out", str(out)], capsys)
    assert code == 2, err
    assert "error: " in err and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-5"], "--batch-size"),
        (["--patience", "0"], "--patience"),
        (["--threads", "0"], "--threads"),
        (["--n-train", "0"], "--n-train"),
        (["--seed", "1.5"], "--seed"),
    ],
)
def test_fit_refuses_out_of_range_numbers(
    tmp_path: Path, capsys, no_loading, extra: list[str], message: str
) -> None:
    code, err = run_cli([*FIT, *extra, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "error: " in err and message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "9"], "--top-k applies to --model sparse-moe"),
        (["--model", "sparse-moe", "--top-k", "9"], "--top-k 9 exceeds"),
        (
            ["--model", "ple", "--experts", "3"],
            "--experts applies to --model mmoe, sparse-moe or grec",
        ),
        (["--model", "mmoe", "--levels", "2"], "--levels applies to --model ple"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--seed", "-3"], "--seed"),
        (["--lr", "inf"], "--lr"),
    ],
)
def test_demo_refuses_bad_values_before_loading(
    tmp_path: Path, capsys, no_loading, extra: list[str], message: str
) -> None:
    code, err = run_cli(["demo", *extra, "--out", str(tmp_path / "demo")], capsys)
    assert code == 2, err
    assert "error: " in err and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_valid_routing_options_pass_the_checks(tmp_path: Path, capsys, no_loading) -> None:
    """The boundary cases are accepted: the run gets as far as loading (refused here)."""
    for extra in (["--experts", "2", "--top-k", "2"], ["--top-k", "8"], ["--experts", "3"]):
        argv = [*FIT, "--model", "sparse-moe", *extra, "--out", str(tmp_path / "out")]
        with pytest.raises(AssertionError, match="data was loaded"):
            main(argv)
