"""The study's own training path reproduces the integration's ``run_training`` exactly, and the
loss-weighting methods train through it."""

from __future__ import annotations

import pytest

from benchmarks.study.train import (
    LossWeightedModule,
    RunKey,
    Settings,
    make_config,
    train_custom,
    train_method,
)
from integrations.moe_ranking.data import make_synthetic
from integrations.moe_ranking.training import run_training
from pub_optim.lightning import UpdateBalancing

SETTINGS = Settings(epochs=2, batch_size=128, patience=2)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=600, n_val=200, n_test=200, conflict=0.7, seed=5)


@pytest.mark.parametrize("balancer", ["equal", "pareto", "mgda"])
def test_train_custom_is_run_training(data, balancer: str) -> None:
    key = RunKey("synthetic", "mmoe", balancer, 3)
    expected = run_training(make_config(key, SETTINGS, balancer=balancer), data)
    extra = []
    if balancer != "equal":
        strategy = {"pareto": "pareto", "mgda": "min-norm"}[balancer]
        space = "update" if balancer == "pareto" else "gradient"
        extra = [UpdateBalancing(strategy=strategy, space=space)]
    got = train_custom(make_config(key, SETTINGS), data, extra_callbacks=extra)
    assert got.test == expected.test  # bit for bit
    assert got.best_epoch == expected.best_epoch and got.epochs_run == expected.epochs_run
    assert [row[1:] for row in got.weights] == [
        [row[t] for t in expected.task_names] for row in expected.weights
    ]
    assert len(got.weights) == 2 * 5  # 600 rows / 128 per batch = 5 steps per epoch


def test_methods_outside_run_training(data) -> None:
    results = {
        m: train_method(RunKey("synthetic", "mmoe", m, 0), SETTINGS, data)
        for m in ("equal", "uw", "famo", "pcgrad", "cagrad")
    }
    for name, outcome in results.items():
        assert 0.5 < outcome.test["test/mean_auc"] <= 1.0, name
        assert all(abs(sum(row[1:]) - 1.0) < 1e-9 for row in outcome.weights), name
    # The weights move away from 1/2 (UW's barely move in 10 Adam steps: both log-variances
    # take nearly the same step while the two losses are close).
    for name in ("famo", "pcgrad", "cagrad"):
        assert any(abs(row[1] - 0.5) > 1e-4 for row in results[name].weights), name
    assert all(row[1] == 0.5 for row in results["equal"].weights)
    assert results["famo"].path == "study.train_custom"
    assert train_method(RunKey("synthetic", "mmoe", "pub-pareto", 0), SETTINGS, data).path == (
        "integration.run_training"
    )


def test_loss_weighted_module_trains_the_log_variances(data) -> None:
    from integrations.moe_ranking.models import build_model

    module = LossWeightedModule(build_model("mmoe", data), 1e-3, 0.0, "uw")
    optimizer = module.configure_optimizers()
    assert any(p is module.uw.log_vars for g in optimizer.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="unknown loss weighting"):
        LossWeightedModule(build_model("mmoe", data), 1e-3, 0.0, "other")
