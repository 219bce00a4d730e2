"""The compiled (fused) Adam path gives the eager path's result (which is pinned against torch)."""

from __future__ import annotations

import pytest
import torch
from mtl_fixtures import TwoTower, batch

from pub_optim import PUB

pytestmark = pytest.mark.slow  # each flag combination compiles once (~10-20 s on 2 cores)

CONFIGS = {
    "adam-l2-amsgrad-maximize": lambda p: torch.optim.Adam(
        p, lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _record_kernel_shapes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, ...]]]:
    """Wrap both compiled kernels to record ``(K, n)`` of every call (K rows of n values)."""
    from pub_optim.transforms import fused as kernels

    calls: dict[str, list[tuple[int, ...]]] = {"adam_apply": [], "adam_gram": []}
    for kernel in calls:
        compiled = getattr(kernels, kernel)

        def recording(*args: object, _name: str = kernel, _fn: object = compiled) -> object:
            rows = args[0]
            assert isinstance(rows, list) and all(isinstance(r, torch.Tensor) for r in rows)
            assert len({r.shape for r in rows}) == 1 and rows[0].dim() == 1
            calls[_name].append((len(rows), rows[0].numel()))
            return _fn(*args)  # type: ignore[operator]

        monkeypatch.setattr(kernels, kernel, recording)
    return calls


def _step_both(models: tuple[TwoTower, TwoTower], opts: tuple[PUB, PUB], step: int) -> None:
    x, y = batch(step, 3)
    for model, opt in zip(models, opts, strict=True):
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        opt.step()


def _assert_same_training_state(models: tuple[TwoTower, TwoTower], opts: tuple[PUB, PUB]) -> None:
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for key, state in opts[0].optimizer.state_dict()["state"].items():
        other = opts[1].optimizer.state_dict()["state"][key]
        assert state.keys() == other.keys()
        for field, value in state.items():
            torch.testing.assert_close(other[field], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_kernel_shapes(monkeypatch)
    factory = CONFIGS[name]
    # width 160: the 160 x 160 trunk weight is above FUSED_MIN_TENSOR, its biases are below.
    models = (TwoTower(3, width=160), TwoTower(3, width=160))
    eager = PUB(factory(list(models[0].parameters())), "pareto", fused=False)
    fused = PUB(factory(list(models[1].parameters())), "pareto", fused=True)
    for step in range(6):
        _step_both(models, (eager, fused), step)
        assert fused._engine is not None and not fused._engine.fused_failed
        assert eager.last_stats is not None and fused.last_stats is not None
        # (The Gram matrices differ by ~1e-5 relative: the eager pass's float32 matrix product is
        # the less accurate of the two; test_fused_gram_against_torch_in_float64 pins the kernel.)
        torch.testing.assert_close(fused.weights, eager.weights, rtol=1e-5, atol=1e-7)
    # Both kernels ran every step: on the large trunk weight, and once on the three small shared
    # tensors concatenated (160 x 5 weight and two biases of 160).
    for shapes in calls.values():
        assert sorted(shapes) == sorted([(3, 160 * 160), (3, 160 * 5 + 2 * 160)] * 6)
    _assert_same_training_state(models, (eager, fused))


@pytest.mark.parametrize(
    ("solve_every", "between_solves"),
    [(1, "weighted_gradient"), (3, "reuse_weights"), (3, "weighted_gradient")],
)
def test_kept_task_gradients_match_the_buffers_through_clipping_and_accumulation(
    solve_every: int, between_solves: str
) -> None:
    """The compiled path keeps autograd's per-task gradients instead of copying them into
    ``[K, *shape]`` buffers. Every way they can change between backward and step gives exactly
    (bit for bit) what the same kernels give on buffers: norm and value clipping (carried over by
    replacing the kept tensors), a second ``backward`` before the step (stacked into buffers,
    then accumulated), and a shared parameter that some tasks do not reach (zeros); also with
    ``solve_every`` (weights reused between solves, or the weighted backward). The buffers are
    forced by a ``gradient_sync`` hook that does nothing (a hook gets the buffers)."""
    models = (TwoTower(3, width=160), TwoTower(3, width=160))

    def make(model: TwoTower, **kwargs: object) -> PUB:
        return PUB(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            # head 0 is reached by task 0 only
            shared_params=[*model.trunk.parameters(), *model.heads[0].parameters()],
            fused=True,
            solve_every=solve_every,
            between_solves=between_solves,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )

    buffered = make(models[0], gradient_sync=lambda view: None)
    kept = make(models[1])
    weighted_steps = 0
    for step in range(6):
        for model, opt in zip(models, (buffered, kept), strict=True):
            opt.zero_grad()
            x, y = batch(step, 3)
            opt.backward(model.losses(x, y))
            if opt._grads.pending == "weighted":  # between solves: no per-task gradients at all
                assert opt._grads.rows is None
                weighted_steps += opt is kept
            elif opt is kept:
                assert opt._grads.rows is not None and opt._grads.rows[4][1] is None
            else:
                assert opt._grads.rows is None
            if step % 3 == 1:  # accumulate a second batch
                x, y = batch(100 + step, 3)
                opt.backward(model.losses(x, y))
                assert opt._grads.rows is None
            if step % 2 == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if step == 3:
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            opt.step()
            assert opt._engine is not None and not opt._engine.fused_failed
        assert torch.equal(kept.weights, buffered.weights)  # type: ignore[arg-type]
    assert weighted_steps == (4 if (solve_every, between_solves) == (3, "weighted_gradient") else 0)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    for key, state in buffered.optimizer.state_dict()["state"].items():
        other = kept.optimizer.state_dict()["state"][key]
        assert all(torch.equal(other[name], value) for name, value in state.items())


def test_fused_batches_small_tensors_per_param_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors share a kernel call only with tensors of the same hyper-parameters: two
    param groups with different lr and betas give two batches, and the result equals the eager
    path's, parameters and state."""
    calls = _record_kernel_shapes(monkeypatch)

    def optimizer(model: TwoTower) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            [
                {"params": model.trunk[0].parameters(), "lr": 1e-2},
                {"params": model.trunk[2].parameters(), "lr": 5e-3, "betas": (0.8, 0.99)},
                {"params": model.heads.parameters()},
            ],
            lr=2e-3,
        )

    models = (TwoTower(3, width=160), TwoTower(3, width=160))
    eager = PUB(optimizer(models[0]), "pareto", fused=False)
    fused = PUB(optimizer(models[1]), "pareto", fused=True)
    for step in range(4):
        _step_both(models, (eager, fused), step)
    assert fused._engine is not None and not fused._engine.fused_failed
    # per step: the 160 x 160 weight alone, trunk[0]'s weight and bias together, trunk[2]'s bias
    for shapes in calls.values():
        assert sorted(shapes) == sorted([(3, 160 * 160), (3, 160 * 5 + 160), (3, 160)] * 4)
    _assert_same_training_state(models, (eager, fused))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_gram_against_torch_in_float64(name: str) -> None:
    """The Gram kernel's ``<d_i, d_j>`` against updates that torch's own optimizer takes, in
    float64, from the same state (an independent reference); the eager float32 pass for scale."""
    from pub_optim.transforms import AdamTransform
    from pub_optim.transforms import fused as kernels

    torch.manual_seed(0)
    k, n = 3, 40_000
    param = torch.nn.Parameter(torch.randn(n))
    optimizer = CONFIGS[name]([param])
    for _ in range(3):  # a state that is not the initial one
        param.grad = torch.randn(n)
        optimizer.step()
    grads = torch.randn(k, n) * torch.linspace(0.1, 3.0, k)[:, None]
    transform = AdamTransform(optimizer)
    group = optimizer.param_groups[0]
    packed = kernels.adam_gram(grads, transform.fused_operands(transform.begin(param, group)))
    fused = kernels.unpack_gram(packed, k)

    updates = []
    for g in grads:
        twin = torch.nn.Parameter(param.detach().double().clone())
        twin_opt = CONFIGS[name]([twin])
        # (a copy of every tensor: the twin's step must not advance the original's ``step``)
        state = {key: value.double() if value.is_floating_point() and value.dim() else value.clone()
                 for key, value in optimizer.state[param].items()}  # fmt: skip
        twin_opt.load_state_dict(
            {"state": {0: state}, "param_groups": optimizer.state_dict()["param_groups"]}
        )
        before = twin.detach().clone()
        twin.grad = g.double()
        twin_opt.step()
        decay = (
            1.0 - group["lr"] * group["weight_decay"]
            if isinstance(optimizer, torch.optim.AdamW)
            else 1.0
        )
        updates.append(twin.detach() - decay * before)  # d_k: decoupled decay applies once
    d = torch.stack(updates)
    reference = d @ d.T
    error = ((fused - reference).abs().max() / reference.abs().max()).item()
    # float32 updates (rounding ~1e-7 relative each), products and sums in float64
    assert error <= 1e-6, f"fused Gram relative error {error:.1e}"
    assert torch.equal(fused, fused.T) and fused.dtype == torch.float64


def test_each_specialisation_compiles_once_in_its_own_budget() -> None:
    """Several K and flag sets in one process do not exhaust dynamo's recompile limit (past it
    dynamo would silently run the kernel eagerly): with the limit at 1 and failing loudly, every
    specialisation still compiles, and each result matches a float64 eager reference."""
    from pub_optim.transforms import AdamTransform
    from pub_optim.transforms import fused as kernels

    # config.patch, not monkeypatch: monkeypatch's undo deletes the entry from dynamo's config
    # module, and every later compile in the session then fails ("recompile_limit does not exist")
    # and falls back to the eager path.
    torch.manual_seed(1)
    n = 2_000
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for k, amsgrad in ((2, False), (3, False), (2, True)):
            param = torch.nn.Parameter(torch.randn(n))
            optimizer = torch.optim.Adam([param], lr=1e-2, amsgrad=amsgrad)
            param.grad = torch.randn(n)
            optimizer.step()
            transform = AdamTransform(optimizer)
            ctx = transform.begin(param, optimizer.param_groups[0])
            grads = torch.randn(k, n)
            with torch.no_grad():  # as PUB.step calls it
                for _ in range(2):  # the second call reuses the compiled kernel
                    packed = kernels.adam_gram(grads, transform.fused_operands(ctx))
            gram = kernels.unpack_gram(packed, k)
            d = torch.empty(k, n, dtype=torch.float64)
            double = AdamTransform(optimizer)
            ctx64 = double.begin(param, optimizer.param_groups[0])
            ctx64.flat = {name: t.double() for name, t in ctx64.flat.items()}
            double.lookahead(ctx64, 0, n, grads.double(), d)
            torch.testing.assert_close(gram, d @ d.T, rtol=1e-6, atol=0.0)
    assert torch._dynamo.config.recompile_limit == 8  # the session's setting is back


def test_auto_mode_stays_eager_for_small_models() -> None:
    model = TwoTower(2)
    opt = PUB(torch.optim.Adam(model.parameters()), "pareto")
    assert opt.fused is None
    x, y = batch(0)
    opt.backward(model.losses(x, y))
    assert opt._engine is not None and not opt._engine.fused_enabled(opt.shared_params, 2)
    assert opt._grads.rows is None  # the eager path: the per-task buffers


@pytest.mark.parametrize("failing", [("adam_gram", "adam_apply"), ("adam_gram",)])
def test_compile_failure_falls_back_to_the_exact_eager_path(
    failing: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compiler: the first kernel to fail switches the step (and later ones) to eager."""
    from pub_optim.transforms import fused as kernels

    def broken(*args: object) -> None:
        raise RuntimeError("no C++ compiler")

    for name in failing:
        monkeypatch.setattr(kernels, name, broken)
    reference, model = TwoTower(2, width=160), TwoTower(2, width=160)
    eager = PUB(torch.optim.Adam(reference.parameters(), lr=1e-2), fused=False)
    opt = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), fused=True)
    x, y = batch(0)
    eager.backward(reference.losses(x, y))
    eager.step()
    opt.backward(model.losses(x, y))
    with pytest.warns(RuntimeWarning, match="using the eager path"):
        opt.step()
    assert opt._engine is not None and opt._engine.fused_failed
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
