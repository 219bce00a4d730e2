"""One tiny end-to-end training run per model on synthetic data, determinism, best-epoch restore."""

from __future__ import annotations

import pytest
import torch

from integrations.moe_ranking.data import MultiTaskData, make_loader
from integrations.moe_ranking.errors import ConfigError
from integrations.moe_ranking.metrics import ExpertLoad, TaskMetrics
from integrations.moe_ranking.models import MODELS
from integrations.moe_ranking.training import TrainConfig, make_balancer_callback, run_training

TINY = {
    "shared-bottom": {"bottom_hidden": (16,), "tower_hidden": (8,)},
    "mmoe": {"num_experts": 3, "expert_hidden": (16,), "tower_hidden": (8,)},
    "ple": {"num_levels": 2, "expert_hidden": (16,), "tower_hidden": (8,)},
    "sparse-moe": {"num_experts": 4, "top_k": 2, "d_model": 8, "expert_hidden": (16,)},
    "grec": {"num_experts": 4, "d_model": 8, "expert_hidden": (16,), "tower_hidden": (8,)},
}


def tiny_config(model: str, **kwargs) -> TrainConfig:
    options = {"epochs": 3, "batch_size": 100, "lr": 1e-2, "patience": 2, "embed_dim": 4}
    options.update(kwargs)
    return TrainConfig(data="synthetic", model=model, model_options=TINY[model], **options)


def evaluate(model, split) -> dict[str, float]:
    metrics = TaskMetrics(model.task_names, "eval")
    model.eval()
    with torch.no_grad():
        for batch in make_loader(split, 1000, shuffle=False):
            metrics.update(model(batch), batch["labels"])
    return metrics.compute()


@pytest.mark.parametrize("name", MODELS)
def test_tiny_end_to_end(name: str, synthetic: MultiTaskData) -> None:
    result = run_training(tiny_config(name), synthetic)
    assert result.task_names == synthetic.task_names
    for t in synthetic.task_names:
        assert 0.6 < result.test_auc(t) <= 1.0, (t, result.test)  # learned something
        assert result.test[f"test/logloss/{t}"] > 0
    assert len(result.history) == result.epochs_run
    assert len(result.weights) == result.epochs_run * 6  # 600 rows / batch 100
    assert all(row[t] == 0.5 for row in result.weights for t in synthetic.task_names)
    # The best epoch's weights are restored: re-evaluating on validation gives the best score.
    val = evaluate(result.model, synthetic.val)
    assert val["eval/mean_auc"] == pytest.approx(result.best_val, abs=1e-6)
    history_row = result.history[-1]
    assert "train/loss" in history_row and all(
        f"train/loss/{t}" in history_row for t in synthetic.task_names
    )
    if name == "shared-bottom":
        assert result.expert_load == {}
    else:
        shares = {k: v for k, v in result.expert_load.items() if "/share_" in k}
        assert shares and sum(shares.values()) == pytest.approx(
            len({k.split("/")[1] for k in shares})
        )


def test_esmm_end_to_end(synthetic_funnel: MultiTaskData) -> None:
    result = run_training(tiny_config("mmoe", esmm=True), synthetic_funnel)
    assert result.task_names == ("ctr", "ctcvr")
    assert result.test_auc("ctcvr") > 0.6


def test_deterministic_for_a_seed(synthetic: MultiTaskData) -> None:
    a = run_training(tiny_config("sparse-moe", epochs=2), synthetic)
    b = run_training(tiny_config("sparse-moe", epochs=2), synthetic)
    c = run_training(tiny_config("sparse-moe", epochs=2, seed=1), synthetic)
    assert a.test == b.test
    assert [r["val/mean_auc"] for r in a.history] == [r["val/mean_auc"] for r in b.history]
    assert a.test != c.test


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown balancer"):
        TrainConfig(balancer="gradnorm").validate()
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match="unknown balancer"):
        make_balancer_callback("pcgrad")
    assert make_balancer_callback("equal") is None


def test_task_metrics_match_direct_computation() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (200, 2)).float()
    logits = {"a": torch.randn(200) + labels[:, 0], "b": torch.randn(200)}
    metrics = TaskMetrics(("a", "b"), "x")
    metrics.update({k: v[:120] for k, v in logits.items()}, labels[:120])
    metrics.update({k: v[120:] for k, v in logits.items()}, labels[120:])
    out = metrics.compute()
    # AUC as the share of (positive, negative) pairs ranked correctly.
    pos, neg = logits["a"][labels[:, 0] == 1], logits["a"][labels[:, 0] == 0]
    pairwise = (pos[:, None] > neg[None, :]).float().mean()
    assert out["x/auc/a"] == pytest.approx(float(pairwise), abs=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits["b"], labels[:, 1])
    assert out["x/logloss/b"] == pytest.approx(float(bce), rel=1e-5)
    assert out["x/mean_auc"] == pytest.approx((out["x/auc/a"] + out["x/auc/b"]) / 2)


def test_expert_load_shares_and_dead_experts() -> None:
    load = ExpertLoad(dead_fraction=0.1)
    load.update({"g": torch.tensor([10.0, 0.0, 30.0, 0.5])})
    load.update({"g": torch.tensor([10.0, 0.0, 30.0, 0.5])})
    out = load.compute()
    assert out["experts/g/share_0"] == pytest.approx(20 / 81)
    assert out["experts/g/max_share"] == pytest.approx(60 / 81)
    # Dead: share below 0.1 / 4 = 0.025 -> expert 1 (0) and expert 3 (1/81 = 0.012).
    assert out["experts/g/dead"] == 2


@pytest.mark.parametrize("balancer", ["pareto", "mgda", "pareto-per-task", "pareto-marginal"])
def test_balanced_training_end_to_end(balancer: str, synthetic: MultiTaskData) -> None:
    """With the UpdateBalancing callback: the declared shared parameters are what PUB balances,
    the recorded task weights are the solver's (positive, summing to 1, not all equal)."""
    pytest.importorskip("pub_optim.lightning")
    result = run_training(tiny_config("mmoe", balancer=balancer), synthetic)
    shared = sum(p.numel() for p in result.model.shared_parameters())
    assert result.balanced_numel == shared > 0
    weights = torch.tensor([[row[t] for t in synthetic.task_names] for row in result.weights])
    assert len(weights) == result.epochs_run * 6
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype))
    assert float((weights[:, 0] - 0.5).abs().max()) > 1e-3
    for t in synthetic.task_names:
        assert 0.6 < result.test_auc(t) <= 1.0


def test_equal_weighting_balances_nothing(synthetic: MultiTaskData) -> None:
    result = run_training(tiny_config("mmoe", epochs=1), synthetic)
    assert result.balanced_numel == 0
