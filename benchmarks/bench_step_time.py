"""Step time and peak memory of the PUB core on a multi-task MLP (issue 2).

Every method trains its own copy of the same model (same initial weights, same batch, Adam lr 1e-3)
and all of them are timed in one process, interleaved: for each K, every round runs every method
for a few steps, in a fresh random order, so that the noise of a shared machine hits all methods
alike. Reported per method: the median over rounds of the mean time per training iteration
(``zero_grad`` + forward + backward + step), its interquartile range, and the medians over rounds
of the paired ratios to the floor and to the plain step measured in the same round.

Methods:

* ``plain``: ``opt.zero_grad(); sum(losses).backward(); opt.step()``.
* ``floor``: what PUB cannot avoid: K per-task ``torch.autograd.grad`` calls (shared + own
  parameters; the returned tensors are kept, not copied), the sum of the K shared gradients, one
  plain Adam step.
* ``floor-vmap`` (for information, not a target): the same per-task gradients from the heads'
  K small backward passes plus ONE batched VJP through the trunk
  (``autograd.grad(features, shared, grad_outputs=[K, B, F], is_grads_batched=True)``), which is
  how TorchJD's ``mtl_backward`` gets its Jacobian.
* ``pub-<strategy>``: ``PUB(Adam, strategy, space="update")`` (pareto, min-norm,
  equal-magnitude, equal) and ``pub-pareto-se10-wg`` / ``-rw`` (``solve_every=10`` with
  ``between_solves="weighted_gradient"`` / ``"reuse_weights"``, timed over whole 10-step cycles).
* ``grad-<strategy>``: ``space="gradient"``: Nash-MTL (pareto), MGDA (min-norm), IMTL-G
  (equal-magnitude).
* ``torchjd-upgrad`` / ``torchjd-mgda``: TorchJD's multi-task API
  (``mtl_backward(losses, features=...)`` then ``jac_to_grad(shared, aggregator)``), then the same
  Adam step.

Also measured: a breakdown of one PUB (pareto) step by monkeypatching the wrapper's internal
methods in this process only, and the peak memory of each method (CPU: allocator events of
``torch.profiler(profile_memory=True)``; CUDA: ``torch.cuda.max_memory_allocated``). On CUDA the
PUB steps are also run under ``torch.cuda.set_sync_debug_mode("error")``.

Usage::

    .venv/bin/python benchmarks/bench_step_time.py              # full run, writes docs/results/
    .venv/bin/python benchmarks/bench_step_time.py --quick --out /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import inspect
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.memory import peak_bytes  # noqa: E402
from pub_optim import PUB  # noqa: E402

StepFn = Callable[[], None]


class Built(NamedTuple):
    """A method ready to run on one problem."""

    step: StepFn  # one training iteration
    optimizer: Any
    timer: PhaseTimer | None = None  # set on the instrumented PUB method


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class Config:
    trunk: tuple[int, ...]
    head_hidden: int
    batch: int
    ks: tuple[int, ...]
    repeats: int
    steps: int
    warmup: int
    memory_steps: int
    threads: int
    seed: int = 0


FULL = Config(
    trunk=(256, 1024, 512, 384),
    head_hidden=64,
    batch=512,
    ks=(2, 4, 8),
    repeats=20,  # rounds; a solve_every=10 cycle spans 10 of them
    steps=1,
    warmup=3,
    memory_steps=2,
    threads=2,
)
QUICK = Config(
    trunk=(16, 32, 16),
    head_hidden=8,
    batch=16,
    ks=(2, 3),
    repeats=10,
    steps=1,
    warmup=1,
    memory_steps=2,
    threads=1,  # tiny ops: a second thread only adds scheduling noise
)

#: Targets of issue 2: PUB step time over the floor, per K (K without a target: reported only).
FLOOR_TARGETS = {2: 1.15, 8: 1.30}
PUB_STRATEGIES = ("pareto", "min-norm", "equal-magnitude", "equal")
GRAD_STRATEGIES = {"pareto": "Nash-MTL", "min-norm": "MGDA", "equal-magnitude": "IMTL-G"}


# ------------------------------------------------------------------------------------- model
class MultiTaskMLP(nn.Module):
    """A shared MLP trunk (ReLU after every layer) and one small tower per task."""

    def __init__(self, trunk: Sequence[int], head_hidden: int, num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(trunk):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(trunk[-1], head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
            for _ in range(num_tasks)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features).squeeze(-1) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


def task_losses(logits: list[Tensor], targets: Tensor) -> list[Tensor]:
    return [
        nn.functional.binary_cross_entropy_with_logits(z, targets[:, k])
        for k, z in enumerate(logits)
    ]


@dataclass
class Problem:
    """One K: the initial model and the batch every method trains on."""

    k: int
    model: MultiTaskMLP
    x: Tensor
    y: Tensor

    @property
    def shared_numel(self) -> int:
        return sum(p.numel() for p in self.model.shared_parameters())


def make_problem(cfg: Config, k: int, device: torch.device) -> Problem:
    torch.manual_seed(cfg.seed)
    model = MultiTaskMLP(cfg.trunk, cfg.head_hidden, k).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, cfg.trunk[0], generator=gen).to(device)
    y = torch.randint(0, 2, (cfg.batch, k), generator=gen).float().to(device)
    return Problem(k, model, x, y)


# ----------------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    description: str
    build: Callable[[Problem], Built]
    period: int = 1  # time whole cycles of this many steps (solve_every)
    pub_kwargs: dict[str, Any] | None = None  # set for the PUB variants
    hidden: bool = False  # timed with the others but left out of the tables (instrumentation)

    @property
    def is_pub(self) -> bool:
        return self.pub_kwargs is not None


def _adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def build_plain(problem: Problem) -> Built:
    model = copy.deepcopy(problem.model)
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, logits = model(problem.x)
        sum(task_losses(logits, problem.y)).backward()  # type: ignore[union-attr]
        opt.step()

    return Built(step, opt)


def build_floor(problem: Problem) -> Built:
    model = copy.deepcopy(problem.model)
    opt = _adam(model)
    shared = model.shared_parameters()
    own = [list(head.parameters()) for head in model.heads]
    n = len(shared)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, logits = model(problem.x)
        losses = task_losses(logits, problem.y)
        kept: list[tuple[Tensor, ...]] = []
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, shared + own[k], retain_graph=k < len(losses) - 1)
            kept.append(grads[:n])  # the K per-task gradients stay alive, as PUB needs them
            for p, g in zip(own[k], grads[n:], strict=True):
                p.grad = g
        for i, p in enumerate(shared):
            total = kept[0][i].clone() if len(kept) == 1 else kept[0][i] + kept[1][i]
            for grads in kept[2:]:
                total.add_(grads[i])
            p.grad = total
        opt.step()

    return Built(step, opt)


def build_floor_vmap(problem: Problem) -> Built:
    model = copy.deepcopy(problem.model)
    opt = _adam(model)
    shared = model.shared_parameters()
    own = [list(head.parameters()) for head in model.heads]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        features, logits = model(problem.x)
        losses = task_losses(logits, problem.y)
        feature_grads = []
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, [features, *own[k]], retain_graph=True)
            feature_grads.append(grads[0])
            for p, g in zip(own[k], grads[1:], strict=True):
                p.grad = g
        per_task = torch.autograd.grad(
            features, shared, grad_outputs=torch.stack(feature_grads), is_grads_batched=True
        )  # each [K, *p.shape]: the layout of PUB's per-task buffers
        for p, g in zip(shared, per_task, strict=True):
            p.grad = g.sum(0)
        opt.step()

    return Built(step, opt)


def make_pub_builder(instrument: bool = False, **kwargs: Any) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        model = copy.deepcopy(problem.model)
        opt = PUB(_adam(model), **kwargs)
        if not instrument:

            def step() -> None:
                opt.zero_grad()
                _, logits = model(problem.x)
                opt.backward(task_losses(logits, problem.y))
                opt.step()

            return Built(step, opt)

        timer = PhaseTimer(problem.x.device)
        instrument_pub(opt, timer)

        def timed_step() -> None:
            timer.start_sample()
            with timer.phase("iteration"):
                with timer.phase("zero_grad"):
                    opt.zero_grad()
                with timer.phase("forward"):
                    _, logits = model(problem.x)
                    losses = task_losses(logits, problem.y)
                with timer.phase("backward"), timer.patch(torch.autograd, "grad"):
                    opt.backward(losses)
                with timer.phase("step"):
                    opt.step()
            timer.end_sample()

        return Built(timed_step, opt, timer)

    return build


def make_torchjd_builder(aggregator_name: str) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        from torchjd.aggregation import MGDA, UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = UPGrad() if aggregator_name == "upgrad" else MGDA()
        model = copy.deepcopy(problem.model)
        opt = _adam(model)
        shared = model.shared_parameters()
        own = [list(head.parameters()) for head in model.heads]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            features, logits = model(problem.x)
            losses = task_losses(logits, problem.y)
            # Parameters passed explicitly: TorchJD's best case (no graph discovery per step).
            mtl_backward(losses, features=features, tasks_params=own, shared_params=shared)
            jac_to_grad(shared, aggregator)
            opt.step()

        return Built(step, opt)

    return build


def all_methods(include_torchjd: bool = True, device_type: str = "cpu") -> list[Method]:
    """The methods, in table order. The breakdown instruments ``pub-pareto`` and
    ``pub-pareto-eager`` themselves on CPU (the wrappers cost well under 1 ms per step, see the
    report); on CUDA they synchronise, so a hidden instrumented copy of ``pub-pareto`` runs
    instead."""
    separate = device_type == "cuda"
    methods = [
        Method("plain", "Adam on sum of losses", build_plain),
        Method("floor", "K autograd.grad + sum + Adam step", build_floor),
        Method("floor-vmap", "K head grads + 1 batched trunk VJP + Adam", build_floor_vmap),
    ]

    def pub(name: str, description: str, period: int = 1, **kwargs: Any) -> Method:
        return Method(name, description, make_pub_builder(**kwargs), period, kwargs)

    methods += [
        Method(
            "pub-pareto",
            "PUB update space, pareto",
            make_pub_builder(instrument=not separate, strategy="pareto"),
            pub_kwargs={"strategy": "pareto"},
        )
    ]
    methods += [pub(f"pub-{s}", f"PUB update space, {s}", strategy=s) for s in PUB_STRATEGIES[1:]]
    if "fused" in inspect.signature(PUB).parameters:
        methods.append(
            Method(
                "pub-pareto-eager",
                "PUB update space, pareto, fused=False",
                make_pub_builder(instrument=not separate, strategy="pareto", fused=False),
                pub_kwargs={"strategy": "pareto", "fused": False},
            )
        )
    methods += [
        pub(f"grad-{s}", f"gradient space, {s} ({paper})", strategy=s, space="gradient")
        for s, paper in GRAD_STRATEGIES.items()
    ]
    if "state" in inspect.signature(PUB).parameters:  # the state and space axes
        methods += [
            pub("pub-pareto-marginal", "PUB marginal space, pareto", strategy="pareto",
                space="marginal"),
            pub("pub-pareto-diagnostics", "PUB update space, pareto, diagnostics=True",
                strategy="pareto", diagnostics=True),
            pub("pub-pareto-per-task", "PUB per-task state, pareto", strategy="pareto",
                state="per_task"),
            pub("pub-pareto-per-task-marginal", "PUB per-task state, marginal, pareto",
                strategy="pareto", state="per_task", space="marginal"),
        ]  # fmt: skip
    methods += [
        pub(
            f"pub-pareto-se10-{tag}",
            f"PUB pareto, solve_every=10, {mode}",
            period=10,
            strategy="pareto",
            solve_every=10,
            between_solves=mode,
        )
        for mode, tag in (("weighted_gradient", "wg"), ("reuse_weights", "rw"))
    ]
    if include_torchjd:
        methods += [
            Method(
                "torchjd-upgrad", "TorchJD mtl_backward + UPGrad", make_torchjd_builder("upgrad")
            ),
            Method("torchjd-mgda", "TorchJD mtl_backward + MGDA", make_torchjd_builder("mgda")),
        ]
    if separate:
        methods.append(
            Method(
                "pub-pareto-instrumented",
                "instrumented copy of pub-pareto",
                make_pub_builder(instrument=True, strategy="pareto"),
                hidden=True,
            )
        )
    return methods


# ----------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_up(n: int, period: int) -> int:
    return -(-n // period) * period


@dataclass
class Timing:
    """Per-round mean ms per step, wall clock and process CPU time (all threads)."""

    name: str
    rounds_per_cycle: int  # consecutive rounds that make up one solve_every cycle
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def series(self, cpu: bool = False) -> list[float]:
        return self.cpu_ms if cpu else self.wall_ms


def time_methods(
    problems: list[Problem], methods: list[Method], cfg: Config, device: torch.device
) -> tuple[dict[int, dict[str, Timing]], dict[int, dict[str, PhaseTimer]]]:
    """Interleaved timing of every (K, method) pair.

    Every round runs every pair for ``cfg.steps`` steps, in a fresh random order, so that the
    load of a shared machine hits all methods *and all K* alike. A ``solve_every`` method is
    warmed up to the start of a cycle, so that round ``r`` of it holds the solve step exactly
    when ``r % (period / steps) == 0``.
    """
    for m in methods:
        if m.period > 1 and (m.period % cfg.steps or cfg.repeats % (m.period // cfg.steps)):
            raise ValueError(
                f"{m.name}: steps per round ({cfg.steps}) must divide its period ({m.period}) "
                f"and whole cycles must fit in the {cfg.repeats} rounds"
            )
    pairs: list[tuple[int, Method, StepFn]] = []
    timers: dict[int, dict[str, PhaseTimer]] = defaultdict(dict)
    for problem in problems:
        for m in methods:
            built = m.build(problem)
            for _ in range(_round_up(cfg.warmup, m.period)):
                built.step()
            pairs.append((problem.k, m, built.step))
            if built.timer is not None:
                built.timer.samples.clear()  # warm-up excluded
                timers[problem.k][m.name] = built.timer
    _sync(device)
    results = {
        p.k: {m.name: Timing(m.name, max(1, m.period // cfg.steps)) for m in methods}
        for p in problems
    }
    rng = random.Random(cfg.seed)
    t_start = time.perf_counter()
    # A full collection walks the whole heap (hundreds of ms here): do it once, then freeze the
    # survivors so that the young-generation collections between timed blocks stay cheap.
    gc.collect()
    gc.freeze()
    try:
        for r in range(cfg.repeats):
            order = list(pairs)
            rng.shuffle(order)
            for k, m, fn in order:
                gc.collect(0)
                gc.disable()
                try:
                    _sync(device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(cfg.steps):
                        fn()
                    _sync(device)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    gc.enable()
                results[k][m.name].wall_ms.append(1e3 * wall / cfg.steps)
                results[k][m.name].cpu_ms.append(1e3 * cpu / cfg.steps)
            elapsed = time.perf_counter() - t_start
            print(f"  round {r + 1}/{cfg.repeats} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
    finally:
        gc.unfreeze()
    return results, timers


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75), linear interpolation (``statistics.quantiles`` 'inclusive')."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def amortised(values: Sequence[float], rounds_per_cycle: int) -> tuple[float, float, float]:
    """Quartiles per round; for a ``solve_every`` method, amortised over its cycle.

    Rounds ``0, n, 2n, ...`` (``n = rounds_per_cycle``) hold the solve step, the others not; each
    quartile is ``(q(solve rounds) + (n - 1) q(other rounds)) / n``: a robust per-step cost of a
    whole cycle (a plain mean over a cycle would let one disturbed step move it).
    """
    n = rounds_per_cycle
    if n == 1:
        return quantiles(values)
    first = quantiles(values[::n])
    rest = quantiles([v for i, v in enumerate(values) if i % n])
    q1, q2, q3 = ((f + (n - 1) * o) / n for f, o in zip(first, rest, strict=True))
    return q1, q2, q3


def summary(t: Timing, cpu: bool = False) -> tuple[float, float, float]:
    """Quartiles of ms/step over rounds (amortised over a cycle for ``solve_every``)."""
    return amortised(t.series(cpu), t.rounds_per_cycle)


def paired_ratio(a: Timing, b: Timing, cpu: bool = False) -> tuple[float, float, float]:
    """Quartiles of the per-round ratio a/b (same round), amortised like :func:`summary`."""
    if b.rounds_per_cycle != 1:
        raise ValueError("the reference of a ratio must be a method without solve_every")
    ratios = [x / y for x, y in zip(a.series(cpu), b.series(cpu), strict=True)]
    return amortised(ratios, a.rounds_per_cycle)


# -------------------------------------------------------------------------------- breakdown
class PhaseTimer:
    """Inclusive wall and process-CPU time of nested, named calls, one sample per step.

    Paths look like ``iteration/step/gram/lookahead``. Wrapping adds two clock reads on entry
    and two on exit per call (:func:`timer_overhead_us` measures the cost).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stack: list[str] = []
        self.current: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.samples: list[dict[str, tuple[float, float]]] = []
        self.calls = 0

    def start_sample(self) -> None:
        self.current = defaultdict(lambda: [0.0, 0.0])
        self.calls = 0

    def end_sample(self) -> None:
        self.samples.append({p: (w, c) for p, (w, c) in self.current.items()})
        self.samples[-1]["(wrapped calls)"] = (float(self.calls), 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        path = "/".join(self.stack)
        self.calls += 1
        _sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            acc = self.current[path]
            acc[0] += time.perf_counter() - t0
            acc[1] += time.process_time() - c0
            self.stack.pop()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def patch(self, owner: Any, attr: str) -> Iterator[None]:
        """Time ``owner.attr`` (e.g. ``torch.autograd.grad``) inside this block only."""
        real = getattr(owner, attr)
        setattr(owner, attr, self.wrap(attr if attr != "grad" else "autograd.grad", real))
        try:
            yield
        finally:
            setattr(owner, attr, real)

    def medians(self) -> dict[str, tuple[float, float]]:
        """Median wall ms and CPU ms per path over the samples (calls: the count).

        Every parent also gets an ``(other)`` child: its time not covered by the timed calls
        inside it (Python glue, unwrapped work), computed per sample before the median.
        """
        samples = [_with_other(s) for s in self.samples]
        paths = {p for s in samples for p in s}
        out: dict[str, tuple[float, float]] = {}
        for path in paths:
            walls = [s.get(path, (0.0, 0.0))[0] for s in samples]
            cpus = [s.get(path, (0.0, 0.0))[1] for s in samples]
            scale = 1.0 if path == "(wrapped calls)" else 1e3
            out[path] = (scale * statistics.median(walls), scale * statistics.median(cpus))
        return out


def _with_other(sample: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    out = dict(sample)
    paths = [p for p in sample if p != "(wrapped calls)"]
    for parent in paths:
        children = [p for p in paths if "/" in p and p.rsplit("/", 1)[0] == parent]
        if children:
            out[f"{parent}/(other)"] = (
                sample[parent][0] - sum(sample[c][0] for c in children),
                sample[parent][1] - sum(sample[c][1] for c in children),
            )
    return out


def instrument_pub(opt: PUB, timer: PhaseTimer) -> None:
    """Wrap the wrapper's internal methods on this one instance (pub_optim is not modified).

    Only the methods that exist are wrapped; time the wrapped ones do not cover shows up in the
    report as ``(other)`` under its parent.
    """
    transform, engine = opt._transform, opt._engine
    assert transform is not None and engine is not None, (
        "the breakdown needs an exact look-ahead transform (Adam)"
    )
    for obj, attr, name in (
        (opt, "_check_losses", "check_losses"),
        (opt._grads, "carry_over", "carry_over"),
        (transform, "begin", "begin"),
        (engine, "gram", "gram"),
        (engine, "_gram_fused", "gram_fused"),
        (transform, "lookahead", "lookahead"),
        (opt, "balancer", "solve"),
        (opt, "_check_finite_grads", "check_finite"),
        (engine, "apply_eager", "apply"),
        (engine, "apply_fused", "apply_fused"),
        (transform, "commit", "commit"),
        (transform, "finish", "finish"),
        (opt, "_step_nonshared", "heads_step"),
        (opt, "_finish_step", "stats"),
    ):
        if callable(getattr(obj, attr, None)):
            setattr(obj, attr, timer.wrap(name, getattr(obj, attr)))


def timer_overhead_us(n: int = 20000) -> float:
    """Cost of one wrapped call around a no-op, in microseconds (CPU)."""
    timer = PhaseTimer(torch.device("cpu"))
    noop = timer.wrap("noop", lambda: None)
    t0 = time.perf_counter()
    for _ in range(n):
        noop()
    return 1e6 * (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------------- memory
def measure_memory(
    problem: Problem, methods: list[Method], cfg: Config, device: torch.device
) -> dict[str, int]:
    """Peak bytes from building the method's model copy and optimizer through a few steps."""
    out: dict[str, int] = {}
    for m in methods:
        if m.hidden:
            continue

        def run(m: Method = m) -> None:
            built = m.build(problem)
            for _ in range(cfg.memory_steps):  # step 1 creates the state, later ones reuse it
                built.step()

        out[m.name] = peak_bytes(run, device)
    return out


# ------------------------------------------------------------------------------- sync check
def sync_check(problem: Problem, methods: list[Method], device: torch.device) -> dict[str, str]:
    """CUDA only: run PUB steps with ``set_sync_debug_mode("error")`` around ``step()``."""
    out: dict[str, str] = {}
    for m in methods:
        if not m.is_pub or m.hidden:
            continue
        for check_finite in (True, False):
            model = copy.deepcopy(problem.model)
            assert m.pub_kwargs is not None
            opt = PUB(_adam(model), **m.pub_kwargs, check_finite=check_finite)
            verdict = "no sync"
            for i in range(2 + m.period):
                opt.zero_grad()
                _, logits = model(problem.x)
                opt.backward(task_losses(logits, problem.y))
                if i == 0:  # first step creates state (allowed to sync)
                    opt.step()
                    continue
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                except RuntimeError as err:
                    verdict = f"SYNC at step {i}: {str(err).splitlines()[0][:80]}"
                    break
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out[f"{m.name} (check_finite={check_finite})"] = verdict
    return out


# ------------------------------------------------------------------------------------ report
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pub_optim"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return sha + (" (pub_optim/ has uncommitted changes)" if dirty else "")


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


@dataclass
class KResult:
    k: int
    shared_numel: int
    timings: dict[str, Timing]
    # method -> path -> (wall ms, CPU ms), medians over the timed steps
    breakdown: dict[str, dict[str, tuple[float, float]]]
    memory: dict[str, int]
    sync: dict[str, str]


def fmt_q(q: tuple[float, float, float], digits: int = 1) -> tuple[str, str]:
    return f"{q[1]:.{digits}f}", f"{q[0]:.{digits}f}-{q[2]:.{digits}f}"


def time_table(res: KResult, methods: list[Method]) -> list[str]:
    t = res.timings
    rows = [
        "| method | what | wall ms/step | IQR | min | x floor (IQR) | x plain | x torchjd-upgrad "
        "| CPU ms/step | CPU x floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        med, iqr = fmt_q(summary(t[m.name]))
        rf = paired_ratio(t[m.name], t["floor"])
        rp = paired_ratio(t[m.name], t["plain"])
        ru = (
            f"{paired_ratio(t[m.name], t['torchjd-upgrad'])[1]:.2f}"
            if "torchjd-upgrad" in t
            else "n/a"
        )
        cpu_med = summary(t[m.name], cpu=True)[1]
        best = f"{min(t[m.name].wall_ms):.1f}" if m.period == 1 else "-"
        cpu_rf = paired_ratio(t[m.name], t["floor"], cpu=True)[1]
        rows.append(
            f"| {m.name} | {m.description} | {med} | {iqr} | {best} "
            f"| {rf[1]:.2f} ({rf[0]:.2f}-{rf[2]:.2f})"
            f" | {rp[1]:.2f} | {ru} | {cpu_med:.1f} | {cpu_rf:.2f} |"
        )
    return rows


def memory_table(res: KResult, methods: list[Method], itemsize: int) -> list[str]:
    p_bytes = res.shared_numel * itemsize
    base = res.memory["plain"]
    rows = [
        "| method | peak (MiB) | extra over plain (MiB) | extra / shared size | "
        f"<= K+1 = {res.k + 1}? |",
        "|---|---:|---:|---:|---|",
    ]
    for m in methods:
        peak = res.memory[m.name]
        extra = peak - base
        ratio = extra / p_bytes
        ok = "yes" if ratio <= res.k + 1 else "**no**"
        rows.append(
            f"| {m.name} | {peak / 2**20:.1f} | {extra / 2**20:.1f} | {ratio:.2f} | "
            f"{ok if m.is_pub else '-'} |"
        )
    return rows


def breakdown_table(res: KResult, overhead_us: float) -> list[str]:
    names = list(res.breakdown)
    tables = {n: dict(res.breakdown[n]) for n in names}
    calls = {n: t.pop("(wrapped calls)", (0.0, 0.0))[0] for n, t in tables.items()}
    merged: dict[str, tuple[float, float]] = {}
    for t in tables.values():
        merged.update(t)
    header = "| phase (inclusive, nested) |" + "".join(
        f" {n}: wall ms | % | CPU ms |" for n in names
    )
    rows = [header, "|---|" + "---:|---:|---:|" * len(names)]
    for path in order_breakdown(merged):
        depth = path.count("/")
        cells = []
        for n in names:
            if path in tables[n]:
                wall, cpu = tables[n][path]
                total = tables[n]["iteration"][0]
                cells.append(f" {wall:.1f} | {100 * wall / total:.1f}% | {cpu:.1f} |")
            else:
                cells.append(" | | |")
        rows.append(f"| {'&nbsp;' * 4 * depth + path.rsplit('/', 1)[-1]} |" + "".join(cells))
    rows += [
        "",
        "Timed calls per step: "
        + ", ".join(
            f"{n} {c:.0f} (about {c * overhead_us / 1e3:.2f} ms of instrumentation)"
            for n, c in calls.items()
        )
        + ".",
    ]
    return rows


def order_breakdown(b: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Depth-first, in the execution order of a step."""
    order = [
        "iteration",
        "zero_grad",
        "forward",
        "backward",
        "check_losses",
        "autograd.grad",
        "step",
        "carry_over",
        "begin",
        "gram",
        "gram_fused",
        "lookahead",
        "solve",
        "check_finite",
        "apply",
        "apply_fused",
        "commit",
        "finish",
        "heads_step",
        "stats",
        "(other)",
    ]
    rank = {name: i for i, name in enumerate(order)}

    def key(path: str) -> list[int]:
        return [rank.get(part, len(order)) for part in path.split("/")]

    return {p: b[p] for p in sorted(b, key=key)}


def targets(results: list[KResult], methods: list[Method], itemsize: int) -> list[str]:
    lines = []
    pub_names = [f"pub-{s}" for s in PUB_STRATEGIES]
    for res in results:
        t = res.timings
        for name in pub_names:
            r = paired_ratio(t[name], t["floor"])[1]
            limit = FLOOR_TARGETS.get(res.k)
            if limit is None:
                verdict = "no target at this K"
            else:
                verdict = "met" if r <= limit else "**not met**"
            lines.append(
                f"- K={res.k} {name}: {r:.2f}x floor"
                + (f" (target <= {limit:.2f}: {verdict})" if limit else f" ({verdict})")
            )
        if "torchjd-upgrad" in t:
            for name in pub_names:
                r = paired_ratio(t[name], t["torchjd-upgrad"])[1]
                verdict = "met" if r <= 1.0 else "**not met**"
                lines.append(
                    f"- K={res.k} {name} vs torchjd-upgrad: {r:.2f}x (target <= 1: {verdict})"
                )
        p_bytes = res.shared_numel * itemsize
        worst = max(
            ((res.memory[m.name] - res.memory["plain"]) / p_bytes, m.name)
            for m in methods
            if m.is_pub
        )
        verdict = "met" if worst[0] <= res.k + 1 else "**not met**"
        lines.append(
            f"- K={res.k} peak extra memory: worst PUB variant {worst[1]} at {worst[0]:.2f}x the "
            f"shared parameters (target <= {res.k + 1}: {verdict})"
        )
    return lines


def plot(results: list[KResult], methods: list[Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 6), squeeze=False)
    names = [m.name for m in methods]
    for ax, res in zip(axes[0], results, strict=True):
        qs = [summary(res.timings[n]) for n in names]
        med = [q[1] for q in qs]
        err = [[q[1] - q[0] for q in qs], [q[2] - q[1] for q in qs]]
        colors = [
            "tab:gray"
            if n in ("plain", "floor", "floor-vmap")
            else "tab:red"
            if n.startswith("torchjd")
            else "tab:orange"
            if n.startswith("grad-")
            else "tab:blue"
            for n in names
        ]
        y = list(range(len(names)))
        ax.barh(y, med, xerr=err, color=colors, capsize=2)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        floor = summary(res.timings["floor"])[1]
        ax.axvline(floor, color="k", lw=0.8, ls="--", label="floor")
        limit = FLOOR_TARGETS.get(res.k)
        if limit is not None:
            ax.axvline(floor * limit, color="tab:green", lw=0.8, ls=":", label=f"{limit}x floor")
        ax.set_title(f"K = {res.k} (shared P = {res.shared_numel:,})")
        ax.set_xlabel("ms per training iteration (median, IQR)")
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_metadata(cfg: Config, device: torch.device, command: str) -> dict[str, Any]:
    """What the report says about the run; captured when it starts (``wall_s`` etc. later)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tjd = version("torchjd")
    except PackageNotFoundError:  # pragma: no cover - optional dependency
        tjd = "not installed"
    return {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {cpu_model()}, {os.cpu_count()} logical CPUs",
        "threads": cfg.threads,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchjd": tjd,
        "commit": git_commit(),
        "load_before": loadavg(),
    }


def write_report(
    results: list[KResult],
    methods: list[Method],
    cfg: Config,
    meta: dict[str, Any],
    out_dir: Path,
    name: str,
) -> Path:
    device = torch.device(meta["device"])
    overhead_us = float(meta["overhead_us"])
    itemsize = torch.empty((), dtype=torch.float32).element_size()
    trunk = " -> ".join(str(w) for w in cfg.trunk)
    head_numel = cfg.trunk[-1] * cfg.head_hidden + cfg.head_hidden + cfg.head_hidden + 1
    mem_method = (
        "`torch.cuda.max_memory_allocated` minus the bytes allocated before"
        if device.type == "cuda"
        else "the CPU allocator's own events recorded by `torch.profiler.profile("
        "profile_memory=True)` (every allocation and free, with its size, in order; the peak of "
        "their running sum)"
    )
    lines = [
        "# Step time and memory of the PUB core",
        "",
        f"- Date: {meta['date']} (wall time of the run: {meta['wall_s'] / 60:.1f} min)",
        f"- Machine: {meta['machine']}, `torch.set_num_threads({meta['threads']})`, device "
        f"`{device}`; load average (1, 5, 15 min) before / after: {meta['load_before']} / "
        f"{meta['load_after']} (the machine is shared: hence the interleaving)",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, torchjd {meta['torchjd']}; "
        f"pub-optim at commit {meta['commit']} (when the run started)",
        f"- Command: `{meta['command']}`",
        "",
        # The figure and the verdicts first: the tables per K below are long.
        f"![step time]({name}.png)",
        "",
        "## Targets",
        "",
        *targets(results, methods, itemsize),
        *(
            []
            if device.type == "cuda"
            else [
                "- No host-device synchronisation on CUDA: **not checked** (no GPU in this run; "
                "`--device cuda` runs the check)."
            ]
        ),
        "",
        "## Setup",
        f"- Model: shared trunk `{trunk}` (Linear + ReLU after each layer) = "
        f"{results[0].shared_numel:,} shared parameters; per task a tower "
        f"`{cfg.trunk[-1]} -> {cfg.head_hidden} -> 1` ({head_numel:,} parameters each); "
        "BCE-with-logits loss per task on random 0/1 labels.",
        f"- Batch {cfg.batch}, float32, inputs and labels drawn once from fixed seeds and used by "
        "every method at every step; every method trains its own deep copy of the same initial "
        "model with `torch.optim.Adam(lr=1e-3)` (PUB/TorchJD defaults otherwise).",
        f"- Timing: every (K, method) pair gets {cfg.warmup} warm-up steps (excluded; the "
        f"`solve_every=10` variants: 10), then {cfg.repeats} rounds; each round runs every pair "
        f"(all K together) for {cfg.steps} step(s), in a freshly shuffled order (fixed seed), "
        "with Python's GC off inside the timed block, so that the load of the shared machine "
        "hits every method and every K alike. One step = `zero_grad` + forward + backward + "
        "optimizer step. `wall ms/step`: median over rounds, IQR across rounds, `min`: the "
        "fastest round (closest to an idle machine; not given for `solve_every` variants). "
        "The ratios are "
        "medians (IQR in brackets) over rounds of *paired* ratios (the two methods in the same "
        "round). `solve_every=10` variants: every 10th round holds the solve step; each of their "
        "quartiles is `(q(solve rounds) + 9 q(other rounds)) / 10`, the amortised per-step cost "
        "of a whole cycle (ratios likewise). `CPU` columns: the same from "
        "`time.process_time()` (all threads of the process: less sensitive to other processes, "
        "but it counts OpenMP spin-waiting).",
        "- `floor`: K `torch.autograd.grad(loss_k, shared + own_k)` calls, the returned "
        "gradients kept (no copy), their sum in the shared `.grad`, one Adam step. "
        "`floor-vmap` (information only): the same gradients with one batched VJP through the "
        "trunk (`is_grads_batched=True`), the way TorchJD's `mtl_backward` computes them.",
        "- TorchJD: `mtl_backward(losses, features=features, tasks_params=..., shared_params=...)` "
        "then `jac_to_grad(shared, UPGrad() | MGDA())` then `opt.step()` (parameters passed "
        "explicitly: its fastest documented use).",
        f"- Peak memory: {mem_method}, from building the method's model copy and optimizer "
        f"through {cfg.memory_steps} steps (the first creates the optimizer state and, for the "
        "`solve_every` variants, is the solve step with K backward passes). 'Extra' = peak "
        "minus the plain method's peak; the shared parameters' size is P x 4 bytes.",
        "",
    ]
    for res in results:
        lines += [f"## K = {res.k}", "", "### Step time", ""]
        lines += time_table(res, methods)
        lines += ["", "### Where the time goes in one PUB step (pareto, update space)", ""]
        lines += [
            "Medians over the timed rounds of the `pub-pareto` and `pub-pareto-eager` rows above"
            + (" (a hidden instrumented copy on CUDA)" if device.type == "cuda" else "")
            + ": their internal methods are wrapped on those instances (`pub_optim` is not "
            f"modified); one wrapped call costs {overhead_us:.1f} us here. Nested rows are "
            "included in their parent; `(other)` is the part of a parent that no timed call "
            "inside it covers. Eager path: `lookahead` under `gram` and under `apply` is the "
            "per-task Adam look-ahead (computed twice per step), `commit` the state advance and "
            "parameter write. Fused path (`fused=None` turns it on for K x P >= 2**20 on CPU): "
            "`gram_fused` and `apply_fused` are the two compiled loops.",
            "",
        ]
        lines += breakdown_table(res, overhead_us)
        lines += ["", "### Peak memory", ""]
        lines += memory_table(res, methods, itemsize)
        lines += [
            "",
            f"Analytic: PUB's K per-task gradients are K x P x {itemsize} bytes = "
            f"{res.k * res.shared_numel * itemsize / 2**20:.1f} MiB. On the compiled path "
            "(update space, `fused` on) they are the tensors autograd returned, alive from "
            "`backward` to the end of `step`; on the eager path they are persistent "
            "`[K, *shape]` buffers, plus a scratch of K x 65536 values per buffer.",
            "",
        ]
        if res.sync:
            lines += ["### CUDA host-device synchronisation in `PUB.step()`", ""]
            lines += [f"- {name}: {verdict}" for name, verdict in res.sync.items()]
            lines += [""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


# -------------------------------------------------------------------------------------- main
def run(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--ks", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument(
        "--name", default="step_time", help="basename of the .md/.png/.json written to --out"
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rebuild the report from a saved .json"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        return from_json(args.from_json, args.out, args.name)

    cfg = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.ks is not None:
        overrides["ks"] = tuple(args.ks)
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if overrides:
        cfg = Config(**{**cfg.__dict__, **overrides})
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(cfg.threads)
    include_torchjd = not args.no_torchjd
    if include_torchjd:
        try:
            import torchjd  # noqa: F401
        except ImportError:
            print("torchjd is not installed: its rows are skipped", file=sys.stderr)
            include_torchjd = False
    methods = all_methods(include_torchjd, device.type)
    shown = [m for m in methods if not m.hidden]
    command = "python " + " ".join(
        [os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])]
    )
    meta = run_metadata(cfg, device, command)
    t_start = time.perf_counter()
    problems = [make_problem(cfg, k, device) for k in cfg.ks]
    for problem in problems:
        print(f"K={problem.k}: shared parameters {problem.shared_numel:,}", flush=True)
    timings, timers = time_methods(problems, methods, cfg, device)
    results: list[KResult] = []
    for problem in problems:
        k = problem.k
        memory = measure_memory(problem, methods, cfg, device)
        sync = sync_check(problem, methods, device) if device.type == "cuda" else {}
        bd = {name: order_breakdown(t.medians()) for name, t in timers[k].items()}
        res = KResult(k, problem.shared_numel, timings[k], bd, memory, sync)
        results.append(res)
        print(f"K={k}", "\n".join(time_table(res, shown)), sep="\n", flush=True)
    meta.update(
        wall_s=time.perf_counter() - t_start, load_after=loadavg(), overhead_us=timer_overhead_us()
    )
    raw = args.out / f"{args.name}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(raw_results(results, cfg, meta), indent=1))
    return finish(results, shown, cfg, meta, args.out, args.name)


def finish(
    results: list[KResult],
    shown: list[Method],
    cfg: Config,
    meta: dict[str, Any],
    out: Path,
    name: str,
) -> Path:
    itemsize = torch.empty((), dtype=torch.float32).element_size()
    print("\n".join(targets(results, shown, itemsize)))
    path = write_report(results, shown, cfg, meta, out, name)
    png = out / f"{name}.png"
    plot(results, shown, png)
    print(f"wrote {path}, {png} and {out / (name + '.json')} ({meta['wall_s']:.0f} s)")
    return path


def raw_results(results: list[KResult], cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """Every measured number, for re-analysis (``--from-json`` rebuilds the report from it)."""
    return {
        "meta": meta,
        "config": cfg.__dict__,
        "results": [
            {
                "k": r.k,
                "shared_numel": r.shared_numel,
                "timings": {
                    n: {
                        "rounds_per_cycle": t.rounds_per_cycle,
                        "wall_ms": t.wall_ms,
                        "cpu_ms": t.cpu_ms,
                    }
                    for n, t in r.timings.items()
                },
                "breakdown_ms": {
                    n: {p: [w, c] for p, (w, c) in b.items()} for n, b in r.breakdown.items()
                },
                "peak_bytes": r.memory,
                "sync": r.sync,
            }
            for r in results
        ],
    }


def load_json(path: Path) -> tuple[Config, dict[str, Any], list[KResult]]:
    """A saved run (:func:`raw_results`): its configuration, metadata and results."""
    data = json.loads(path.read_text())
    config = dict(data["config"])
    for key in ("trunk", "ks"):
        config[key] = tuple(config[key])
    cfg = Config(**config)
    meta = data["meta"]
    results = [
        KResult(
            r["k"],
            r["shared_numel"],
            {
                n: Timing(n, t["rounds_per_cycle"], t["wall_ms"], t["cpu_ms"])
                for n, t in r["timings"].items()
            },
            {n: {p: (w, c) for p, (w, c) in b.items()} for n, b in r["breakdown_ms"].items()},
            r["peak_bytes"],
            r["sync"],
        )
        for r in data["results"]
    ]
    return cfg, meta, results


def from_json(path: Path, out: Path, name: str) -> Path:
    """Rebuild the report and the chart from a saved ``.json`` (no measuring)."""
    cfg, meta, results = load_json(path)
    measured = set(results[0].timings)
    shown = [
        m
        for m in all_methods(True, torch.device(meta["device"]).type)
        if not m.hidden and m.name in measured
    ]
    return finish(results, shown, cfg, meta, out, name)


if __name__ == "__main__":
    run()
