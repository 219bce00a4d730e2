"""Serving one task: fit saves model.pt, predict scores the test rows for one task with
``model(batch, tasks=[task])`` and matches the trained model's full forward pass."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from integrations.moe_ranking import cli, training
from integrations.moe_ranking import data as data_package
from integrations.moe_ranking.data import MultiTaskData, make_synthetic
from integrations.moe_ranking.errors import ConfigError, DataError
from integrations.moe_ranking.serving import (
    MODEL_FILE,
    load_data_for,
    load_model,
    predict,
    read_run,
    save_model,
)

FIT = ["fit", "--data", "synthetic", "--n-train", "300", "--epochs", "1", "--batch-size", "100",
       "--no-progress"]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_scores(path: Path) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    index = [int(r["row"]) for r in rows]
    logits = torch.tensor([float(r["logit"]) for r in rows], dtype=torch.float64)
    probs = torch.tensor([float(r["probability"]) for r in rows], dtype=torch.float64)
    return index, logits, probs


@pytest.fixture
def trained(monkeypatch):
    """Keep the model objects that run_training returns (what fit trained and wrote)."""
    results = []
    real = training.run_training

    def keep(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(training, "run_training", keep)
    return results


@pytest.mark.parametrize(
    ("model", "extra", "task"),
    [
        ("mmoe", [], "task_b"),
        ("sparse-moe", ["--experts", "4"], "task_a"),
        ("ple", ["--esmm", "--funnel"], "ctcvr"),
        ("grec", [], "task_b"),
    ],
)
def test_predict_matches_the_trained_model(
    tmp_path: Path, capsys, trained, model: str, extra: list[str], task: str
) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli([*FIT, "--model", model, *extra, "--out", str(run)], capsys)
    assert code == 0, err
    assert (run / MODEL_FILE).is_file()
    (result,) = trained
    scores = tmp_path / "scores.csv"
    code, out, err = run_cli(
        ["predict", "--run", str(run), "--task", task, "--out", str(scores)], capsys
    )
    assert code == 0, err
    assert f"task {task}" in out
    index, logits, probs = read_scores(scores)
    # the reference: the trained model's full forward pass on the same rows, in memory
    data = make_synthetic(n_train=300, funnel="--funnel" in extra)
    trained_model = result.model.eval()
    with torch.no_grad():
        expected = trained_model(data.test.batch(slice(None)))[task].double()
    assert index == list(range(len(data.test)))
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs, torch.sigmoid(expected), rtol=1e-6, atol=1e-7)
    # the Python entry gives the same model
    loaded = load_model(run)
    with torch.no_grad():
        again = loaded(data.test.batch(slice(None)), tasks=[task])[task].double()
    torch.testing.assert_close(again, expected)


def test_only_the_task_tower_runs(synthetic: MultiTaskData) -> None:
    from integrations.moe_ranking.models import build_model

    model = build_model("mmoe", synthetic).eval()
    called = []
    for t, tower in model.towers.items():
        tower.register_forward_hook(lambda *a, t=t: called.append(t))
    rows, logits = predict(model, synthetic.test, "task_b", batch_size=64)
    assert set(called) == {"task_b"}
    with torch.no_grad():
        torch.testing.assert_close(logits, model(synthetic.test.batch(slice(None)))["task_b"])
    assert torch.equal(rows, torch.arange(len(synthetic.test)))


def test_predict_scores_only_the_task_rows(tmp_path: Path, synthetic: MultiTaskData) -> None:
    from integrations.moe_ranking.models import build_model

    mask = torch.rand(synthetic.test.labels.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    split = dataclasses.replace(synthetic.test, mask=mask)
    model = build_model("shared-bottom", synthetic).eval()
    rows, logits = predict(model, split, "task_a")
    assert torch.equal(rows, mask[:, 0].nonzero().flatten())
    with torch.no_grad():
        torch.testing.assert_close(logits, model(split.batch(slice(None)))["task_a"][rows])


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(data_package, "load_data", refuse)


def _saved_run(folder: Path, data: MultiTaskData) -> Path:
    from integrations.moe_ranking.models import build_model

    folder.mkdir()
    config = {"data": "synthetic", "model": "mmoe", "esmm": False, "embed_dim": 8,
              "model_options": {}, "data_options": {"n_train": 600, "n_val": 200,
                                                   "n_test": 200, "seed": 3}}  # fmt: skip
    save_model(folder / MODEL_FILE, build_model("mmoe", data), config, data)
    return folder


def test_unknown_task_lists_the_tasks(tmp_path: Path, capsys, synthetic, no_loading) -> None:
    run = _saved_run(tmp_path / "run", synthetic)
    out = tmp_path / "s.csv"
    argv = ["predict", "--run", str(run), "--task", "ctr", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "error: unknown task 'ctr'" in err and "task_a, task_b" in err
    assert not out.exists()


def test_missing_run_and_model_file(tmp_path: Path, capsys, no_loading) -> None:
    out = tmp_path / "s.csv"
    argv = ["predict", "--run", str(tmp_path / "nope"), "--task", "a", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    argv = ["predict", "--run", str(tmp_path / "empty"), "--task", "a", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"has no {MODEL_FILE}" in err
    (tmp_path / "empty" / MODEL_FILE).write_text("not a model")
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "could not read" in err
    assert not out.exists()


def test_existing_output_file_needs_overwrite(tmp_path: Path, capsys, synthetic) -> None:
    run = _saved_run(tmp_path / "run", synthetic)
    out = tmp_path / "s.csv"
    out.write_text("mine")
    argv = ["predict", "--run", str(run), "--task", "task_a", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "--overwrite" in err and out.read_text() == "mine"
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert read_scores(out)[0] == list(range(200))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.csv"]  # no partial file


def test_changed_data_is_refused(tmp_path: Path, synthetic: MultiTaskData) -> None:
    run = read_run(_saved_run(tmp_path / "run", synthetic))
    assert load_data_for(run).test.labels.shape == synthetic.test.labels.shape
    with pytest.raises(DataError, match="train_fingerprint changed"):
        load_data_for(run, seed=4)  # other rows, same schema
    with pytest.raises(ConfigError, match="unknown task"):
        run.check_task("nope")
