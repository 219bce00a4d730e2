"""Logging through ``pl_module.log``: weights, update norms and cosines reach the user's logger."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mtl_helpers import MultiTask, loader, trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

from pub_optim.lightning import UpdateBalancing


def _rows(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.rglob("metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_stats_reach_the_csv_logger_at_every_logged_step(tmp_path: Path) -> None:
    cb = UpdateBalancing(prog_bar=True)
    tr = trainer(
        max_steps=6,
        callbacks=[cb],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=2,
        enable_progress_bar=False,
    )
    tr.fit(MultiTask(tasks=3), loader())
    rows = [r for r in _rows(tmp_path) if r.get("pub/weight/t0")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # Lightning's 0-based step of steps 2, 4, 6
    names = ["t0", "t1", "t2"]
    expected = {f"pub/weight/{n}" for n in names} | {f"pub/update_norm/{n}" for n in names}
    expected |= {"pub/cosine/t0~t1", "pub/cosine/t0~t2", "pub/cosine/t1~t2"}
    assert expected <= set(rows[-1])
    # the last row is the last step's statistics
    assert cb.optimizer is not None and cb.optimizer.last_stats is not None
    stats = cb.optimizer.last_stats.as_dict()
    for key in expected:
        assert float(rows[-1][key]) == pytest.approx(stats[key], rel=1e-6, abs=1e-7)
    assert sum(float(rows[-1][f"pub/weight/{n}"]) for n in names) == pytest.approx(1.0)
    # the weights are in the progress bar too
    assert set(tr.progress_bar_metrics) == {f"pub/weight/{n}" for n in names}


def test_logging_can_be_reduced_or_switched_off(tmp_path: Path) -> None:
    cb = UpdateBalancing(log_cosines=False, log_every_n_steps=1, prefix="mtl")
    tr = trainer(max_steps=3, callbacks=[cb], logger=CSVLogger(tmp_path / "a"), log_every_n_steps=1)
    tr.fit(MultiTask(), loader())
    keys = set(_rows(tmp_path / "a")[-1])
    assert {"mtl/weight/t0", "mtl/update_norm/t1"} <= keys
    assert not any("cosine" in k for k in keys)
    off = UpdateBalancing(log_stats=False)
    tr = trainer(
        max_steps=3, callbacks=[off], logger=CSVLogger(tmp_path / "b"), log_every_n_steps=1
    )
    tr.fit(MultiTask(), loader())
    assert not any(k.startswith("pub/") for k in tr.logged_metrics)


class _RecordWeights(Callback):
    """The balancer's weights after every optimizer step, by Lightning's 0-based logged step."""

    def __init__(self, balancing: UpdateBalancing) -> None:
        self.balancing = balancing
        self.by_step: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        pub = self.balancing.optimizer
        assert pub is not None and pub.last_stats is not None
        self.by_step[trainer.global_step - 1] = pub.last_stats.weights.tolist()


@pytest.mark.parametrize(("own", "trainers"), [(10, 5), (3, 5), (4, 1)])
def test_own_schedule_logs_each_value_once_under_its_own_step(
    tmp_path: Path, own: int, trainers: int
) -> None:
    # The callback's own schedule differs from the trainer's: every row that carries the weights
    # is a step of the callback's schedule, with that step's weights (never an earlier step's
    # values written again under a later step of the trainer's schedule).
    cb = UpdateBalancing(log_every_n_steps=own, prog_bar=True)
    record = _RecordWeights(cb)
    tr = trainer(
        max_steps=20,
        callbacks=[cb, record],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=trainers,
    )
    tr.fit(MultiTask(), loader(n=20 * 16))
    rows = [r for r in _rows(tmp_path) if r.get("pub/weight/t0")]
    assert [int(r["step"]) for r in rows] == [s - 1 for s in range(own, 21, own)]
    for row in rows:
        logged = [float(row["pub/weight/t0"]), float(row["pub/weight/t1"])]
        np.testing.assert_allclose(logged, record.by_step[int(row["step"])], rtol=1e-6)
    assert set(tr.progress_bar_metrics) >= {"pub/weight/t0", "pub/weight/t1"}


@pytest.mark.parametrize(("state", "space"), [("shared", "marginal"), ("per_task", "update")])
def test_the_callback_takes_state_space_and_logs_the_diagnostics(
    tmp_path: Path, state: str, space: str
) -> None:
    cb = UpdateBalancing(state=state, space=space, diagnostics=True)  # type: ignore[arg-type]
    tr = trainer(max_steps=4, callbacks=[cb], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    tr.fit(MultiTask(), loader())
    assert cb.optimizer is not None
    assert (cb.optimizer.state_mode, cb.optimizer.space) == (state, space)
    assert cb.optimizer.diagnostics
    rows = [r for r in _rows(tmp_path) if r.get("pub/weight/t0")]
    expected = {
        "pub/weights_from_equal",
        "pub/drift_cosine/t0",
        "pub/attributable/t1",
        "pub/gradient_norm/t0",
        "pub/gradient_cosine/t0~t1",
    }
    assert expected <= set(rows[-1])
    assert cb.optimizer.last_stats is not None
    stats = cb.optimizer.last_stats.as_dict()
    for key in expected:
        assert float(rows[-1][key]) == pytest.approx(stats[key], rel=1e-6, abs=1e-7)
