"""The compiled per-task Adam kernels (``PUB(state="per_task", fused=...)``) give the eager
per-task path's result, which ``test_state_and_space.py`` pins against torch's own optimizers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mtl_fixtures import TwoTower, batch
from torch import Tensor

from pub_optim import PUB
from pub_optim.exact_step import FUSED_AUTO_MIN_VALUES, ExactStepEngine, TaskGrads
from pub_optim.strategies import Pareto
from pub_optim.transforms import AdamTransform
from pub_optim.transforms import fused as kernels
from pub_optim.transforms.fused import PerTaskItem

pytestmark = pytest.mark.slow  # each flag combination compiles once (~10-20 s on 2 cores)

Factory = Callable[[list[Tensor]], torch.optim.Optimizer]
CONFIGS: dict[str, Factory] = {
    "adam-l2-amsgrad-maximize": lambda p: torch.optim.Adam(
        p, lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}
#: One large tensor (a kernel call of its own) and two small ones (concatenated into one call).
SIZES = (40_000, 100, 300)


def _problem(
    factory: Factory, dtype: torch.dtype, k: int
) -> tuple[list[Tensor], torch.optim.Optimizer, list[dict[Tensor, dict[str, Any]]], list[Tensor]]:
    """Parameters, their optimizer, K per-task stores (each from three steps of torch's optimizer
    on its own gradients: different states, equal step counts) and ``[K, n]`` gradients, task 1's
    zero. Deterministic: two calls build equal copies."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=dtype)) for n in SIZES]
    optimizer = factory(params)
    stores: list[dict[Tensor, dict[str, Any]]] = []
    for _ in range(k):
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin_opt = factory(twins)
        for _ in range(3):
            for twin in twins:
                twin.grad = torch.randn(twin.shape, generator=gen, dtype=dtype)
            twin_opt.step()
        stores.append(
            {p: copy.deepcopy(twin_opt.state[t]) for p, t in zip(params, twins, strict=True)}
        )
    scales = torch.linspace(0.1, 3.0, k, dtype=dtype)[:, None]
    grads = [torch.randn(k, n, generator=gen, dtype=dtype) * scales for n in SIZES]
    for g in grads:
        g[1] = 0.0
    return params, optimizer, stores, grads


def _engine(optimizer: torch.optim.Optimizer, fused: bool, space: str = "marginal") -> Any:
    return ExactStepEngine(
        AdamTransform(optimizer),
        space,  # type: ignore[arg-type]
        None,
        fused,
        per_task=True,
        diagnostics=True,
    )


def _contexts(engine: Any, params: list[Tensor], stores: list[Any]) -> list[list[Any]]:
    group = engine.transform.optimizer.param_groups[0]
    return [[engine.transform.begin(p, group, store) for store in stores] for p in params]


def _double(
    params: list[Tensor], stores: list[dict[Tensor, dict[str, Any]]], grads: list[Tensor]
) -> tuple[list[Tensor], list[dict[Tensor, dict[str, Any]]], list[Tensor]]:
    """A float64 copy of a problem (step counters kept as they are)."""
    twins = [torch.nn.Parameter(p.detach().double()) for p in params]
    cast = [
        {
            twin: {
                key: value.double() if key != "step" else value.clone()
                for key, value in store[p].items()
            }
            for p, twin in zip(params, twins, strict=True)
        }
        for store in stores
    ]
    return twins, cast, [g.double() for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_task_gram_kernel_matches_the_eager_pass(name: str, dtype: torch.dtype) -> None:
    """Look-ahead and marginal Gram matrices, ``<d_k, d0_k>`` and ``||d0_k||^2``, each task from
    its own state, against the eager blocks run in float64 (float32 problems: on a float64 copy,
    the more accurate reference); the zero-gradient task's marginal row is exactly zero."""
    k = 3
    params, optimizer, stores, grads = _problem(CONFIGS[name], dtype, k)
    reference = _double(params, stores, grads)
    ref_opt = CONFIGS[name](reference[0])
    eager, fused = _engine(ref_opt, False), _engine(optimizer, True)
    with torch.no_grad():
        expected = eager.gram(
            _contexts(eager, reference[0], reference[1]), TaskGrads(reference[2]), k
        )
        contexts = _contexts(fused, params, stores)
        items = fused.fused_items(contexts, TaskGrads(grads))
        assert items is not None and all(isinstance(item, PerTaskItem) for item in items)
        assert sorted(item.indices for item in items) == [[0], [1, 2]]
        got = fused.gram(contexts, TaskGrads(grads), k, items)
    assert not fused.fused_failed
    # float32 updates (rounding ~1e-7 relative each), products and sums in float64
    bound = 1e-6 if dtype == torch.float32 else 1e-13
    for field in ("lookahead", "marginal", "gradient", "drift_dots", "drift_sq"):
        value, ref = getattr(got, field), getattr(expected, field)
        assert value.dtype == torch.float64 and value.shape == ref.shape
        error = ((value - ref).abs().max() / ref.abs().max()).item()
        assert error <= bound, f"{field}: relative error {error:.1e}"
    assert got.marginal is not None and torch.all(got.marginal[1] == 0.0)
    assert torch.all(got.marginal[:, 1] == 0.0) and torch.equal(got.marginal, got.marginal.T)
    assert got.drift_sq is not None and torch.all(got.drift_sq > 0)
    # the drift is each task's own: tasks whose states differ have different ||d0_k||^2
    assert len(set(got.drift_sq.tolist())) == k


def _assert_normwise_close(value: Tensor, ref: Tensor, bound: float, what: str) -> None:
    assert value.shape == ref.shape, what
    error = ((value.double() - ref).abs().max() / ref.abs().max()).item()
    assert error <= bound, f"{what}: relative error {error:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_task_apply_kernel_matches_the_eager_pass(name: str, dtype: torch.dtype) -> None:
    """``theta += sum_k alpha_k d_k`` (decoupled decay once), every task's moments advanced with
    its own gradient (L2 read from theta before it moves), every step counter +1; against the
    eager pass in float64 (float32 problems: on a float64 copy)."""
    k = 3
    weights = torch.tensor([0.5, 0.2, 0.45], dtype=torch.float64)
    params, optimizer, stores, grads = _problem(CONFIGS[name], dtype, k)
    ref_params, ref_stores, ref_grads = _double(params, stores, grads)
    for fused, (ps, ss, gs) in ((False, (ref_params, ref_stores, ref_grads)),
                                (True, (params, stores, grads))):  # fmt: skip
        engine = _engine(optimizer if fused else CONFIGS[name](ps), fused)
        with torch.no_grad():
            contexts = _contexts(engine, ps, ss)
            items = engine.fused_items(contexts, TaskGrads(gs)) if fused else None
            assert (items is not None) == fused
            engine.apply(contexts, TaskGrads(gs), weights, items)
        assert not engine.fused_failed
    bound = 1e-6 if dtype == torch.float32 else 1e-13
    for i, (p, ref) in enumerate(zip(params, ref_params, strict=True)):
        _assert_normwise_close(p.detach(), ref.detach(), bound, f"parameter {i}")
    for store, ref_store in zip(stores, ref_stores, strict=True):
        for i, (p, ref) in enumerate(zip(params, ref_params, strict=True)):
            assert store[p].keys() == ref_store[ref].keys()
            for key, value in ref_store[ref].items():
                if key == "step":
                    assert store[p][key].item() == value.item() == 4.0
                else:
                    _assert_normwise_close(store[p][key], value, bound, f"{key} of {i}")


# ------------------------------------------------------------------------------ end to end
def _record_kernel_shapes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, int]]]:
    """Wrap the per-task kernels to record ``(K, n)`` of every call."""
    calls: dict[str, list[tuple[int, int]]] = {"per_task_apply": [], "per_task_gram": []}
    for kernel in calls:
        compiled = getattr(kernels, kernel)

        def recording(*args: Any, _name: str = kernel, _fn: Any = compiled, **kw: Any) -> Any:
            rows = args[0]
            calls[_name].append((len(rows), rows[0].numel()))
            return _fn(*args, **kw)

        monkeypatch.setattr(kernels, kernel, recording)
    return calls


def _train(
    factory: Factory, fused: bool, steps: int, space: str = "update", **kwargs: Any
) -> tuple[TwoTower, PUB, list[Any]]:
    model = TwoTower(3, width=160)  # the 160 x 160 weight above FUSED_MIN_TENSOR, the rest below
    pub = PUB(
        factory(list(model.parameters())),
        state="per_task",
        space=space,  # type: ignore[arg-type]
        fused=fused,
        **kwargs,
    )
    history = []
    for step in range(steps):
        x, y = batch(step, 3)
        pub.zero_grad()
        pub.backward(model.losses(x, y))
        assert pub._engine is not None
        assert pub._engine.fused_enabled(pub.shared_params, 3) == fused
        pub.step()
        assert pub._engine is not None and not pub._engine.fused_failed
        assert pub.weights is not None
        history.append((pub.weights.clone(), pub.last_stats))
    return model, pub, history


def _assert_same(a: tuple[TwoTower, PUB, list[Any]], b: tuple[TwoTower, PUB, list[Any]]) -> None:
    scale = 1.0
    for (w_a, _), (w_b, _) in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(w_b, w_a, rtol=1e-5, atol=1e-7)
        scale = max(scale, w_a.abs().sum().item())
    # The weights differ in the last digits (the eager pass's float32 Gram products): the
    # parameters by as much times the size of the step, which grows with the weights' sum (1
    # when normalised).
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6 * scale)
    for key, state in a[1].optimizer.state_dict()["state"].items():  # the heads' own state
        other = b[1].optimizer.state_dict()["state"][key]
        for field, value in state.items():
            torch.testing.assert_close(other[field], value, rtol=1e-5, atol=1e-6)
    assert a[1]._task_states is not None and b[1]._task_states is not None
    saved_a, saved_b = a[1]._task_states.state_dict(), b[1]._task_states.state_dict()
    assert len(saved_a) == len(saved_b) == 3
    for task_a, task_b in zip(saved_a, saved_b, strict=True):
        assert task_a.keys() == task_b.keys() and task_a
        for index, state in task_a.items():
            assert state.keys() == task_b[index].keys()
            for field, value in state.items():
                torch.testing.assert_close(task_b[index][field], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_task_fused_training_matches_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    eager = _train(CONFIGS[name], False, 5)
    calls = _record_kernel_shapes(monkeypatch)
    fused = _train(CONFIGS[name], True, 5)
    # Both kernels ran every step: the trunk weight alone, the three small tensors together.
    for shapes in calls.values():
        assert sorted(shapes) == sorted([(3, 160 * 160), (3, 160 * 5 + 2 * 160)] * 5)
    _assert_same(eager, fused)


def test_per_task_fused_with_reused_weights_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """``solve_every=3, between_solves="reuse_weights"``: the Gram kernel runs on solve steps
    only, the apply kernel every step."""
    kwargs: dict[str, Any] = {"solve_every": 3, "between_solves": "reuse_weights"}
    eager = _train(CONFIGS["adamw"], False, 5, **kwargs)
    calls = _record_kernel_shapes(monkeypatch)
    fused = _train(CONFIGS["adamw"], True, 5, **kwargs)
    assert len(calls["per_task_gram"]) == 2 * 2 and len(calls["per_task_apply"]) == 2 * 5
    assert [stats.solved for _, stats in fused[2]] == [True, False, False, True, False]
    _assert_same(eager, fused)


@pytest.mark.parametrize("strategy", ["pareto", "pareto-unnormalised"])
def test_per_task_fused_marginal_space_matches_eager(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marginal space with diagnostics: the strategy's matrix and every diagnostic as the eager
    pass gives them. Unnormalised weights add the drift term, which the eager apply pass takes
    (the Gram kernel still runs)."""
    balancer: Any = "pareto" if strategy == "pareto" else Pareto(normalization="none")
    factory = CONFIGS["adamw"]
    eager = _train(factory, False, 4, "marginal", strategy=copy.deepcopy(balancer),
                   diagnostics=True)  # fmt: skip
    calls = _record_kernel_shapes(monkeypatch)
    fused = _train(factory, True, 4, "marginal", strategy=balancer, diagnostics=True)
    assert len(calls["per_task_gram"]) == 2 * 4
    assert len(calls["per_task_apply"]) == (2 * 4 if strategy == "pareto" else 0)
    _assert_same(eager, fused)
    # (unnormalised: weights summing to ~7 move the parameters apart faster, see _assert_same;
    # a drift cosine near 0 then differs by ~2e-6)
    atol = 1e-7 if strategy == "pareto" else 1e-5
    for (_, s_eager), (_, s_fused) in zip(eager[2], fused[2], strict=True):
        d_eager, d_fused = s_eager.diagnostics, s_fused.diagnostics
        assert d_eager is not None and d_fused is not None
        for field in ("drift_cosine", "attributable", "gradient_norms", "marginal_norms"):
            torch.testing.assert_close(
                getattr(d_fused, field), getattr(d_eager, field), rtol=1e-4, atol=atol
            )


def test_identical_tasks_equal_torch_adam_with_the_per_task_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """K copies of one loss: every task's state and the parameters follow plain torch Adam."""
    calls = _record_kernel_shapes(monkeypatch)
    reference, model = TwoTower(1, width=160), TwoTower(1, width=160)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        state="per_task",
        fused=True,
        shared_params=list(model.parameters()),
    )
    for step in range(6):
        x, y = batch(step, 1)
        ref_opt.zero_grad()
        reference.losses(x, y)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(x, y)[0]
        pub.backward([loss * 1.0 for _ in range(3)])
        pub.step()
        assert pub.weights is not None
        torch.testing.assert_close(pub.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert len(calls["per_task_apply"]) == 6 * 2 and len(calls["per_task_gram"]) == 6 * 2
    for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    assert pub._task_states is not None
    for store in pub._task_states.stores:
        for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
            for field, value in ref_opt.state[p_ref].items():
                torch.testing.assert_close(store[p][field], value, rtol=1e-5, atol=1e-6)


def test_unequal_step_counts_take_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task states with different step counts (a checkpoint assembled from several runs) have
    different bias corrections: no kernel call, and the eager per-task result."""
    calls = _record_kernel_shapes(monkeypatch)
    runs = []
    for fused in (False, True):
        model = TwoTower(3, width=160)
        pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), state="per_task", fused=fused)
        for step in range(3):
            if step == 2:
                assert pub._task_states is not None
                for state in pub._task_states.stores[1].values():
                    state["step"] += 5
                before = len(calls["per_task_gram"])
            x, y = batch(step, 3)
            pub.zero_grad()
            pub.backward(model.losses(x, y))
            pub.step()
        runs.append((model, pub, []))
        assert pub._engine is not None and not pub._engine.fused_failed
    assert len(calls["per_task_gram"]) == before == 2 * 2  # the third step made none
    _assert_same(runs[0], runs[1])


def test_a_failing_per_task_kernel_falls_back_to_the_eager_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "per_task_gram", broken)
    monkeypatch.setattr(kernels, "per_task_apply", broken)
    reference, model = TwoTower(2, width=160), TwoTower(2, width=160)
    eager = PUB(torch.optim.Adam(reference.parameters(), lr=1e-2), state="per_task", fused=False)
    opt = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), state="per_task", fused=True)
    for step in range(2):
        x, y = batch(step)
        eager.zero_grad()
        eager.backward(reference.losses(x, y))
        eager.step()
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        if step == 0:
            with pytest.warns(RuntimeWarning, match="using the eager path"):
                opt.step()
        else:
            opt.step()
    assert opt._engine is not None and opt._engine.fused_failed
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_auto_mode_turns_the_per_task_kernels_on_from_the_threshold() -> None:
    """``fused=None``: as with the shared state, on for CPU Adam once K x P reaches 2**20."""
    model = TwoTower(2)
    opt = PUB(torch.optim.Adam(model.parameters()), state="per_task")
    x, y = batch(0)
    opt.backward(model.losses(x, y))
    engine = opt._engine
    assert engine is not None and not engine.fused_enabled(opt.shared_params, 2)
    big = [torch.empty(FUSED_AUTO_MIN_VALUES // 2)]
    assert engine.fused_enabled(big, 2) and not engine.fused_enabled(big, 1)
    opt.fused = False
    assert not engine.fused_enabled(big, 2)


@pytest.mark.parametrize("drift", [False, True])
def test_per_task_kernels_allocate_nothing_of_the_parameters_size(
    drift: bool, tmp_path: Path
) -> None:
    """The per-task Gram kernel keeps ``d_k`` and ``d0_k`` in registers (Inductor's recompute
    options: without them it materialises 2K rows of n with the drift, 8 copies at K = 4), and
    the apply kernel is one elementwise loop: neither allocates more than its small result."""
    from test_wrapper_memory import peak_bytes

    k, n = 4, 1 << 18
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(n, generator=gen)
    operands = [
        kernels.AdamOperands(
            m=torch.randn(n, generator=gen),
            v=torch.rand(n, generator=gen),
            vmax=None,
            theta=theta,
            coef_m=-0.009,
            coef_g=-0.001,
            beta2=0.999,
            one_minus_beta2=0.001,
            eps_c=1e-8,
            l2=0.0,
            maximize=False,
            one_minus_beta1=0.1,
            decay=1.0,
        )
        for _ in range(k)
    ]
    grads = [torch.randn(n, generator=gen) for _ in range(k)]
    alpha = torch.full((k,), 0.25)

    def gram() -> None:
        kernels.per_task_gram(grads, operands, lookahead=True, drift=drift)

    def apply() -> None:
        kernels.per_task_apply(grads, alpha, operands)

    with torch.no_grad():
        for run in (gram, apply):
            run()  # compile outside the measure
            peak = peak_bytes(run, tmp_path)
            assert peak < 0.01 * n * theta.element_size(), (run.__name__, peak)
