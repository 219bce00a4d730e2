"""GRec: token layout, routing modes, serving one task, capacity and jitter, auxiliary losses,
expert-load statistics; each against an independent plain-torch computation where one exists."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from integrations.moe_ranking.data import MultiTaskData
from integrations.moe_ranking.errors import ConfigError
from integrations.moe_ranking.gating import topk_gating
from integrations.moe_ranking.metrics import ExpertLoad, task_shares
from integrations.moe_ranking.models import InputLayer, build_model
from integrations.moe_ranking.models.grec import (
    ROUTINGS,
    GRec,
    dispatch_selected,
    expert_capacity,
)
from integrations.moe_ranking.plots import plot_expert_load

HISTORY_VOCAB, TEXT_BUCKETS = 9, 6


def grec(data: MultiTaskData, seed: int = 1, **kwargs) -> GRec:
    torch.manual_seed(seed)
    inputs = InputLayer(data.cat_cardinalities, len(data.num_names), embed_dim=4)
    options = {"num_experts": 4, "d_model": 8, "expert_hidden": (8,), "tower_hidden": (4,)}
    return GRec(inputs, data.task_names, **(options | kwargs))


def with_sequences(batch: dict, seed: int = 0) -> dict:
    """The batch plus a right-aligned ``history`` (row 0 empty) and ``text`` (row 1 empty)."""
    g = torch.Generator().manual_seed(seed)
    n = batch["labels"].shape[0]
    history = torch.randint(1, HISTORY_VOCAB, (n, 5), generator=g)
    lengths = torch.randint(0, 6, (n,), generator=g)
    lengths[0], lengths[2] = 0, 5
    history[torch.arange(5).expand(n, 5) < (5 - lengths).unsqueeze(1)] = 0
    text = torch.randint(0, TEXT_BUCKETS + 1, (n, 4), generator=g)
    text[1] = 0
    text[3] = torch.tensor([2, 2, 5, 0])
    return batch | {"history": history, "text": text}


def task_losses(model, batch) -> dict[str, torch.Tensor]:
    logits = model(batch)
    losses = {
        t: F.binary_cross_entropy_with_logits(logits[t], batch["labels"][:, i])
        for i, t in enumerate(model.task_names)
    }
    for t, aux in model.aux_losses().items():
        losses[t] = losses[t] + aux
    return losses


# --------------------------------------------------------------------------- token layout
@pytest.mark.parametrize("sequences", [False, True])
def test_task_sentence_layout(sequences: bool, synthetic: MultiTaskData) -> None:
    extra = {"history_vocab": HISTORY_VOCAB, "text_buckets": TEXT_BUCKETS} if sequences else {}
    model = grec(synthetic, **extra)
    batch = synthetic.train.batch(slice(0, 12))
    if sequences:
        batch = with_sequences(batch)
    fields = len(synthetic.cat_names)
    assert model.num_tokens == fields + 1 + 1 + (2 if sequences else 0)  # fields, numeric, task
    context = model.context_tokens(batch)
    assert context.shape == (12, model.num_tokens - 1, 8)
    emb = model.inputs.embedding.weight[batch["cat"] + model.inputs.offsets]  # [B, F, embed]
    expected_fields = emb @ model.field_proj.weight.T + model.field_proj.bias
    torch.testing.assert_close(context[:, :fields], expected_fields)
    numeric = model.inputs.numeric(batch["num"])
    torch.testing.assert_close(context[:, fields], model.numeric_proj(numeric))
    if sequences:
        text = batch["text"]
        for row in range(12):
            ids = text[row][text[row] > 0]
            ref = model.text.weight[ids].mean(0) if len(ids) else torch.zeros(8)
            torch.testing.assert_close(context[row, fields + 2], ref)
    sentence = model.task_sentence(context, "task_b")
    torch.testing.assert_close(
        sentence[:, -1], (model.task_embeddings["task_b"] + model.positions[-1]).expand(12, 8)
    )
    logits = model(batch)
    assert {k: v.shape for k, v in logits.items()} == {t: (12,) for t in synthetic.task_names}
    assert all(torch.isfinite(v).all() for v in logits.values())


def reference_history_token(model: GRec, items: torch.Tensor) -> torch.Tensor:
    """One row's history token in plain torch: only the real items, no mask needed."""
    enc = model.history
    if len(items) == 0:
        return torch.zeros(enc.items.embedding_dim)
    n, d = len(items), enc.items.embedding_dim
    x = enc.items.weight[items] + enc.positions[:n].flip(0)
    eps = torch.finfo(x.dtype).eps if enc.norm.eps is None else enc.norm.eps
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * enc.norm.weight
    att = enc.attention
    q, k, v = (normed @ att.in_proj_weight.T + att.in_proj_bias).chunk(3, dim=-1)
    heads, dh = att.num_heads, d // att.num_heads
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(dh), dim=-1)
        outs.append(w @ v[:, sl])
    y = x + torch.cat(outs, dim=-1) @ att.out_proj.weight.T + att.out_proj.bias
    return y.mean(0)


def test_history_token_matches_plain_attention(synthetic: MultiTaskData) -> None:
    model = grec(synthetic, history_vocab=HISTORY_VOCAB)
    batch = with_sequences(synthetic.train.batch(slice(0, 10)))
    token = model.history(batch["history"])
    for row in range(10):
        items = batch["history"][row][batch["history"][row] > 0]
        torch.testing.assert_close(token[row], reference_history_token(model, items))
    assert torch.equal(token[0], torch.zeros(8))  # empty history
    # More padding in front changes nothing (positions count from the newest item).
    padded = torch.cat([torch.zeros(10, 3, dtype=torch.long), batch["history"]], dim=1)
    torch.testing.assert_close(model.history(padded), token)


def test_missing_sequences_and_bad_ids(synthetic: MultiTaskData) -> None:
    batch = synthetic.train.batch(slice(0, 4))
    with pytest.raises(ValueError, match="no 'history'"):
        grec(synthetic, history_vocab=HISTORY_VOCAB)(batch)
    with pytest.raises(ValueError, match="no 'text'"):
        grec(synthetic, text_buckets=TEXT_BUCKETS)(batch)
    bad = with_sequences(batch)
    bad["text"] = bad["text"] + TEXT_BUCKETS
    with pytest.raises(ValueError, match="text ids"):
        grec(synthetic, text_buckets=TEXT_BUCKETS)(bad)
    with pytest.raises(ValueError, match="history ids"):
        grec(synthetic, history_vocab=3)(with_sequences(batch))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routing": "expert"}, "routing"),
        ({"top_k": 5}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"router_jitter": 1.0}, "router_jitter"),
        ({"num_heads": 3}, "num_heads"),
    ],
)
def test_invalid_options(kwargs: dict, message: str, synthetic: MultiTaskData) -> None:
    with pytest.raises(ValueError, match=message):
        grec(synthetic, **kwargs)
    with pytest.raises(ConfigError, match=message):
        build_model("grec", synthetic, **kwargs)


# --------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("unit_shape", [(8,), (3, 8)])
@pytest.mark.parametrize("capacity", [None, 3, 1])
def test_dispatch_matches_dense_loop(unit_shape, capacity, synthetic: MultiTaskData) -> None:
    """Every (unit, slot) pair adds weight x expert(unit), except the pairs of an expert beyond
    its first ``capacity`` (in flat pair order), which add nothing."""
    model = grec(synthetic, num_experts=4)
    n, k = 20, 2
    g = torch.Generator().manual_seed(5)
    units = torch.randn(n, *unit_shape, generator=g)
    gating = topk_gating(torch.randn(n, 4, generator=g), k)
    cap = n * k if capacity is None else capacity
    out, dropped = dispatch_selected(units, gating, model.experts, cap, call_unpicked=False)
    expected = torch.zeros_like(units)
    seen = [0] * 4
    expected_dropped = 0
    for flat in range(n * k):  # flat pair index = unit * k + slot, the dispatch order
        unit, slot = divmod(flat, k)
        e = int(gating.expert_ids[unit, slot])
        seen[e] += 1
        if seen[e] > cap:
            expected_dropped += 1
            continue
        expert_out = model.experts[e](units[unit : unit + 1])[0]
        expected[unit] += gating.weights[unit, slot] * expert_out
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert dropped == expected_dropped
    assert (dropped > 0) == (capacity is not None)  # 40 pairs never fit 4 x 3


def test_expert_capacity() -> None:
    assert expert_capacity(10, 2, 4, None) == 20
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 1, 4, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(3, 1, 8, 0.01) == 1


# --------------------------------------------------------------------------- routing modes
def count_expert_calls(model: GRec) -> tuple[list[int], list]:
    rows = [0] * model.num_experts
    calls = [0] * model.num_experts
    handles = []
    for e, expert in enumerate(model.experts):

        def hook(_module, args, _out, e=e) -> None:
            calls[e] += 1
            rows[e] += args[0].shape[0]

        handles.append(expert.register_forward_hook(hook))
    return calls, rows, handles


@pytest.mark.parametrize("top_k", [1, 2])
def test_task_routing_serves_one_task_with_its_experts(top_k, synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing="task", num_experts=6, top_k=top_k, seed=2)
    model.eval()
    batch = with_sequences(synthetic.train.batch(slice(0, 16)))
    chosen = {t: model.task_experts(t) for t in model.task_names}
    assert chosen["task_a"] != chosen["task_b"]  # this seed routes the tasks apart
    with torch.no_grad():
        full = model(batch)
        for t in model.task_names:
            calls, rows, handles = count_expert_calls(model)
            served = model(batch, tasks=[t])
            for h in handles:
                h.remove()
            assert set(served) == {t}
            assert torch.equal(served[t], full[t])
            assert [e for e in range(6) if calls[e]] == chosen[t]
            assert all(calls[e] == 1 and rows[e] == 16 for e in chosen[t])
            assert set(model.aux_losses()) == {t}
            assert {k for k in model.expert_usage() if "@" in k} == {f"grec@{t}"}
    # The gating of every example of a task picked the same experts, whatever the input.
    for gating in model.last_gating.values():
        assert (gating.expert_ids == gating.expert_ids[:1]).all()


def test_training_mode_calls_unpicked_experts_on_empty_groups(synthetic: MultiTaskData) -> None:
    """While autograd records, experts nobody picked run on zero rows (keeps the partition)."""
    model = grec(synthetic, routing="task", num_experts=6, seed=2)
    batch = synthetic.train.batch(slice(0, 16))
    calls, rows, handles = count_expert_calls(model)
    model(batch, tasks=["task_a"])
    for h in handles:
        h.remove()
    chosen = model.task_experts("task_a")
    assert calls == [1] * 6
    assert rows == [16 if e in chosen else 0 for e in range(6)]


@pytest.mark.parametrize("routing", ROUTINGS)
def test_tasks_argument_matches_full_forward(routing, synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing=routing, top_k=2)
    batch = synthetic.train.batch(slice(0, 16))
    full = model(batch)
    for t in model.task_names:
        assert torch.equal(model(batch, tasks=[t])[t], full[t])
    with pytest.raises(KeyError, match="unknown task"):
        model(batch, tasks=["nope"])


@pytest.mark.parametrize("routing", ROUTINGS)
def test_routed_units_and_usage(routing, synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing=routing, top_k=2)
    batch = synthetic.train.batch(slice(0, 10))
    model(batch)
    units = 10 * model.num_tokens if routing == "token" else 10
    usage = model.expert_usage()
    for t in model.task_names:
        assert model.last_gating[t].expert_ids.shape == (units, 2)
        assert float(usage[f"grec@{t}"].sum()) == units * 2
    torch.testing.assert_close(usage["grec"], usage["grec@task_a"] + usage["grec@task_b"])


def test_sentence_routing_follows_the_mean_token(synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing="sentence", top_k=1)
    batch = synthetic.train.batch(slice(0, 10))
    model(batch)
    context = model.context_tokens(batch)
    s = model.task_sentence(context, "task_a")
    normed = model.attn_norm(s)
    x = s + model.attention(normed, normed, normed, need_weights=False)[0]
    logits = model.router(model.moe_norm(x).mean(1))
    ids = model.last_gating["task_a"].expert_ids[:, 0]
    assert torch.equal(ids, logits.argmax(1))


def test_top1_weight_is_the_raw_probability(synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing="token", top_k=1, lb_coef=0.0, z_coef=0.0)
    assert model.renormalize is False
    assert grec(synthetic, top_k=2).renormalize is True
    batch = synthetic.train.batch(slice(0, 8))
    losses = task_losses(model, batch)
    gating = model.last_gating["task_a"]
    assert bool((gating.weights < 1).all())  # a probability, not the renormalised 1
    sum(losses.values()).backward()
    assert model.router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- capacity, jitter
@pytest.mark.parametrize("routing", ROUTINGS)
def test_capacity_and_jitter_off_reproduce_dropless(routing, synthetic: MultiTaskData) -> None:
    batch = synthetic.train.batch(slice(0, 16))
    dropless = grec(synthetic, routing=routing, top_k=2)(batch)
    roomy = grec(synthetic, routing=routing, top_k=2, capacity_factor=100.0)
    assert torch.equal(stacked(roomy(batch)), stacked(dropless))
    assert all(v == 0 for v in roomy.last_dropped.values())
    jitter = grec(synthetic, routing=routing, top_k=2, router_jitter=0.3)
    jitter.eval()  # jitter is a training-time perturbation
    assert torch.equal(stacked(jitter(batch)), stacked(dropless))
    jitter.train()
    torch.manual_seed(0)
    jittered = jitter(batch)
    assert not torch.equal(stacked(jittered), stacked(dropless))


def stacked(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([logits[t] for t in sorted(logits)])


@pytest.mark.parametrize("routing", ROUTINGS)
def test_tiny_capacity_drops_tokens(routing, synthetic: MultiTaskData) -> None:
    """With capacity 1 per expert, a dropped unit gets no expert output: its MoE layer is the
    identity, which a plain recomputation of the block confirms."""
    model = grec(synthetic, routing=routing, top_k=1, capacity_factor=1e-3)
    batch = synthetic.train.batch(slice(0, 12))
    out = model(batch)
    units = 12 * model.num_tokens if routing == "token" else 12
    picked = {t: int((model.last_gating[t].expert_counts > 0).sum()) for t in model.task_names}
    for t in model.task_names:
        assert model.last_dropped[t] == units - picked[t]  # one unit kept per picked expert
        assert model.last_dropped[t] > 0
    # Independent recomputation of task_a with the kept units only.
    t = "task_a"
    gating = model.last_gating[t]
    context = model.context_tokens(batch)
    s = model.task_sentence(context, t)
    normed = model.attn_norm(s)
    x = s + model.attention(normed, normed, normed, need_weights=False)[0]
    u = model.moe_norm(x)
    flat = u.reshape(-1, 8) if routing == "token" else u
    moe = torch.zeros_like(flat)
    for e in range(model.num_experts):
        mine = (gating.expert_ids[:, 0] == e).nonzero().flatten()
        if len(mine):
            first = int(mine[0])  # capacity 1: the first unit in batch order is kept
            moe[first] = gating.weights[first, 0] * model.experts[e](flat[first : first + 1])[0]
    moe = moe.reshape(u.shape)
    expected = model.towers[t](model.out_norm((x + moe).mean(1)))
    torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- auxiliary losses
def test_aux_losses_default_coefficients(synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing="token", top_k=2)
    assert (model.lb_coef, model.z_coef) == (1e-4, 1e-4)
    model(synthetic.train.batch(slice(0, 32)))
    aux = model.aux_losses()
    assert set(aux) == set(model.task_names)
    for t, gating in model.last_gating.items():
        assert torch.isfinite(aux[t])
        torch.testing.assert_close(aux[t], 1e-4 * gating.load_balancing_loss + 1e-4 * gating.z_loss)
    other = grec(synthetic, routing="token", top_k=2, lb_coef=0.5, z_coef=0.0)
    other(synthetic.train.batch(slice(0, 32)))
    for t, gating in other.last_gating.items():
        torch.testing.assert_close(other.aux_losses()[t], 0.5 * gating.load_balancing_loss)


def test_aux_losses_against_plain_torch(synthetic: MultiTaskData) -> None:
    model = grec(synthetic, routing="sentence", top_k=1, lb_coef=1.0, z_coef=1.0)
    batch = synthetic.train.batch(slice(0, 24))
    model(batch)
    context = model.context_tokens(batch)
    s = model.task_sentence(context, "task_b")
    normed = model.attn_norm(s)
    x = s + model.attention(normed, normed, normed, need_weights=False)[0]
    logits = model.router(model.moe_norm(x).mean(1))
    probs = torch.softmax(logits, 1)
    f = torch.bincount(probs.argmax(1), minlength=4).float() / 24
    lb = 4 * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, 1).pow(2).mean()
    torch.testing.assert_close(model.aux_losses()["task_b"], lb + z)


# --------------------------------------------------------------------------- expert load
def test_expert_load_entropy_and_task_shares(tmp_path) -> None:
    load = ExpertLoad()
    load.update(
        {"g": torch.tensor([1.0, 1.0, 2.0, 0.0]), "g@a": torch.tensor([3.0, 0.0, 0.0, 1.0])}
    )
    out = load.compute()
    shares = [0.25, 0.25, 0.5]
    assert out["experts/g/entropy"] == pytest.approx(-sum(s * math.log(s) for s in shares))
    assert out["experts/g@a/entropy"] == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    assert out["experts/g@a/dead"] == 2
    assert task_shares(out) == {"g": {"a": [0.75, 0.0, 0.0, 0.25]}}
    path = plot_expert_load(out, tmp_path / "experts.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="per-task"):
        plot_expert_load({"experts/g/share_0": 1.0}, tmp_path / "none.png")
