"""Every study method trains through the integration's ``run_training``: its hooks add nothing
but what they are given, and the loss-weighting, loss-scale and fixed-weight paths work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.study import methods as study_methods
from benchmarks.study.train import (
    LossWeightedModule,
    RunKey,
    ScaledLossModule,
    Settings,
    make_config,
    train_method,
)
from integrations.moe_ranking.data import make_synthetic
from integrations.moe_ranking.training import RankingModule, run_training
from pub_optim.lightning import UpdateBalancing

SETTINGS = Settings(epochs=2, batch_size=128, patience=2)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=600, n_val=200, n_test=200, conflict=0.7, seed=5)


@pytest.mark.parametrize("balancer", ["equal", "pareto", "mgda"])
def test_hooks_reproduce_the_named_balancers(data, balancer: str) -> None:
    """A balancer given as an extra callback and the module given by a factory train bit for bit
    like ``run_training``'s own balancer and module."""
    key = RunKey("synthetic", "mmoe", balancer, 3)
    expected = run_training(make_config(key, SETTINGS, balancer=balancer), data)
    extra = []
    if balancer != "equal":
        strategy = {"pareto": "pareto", "mgda": "min-norm"}[balancer]
        space = "update" if balancer == "pareto" else "gradient"
        extra = [UpdateBalancing(strategy=strategy, space=space)]
    got = run_training(
        make_config(key, SETTINGS),
        data,
        module_factory=lambda m: RankingModule(m, SETTINGS.lr, SETTINGS.weight_decay),
        extra_callbacks=extra,
    )
    assert got.test == expected.test  # bit for bit
    assert got.best_epoch == expected.best_epoch and got.epochs_run == expected.epochs_run
    assert got.weights == expected.weights
    assert len(got.weights) == 2 * 5  # 600 rows / 128 per batch = 5 steps per epoch


def test_methods_through_the_hooks(data) -> None:
    results = {
        m: train_method(RunKey("synthetic", "mmoe", m, 0), SETTINGS, data)
        for m in ("equal", "uw", "famo", "pcgrad", "cagrad", "per-task-equal", "as-released")
        if study_methods.unavailable(study_methods.get_method(m)) is None
    }
    assert {"equal", "uw", "famo", "pcgrad", "cagrad", "as-released"} <= set(results)
    for name, outcome in results.items():
        assert 0.5 < outcome.test["test/mean_auc"] <= 1.0, name
        assert all(abs(sum(row[1:]) - 1.0) < 1e-9 for row in outcome.weights), name
    # The weights move away from 1/2 (UW's barely move in 10 Adam steps: both log-variances
    # take nearly the same step while the two losses are close).
    for name in ("famo", "pcgrad", "cagrad"):
        assert any(abs(row[1] - 0.5) > 1e-4 for row in results[name].weights), name
    assert all(row[1] == 0.5 for row in results["equal"].weights)
    assert results["famo"].path == "integration.run_training+hooks"
    assert train_method(RunKey("synthetic", "mmoe", "pub-pareto", 0), SETTINGS, data).path == (
        "integration.run_training"
    )
    # Fixed weights of 1, not normalised, in update space: a different run from equal weighting.
    assert results["as-released"].test != results["equal"].test


def test_solve_every_goes_through_the_callback(data) -> None:
    every = dataclasses.replace(SETTINGS, solve_every=4)
    key = RunKey("synthetic", "mmoe", "pub-pareto", 1)
    each = train_method(key, SETTINGS, data)
    fourth = train_method(key, every, data)
    assert fourth.path == "integration.run_training+hooks"
    rows = [tuple(r[1:]) for r in fourth.weights]
    assert rows[1] == rows[0] and rows[3] == rows[0]  # held between solves
    assert [tuple(r[1:]) for r in each.weights] != rows


def test_loss_scales(data) -> None:
    model_data = data
    from integrations.moe_ranking.models import build_model

    torch.manual_seed(0)
    module = ScaledLossModule(build_model("mmoe", model_data), 1e-3, 0.0, (100.0, 0.5))
    plain = RankingModule(module.model, 1e-3, 0.0)
    batch = next(iter(_loader(model_data)))
    scaled, _ = module.task_losses(batch)
    unscaled, _ = plain.task_losses(batch)
    assert torch.allclose(scaled["task_a"], 100.0 * unscaled["task_a"])
    assert torch.allclose(scaled["task_b"], 0.5 * unscaled["task_b"])
    with pytest.raises(ValueError, match="one positive loss scale per task"):
        ScaledLossModule(build_model("mmoe", model_data), 1e-3, 0.0, (1.0,))
    key = RunKey("synthetic", "mmoe", "equal", 0)
    base = train_method(key, SETTINGS, data)
    scaled_run = train_method(key, SETTINGS, data, loss_scales=(100.0, 1.0))
    assert scaled_run.test != base.test and scaled_run.path.endswith("+hooks")
    with pytest.raises(ValueError, match="3 loss scales for 2 tasks"):
        train_method(key, SETTINGS, data, loss_scales=(1.0, 1.0, 1.0))


def _loader(data):
    from integrations.moe_ranking.data import make_loader

    return make_loader(data.train, 64, shuffle=False)


def test_a_method_the_installed_pub_optim_lacks_is_refused(
    data, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = dataclasses.replace(
        study_methods.METHODS["pub-pareto"], name="pub-future", options=(("no_such_option", 1),)
    )
    monkeypatch.setitem(study_methods.METHODS, "pub-future", method)
    reason = study_methods.unavailable(method)
    assert reason is not None and "no_such_option" in reason and "lacks" in reason
    with pytest.raises(ValueError, match="lacks"):
        train_method(RunKey("synthetic", "mmoe", "pub-future", 0), SETTINGS, data)
    future_space = dataclasses.replace(method, options=(), space="no-such-space")
    assert "space='no-such-space'" in (study_methods.unavailable(future_space) or "")


def test_loss_weighted_module_trains_the_log_variances(data) -> None:
    from integrations.moe_ranking.models import build_model

    module = LossWeightedModule(build_model("mmoe", data), 1e-3, 0.0, "uw")
    optimizer = module.configure_optimizers()
    assert any(p is module.uw.log_vars for g in optimizer.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="unknown loss weighting"):
        LossWeightedModule(build_model("mmoe", data), 1e-3, 0.0, "other")


def test_subset_keeps_history_and_text() -> None:
    """Row subsets keep every tensor of a split (MovieLens's history and text too), row for row."""
    from benchmarks.study.train import _subset
    from integrations.moe_ranking.data import Split

    n = 10
    split = Split(
        cat=torch.arange(n).unsqueeze(1),
        num=torch.zeros(n, 0),
        labels=torch.zeros(n, 2),
        history=torch.arange(n).unsqueeze(1) * 10,
        text=torch.arange(n).unsqueeze(1) * 100,
    )
    sub = _subset(split, 4, seed=0)
    assert len(sub) == 4 and sub.history is not None and sub.text is not None
    assert torch.equal(sub.history[:, 0], sub.cat[:, 0] * 10)
    assert torch.equal(sub.text[:, 0], sub.cat[:, 0] * 100)
