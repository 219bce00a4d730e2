"""Shapes and parameter partition of every model; gradient flow through the sparse routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from integrations.moe_ranking.data import MultiTaskData
from integrations.moe_ranking.errors import ConfigError
from integrations.moe_ranking.models import MODELS, PLE, InputLayer, build_model, product_logit
from integrations.moe_ranking.models.base import task_group
from integrations.moe_ranking.models.sparse_moe import SparseMoE, dispatch_combine

SMALL = {
    "shared-bottom": {"bottom_hidden": (16,), "tower_hidden": (8,)},
    "mmoe": {"num_experts": 3, "expert_hidden": (16,), "tower_hidden": (8,)},
    "ple": {"num_levels": 2, "expert_hidden": (16,), "tower_hidden": (8,)},
    "sparse-moe": {"num_experts": 4, "top_k": 2, "d_model": 8, "expert_hidden": (8,)},
    "grec": {"num_experts": 4, "top_k": 2, "d_model": 8, "expert_hidden": (8,), "routing": "token"},
}


def task_losses(model, batch) -> dict[str, torch.Tensor]:
    logits = model(batch)
    losses = {
        t: F.binary_cross_entropy_with_logits(logits[t], batch["labels"][:, i])
        for i, t in enumerate(model.task_names)
    }
    for t, aux in model.aux_losses().items():
        losses[t] = losses[t] + aux
    return losses


def reached(model, loss) -> set[int]:
    """ids of the parameters that ``loss`` reaches in the autograd graph."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}


def assert_partition(model, batch) -> None:
    shared = {id(p) for p in model.shared_parameters()}
    own = {t: {id(p) for p in model.task_parameters(t)} for t in model.task_names}
    everything = {id(p) for p in model.parameters()}
    # A partition: disjoint and covering every parameter.
    assert shared | set().union(*own.values()) == everything
    for t in model.task_names:
        assert not (own[t] & shared)
        for u in model.task_names:
            if u != t:
                assert not (own[t] & own[u])
    # Each task's loss reaches exactly the shared parameters and its own.
    losses = task_losses(model, batch)
    for t in model.task_names:
        assert reached(model, losses[t]) == shared | own[t], t


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("esmm", [False, True])
def test_shapes_and_partition(name: str, esmm: bool, synthetic_funnel: MultiTaskData) -> None:
    torch.manual_seed(0)
    model = build_model(name, synthetic_funnel, esmm=esmm, embed_dim=4, **SMALL[name])
    batch = synthetic_funnel.train.batch(slice(0, 64))
    logits = model(batch)
    assert set(logits) == set(model.task_names) == set(synthetic_funnel.task_names)
    for value in logits.values():
        assert value.shape == (64,)
        assert torch.isfinite(value).all()
    assert_partition(model, batch)


@pytest.mark.parametrize("routing", ["token", "sentence", "task"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("sequences", [False, True])
def test_grec_partition_per_routing(
    routing: str, top_k: int, sequences: bool, synthetic: MultiTaskData
) -> None:
    """Whatever the routing, each task's loss reaches exactly the shared parameters and its own
    (also the behaviour-sequence and text encoders when the batch has history and text)."""
    torch.manual_seed(0)
    options = {**SMALL["grec"], "routing": routing, "top_k": top_k}
    if sequences:
        options |= {"history_vocab": 7, "history_len": 4, "text_buckets": 5}
    model = build_model("grec", synthetic, embed_dim=4, **options)
    batch = synthetic.train.batch(slice(0, 32))
    if sequences:
        g = torch.Generator().manual_seed(0)
        batch |= {
            "history": torch.randint(0, 7, (32, 4), generator=g),
            "text": torch.randint(0, 6, (32, 3), generator=g),
        }
    assert_partition(model, batch)
    # For task routing a task's sentences meet only its experts, yet the loss reaches them all
    # (the unpicked ones on an empty group): only the chosen ones get a non-zero gradient.
    losses = task_losses(model, batch)
    grads = torch.autograd.grad(losses["task_a"], list(model.experts.parameters()))
    if routing == "task":
        chosen = set(model.task_experts("task_a"))
        flat = iter(grads)
        for i, expert in enumerate(model.experts):
            norm = sum(float(next(flat).abs().sum()) for _ in expert.parameters())
            assert (norm > 0) == (i in chosen), i


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("esmm", [False, True])
def test_tasks_argument_restricts_output(name: str, esmm: bool, synthetic_funnel) -> None:
    """``forward(batch, tasks=[t])`` returns task t only, equal to the full forward's."""
    torch.manual_seed(0)
    model = build_model(name, synthetic_funnel, esmm=esmm, embed_dim=4, **SMALL[name])
    model.eval()
    batch = synthetic_funnel.train.batch(slice(0, 16))
    with torch.no_grad():
        full = model(batch)
        for t in model.task_names:
            one = model(batch, tasks=[t])
            assert set(one) == {t}
            torch.testing.assert_close(one[t], full[t], rtol=0, atol=0)
        with pytest.raises(KeyError, match="unknown task"):
            model(batch, tasks=["nope"])
        with pytest.raises(ValueError, match="at least one"):
            model(batch, tasks=[])


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_partition_depends_on_depth(levels: int, synthetic: MultiTaskData) -> None:
    torch.manual_seed(0)
    inputs = InputLayer(synthetic.cat_cardinalities, len(synthetic.num_names), embed_dim=4)
    model = PLE(inputs, synthetic.task_names, num_levels=levels, expert_hidden=(8,))
    batch = synthetic.train.batch(slice(0, 32))
    assert_partition(model, batch)
    # Below the last level, task-specific experts feed the shared gate: they are shared.
    last = model.levels[-1]
    for t in model.task_names:
        own = {id(p) for p in model.task_parameters(t)}
        assert all(id(p) in own for p in last.specific[t].parameters())
        if levels > 1:
            assert not any(id(p) in own for p in model.levels[0].specific[t].parameters())


def test_esmm_output_is_product_of_probabilities(synthetic_funnel: MultiTaskData) -> None:
    torch.manual_seed(0)
    model = build_model("mmoe", synthetic_funnel, esmm=True, embed_dim=4, **SMALL["mmoe"])
    batch = synthetic_funnel.train.batch(slice(0, 16))
    out = model(batch)
    ctr, ctcvr = synthetic_funnel.funnel
    expected = torch.sigmoid(out[ctr]) * model.predict_cvr(batch)
    torch.testing.assert_close(torch.sigmoid(out[ctcvr]), expected, rtol=1e-5, atol=1e-6)
    assert (torch.sigmoid(out[ctcvr]) <= torch.sigmoid(out[ctr]) + 1e-6).all()


def test_product_logit_is_stable() -> None:
    a = torch.tensor([-50.0, -3.0, 0.0, 2.0, 40.0, 40.0], dtype=torch.float64)
    b = torch.tensor([-5.0, 1.0, 0.0, -2.0, 40.0, -30.0], dtype=torch.float64)
    out = product_logit(a, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(torch.sigmoid(out), torch.sigmoid(a) * torch.sigmoid(b))


def test_esmm_needs_funnel(synthetic: MultiTaskData) -> None:
    with pytest.raises(ConfigError, match="funnel"):
        build_model("mmoe", synthetic, esmm=True)


def test_unknown_model_and_option(synthetic: MultiTaskData) -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("transformer", synthetic)
    with pytest.raises(ConfigError, match="invalid option"):
        build_model("mmoe", synthetic, num_levels=3)


def test_input_layer_offsets_fields(synthetic: MultiTaskData) -> None:
    """Id 2 of field 0 and id 2 of field 1 must use different embedding rows."""
    layer = InputLayer((5, 7), num_numeric=0, embed_dim=3)
    batch = {"cat": torch.tensor([[2, 2]]), "num": torch.zeros(1, 0)}
    out = layer(batch)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0, :3], layer.embedding.weight[2])
    torch.testing.assert_close(out[0, 3:], layer.embedding.weight[5 + 2])


# --------------------------------------------------------------------------- sparse routing
def sparse_model(data: MultiTaskData, **kwargs) -> SparseMoE:
    torch.manual_seed(1)
    inputs = InputLayer(data.cat_cardinalities, len(data.num_names), embed_dim=4)
    options = {"num_experts": 4, "top_k": 2, "d_model": 8, "expert_hidden": (8,)} | kwargs
    return SparseMoE(inputs, data.task_names, **options)


def test_dispatch_combine_matches_dense_loop(synthetic: MultiTaskData) -> None:
    model = sparse_model(synthetic, top_k=3)
    tokens = torch.randn(40, 8)
    from integrations.moe_ranking.gating import topk_gating

    gating = topk_gating(torch.randn(40, 4), 3)
    out = dispatch_combine(tokens, gating, model.experts)
    expected = torch.zeros_like(out)
    for n in range(40):
        for slot in range(3):
            e = int(gating.expert_ids[n, slot])
            expected[n] += gating.weights[n, slot] * model.experts[e](tokens[n : n + 1])[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_sparse_routing_gradients(synthetic: MultiTaskData) -> None:
    """The task loss trains the router and task embeddings through the top-k weights; experts
    that no token picked get exactly zero gradient, picked experts a non-zero one."""
    # 2 examples x 2 tasks x 2 slots = at most 8 picks among 12 experts: some stay unpicked.
    model = sparse_model(synthetic, num_experts=12, lb_coef=0.0, z_coef=0.0)
    batch = synthetic.train.batch(slice(0, 2))
    losses = task_losses(model, batch)
    sum(losses.values()).backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    for t in model.task_names:
        assert model.task_embeddings[t].grad.abs().sum() > 0
    picked = torch.zeros(model.num_experts, dtype=torch.bool)
    for gating in model.last_gating.values():
        picked[gating.expert_ids.unique()] = True
    for e, expert in enumerate(model.experts):
        grad = sum(p.grad.abs().sum() for p in expert.parameters())
        assert (grad > 0) == bool(picked[e]), e
    assert 0 < int(picked.sum()) < model.num_experts


def test_sparse_routing_gradcheck(synthetic: MultiTaskData) -> None:
    """Analytic gradients through gating, dispatch and combine match finite differences."""
    model = sparse_model(synthetic, lb_coef=0.1, z_coef=0.1).double()
    batch = synthetic.train.batch(slice(0, 5))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    router = model.router.weight

    def loss_of(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            router.copy_(weight)
        losses = task_losses(model, batch)
        return sum(losses.values())

    base = router.detach().clone()
    loss = loss_of(base)
    (grad,) = torch.autograd.grad(loss, router)
    direction = torch.randn_like(base, generator=torch.Generator().manual_seed(0))
    eps = 1e-6
    with torch.no_grad():
        up = loss_of(base + eps * direction)
        down = loss_of(base - eps * direction)
        ids_up = [g.expert_ids.clone() for g in model.last_gating.values()]
        loss_of(base)
        ids_base = [g.expert_ids.clone() for g in model.last_gating.values()]
    assert all(torch.equal(a, b) for a, b in zip(ids_up, ids_base, strict=True))
    numeric = (up - down) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))
    assert abs(float(analytic)) > 1e-8


def test_sparse_aux_losses_follow_gating(synthetic: MultiTaskData) -> None:
    model = sparse_model(synthetic, lb_coef=0.5, z_coef=0.25)
    model(synthetic.train.batch(slice(0, 32)))
    aux = model.aux_losses()
    assert set(aux) == set(model.task_names)
    for t, gating in model.last_gating.items():
        expected = 0.5 * gating.load_balancing_loss + 0.25 * gating.z_loss
        torch.testing.assert_close(aux[t], expected)
    usage = model.expert_usage()["sparse"]
    assert float(usage.sum()) == 32 * 2 * len(model.task_names)


def test_top1_routing_keeps_router_gradient(synthetic: MultiTaskData) -> None:
    """With k=1 the weight is not renormalised (else it would be the constant 1)."""
    model = sparse_model(synthetic, top_k=1, lb_coef=0.0, z_coef=0.0)
    assert model.renormalize is False
    losses = task_losses(model, synthetic.train.batch(slice(0, 16)))
    sum(losses.values()).backward()
    assert model.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mmoe", "ple", "sparse-moe", "grec"])
def test_per_task_expert_usage(name: str, synthetic: MultiTaskData) -> None:
    """Each task's routing mass is reported as ``<group>@<task>``: B per task gate (softmax gates
    sum to 1 per example), B x k for top-k routing of one token per example; the tasks' masses add
    up to the group's (plus, below PLE's last level, the shared gate's B)."""
    torch.manual_seed(0)
    model = build_model(name, synthetic, embed_dim=4, **SMALL[name])
    model(synthetic.train.batch(slice(0, 20)))
    usage = model.expert_usage()
    groups = {k for k in usage if "@" not in k}
    per_example = {"mmoe": 1, "ple": 1, "sparse-moe": 2, "grec": 2 * model_tokens(model)}[name]
    for group in groups:
        per_task = [usage[task_group(group, t)] for t in model.task_names]
        for mass in per_task:
            assert float(mass.sum()) == pytest.approx(20 * per_example, rel=1e-5)
        extra = 20 if name == "ple" and group != f"level{len(model.levels) - 1}" else 0
        assert float(usage[group].sum()) == pytest.approx(20 * per_example * 2 + extra, rel=1e-5)


def model_tokens(model) -> int:
    return model.num_tokens if getattr(model, "routing", None) == "token" else 1
