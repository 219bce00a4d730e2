"""The methods compared in the study: what each one is, where it comes from, how it trains.

Every method trains the same model with the same Adam optimizer; they differ only in how the K
task losses become one step. All implementations are this project's own (``pub_optim``); TorchJD
serves as a test oracle for PCGrad and CAGrad and as a cost reference (UPGrad) in ``cost.py``.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["plain", "callback", "loss-weighting"]


@dataclass(frozen=True)
class Method:
    """One training method of the study.

    Attributes:
        name: the study's key (file names, tables).
        label: how tables and plots call it.
        kind: ``"plain"`` (summed loss, no callback), ``"callback"`` (the ``UpdateBalancing``
            callback on ``space`` with ``strategy``) or ``"loss-weighting"`` (a weighted loss,
            one backward pass: ``pub_optim.loss_weighting``).
        strategy: the ``pub_optim`` strategy name for ``"callback"`` methods.
        space: ``"update"`` (PUB) or ``"gradient"`` (gradient balancing).
        balancer: the integration's ``TrainConfig.balancer`` when ``run_training`` supports the
            method as is (else None: it trains through ``run_training``'s hooks).
        source: the paper, and which implementation.
        options: further ``UpdateBalancing`` keyword options (``state="per_task"``), as
            ``(name, value)`` pairs.
        fixed_ones: the strategy is fixed weights of 1 on every task, not normalised (what the
            PUB paper's released code effectively ran).
    """

    name: str
    label: str
    kind: Kind
    strategy: str | None = None
    space: str = "gradient"
    balancer: str | None = None
    source: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    fixed_ones: bool = False

    def callback_options(self) -> dict[str, Any]:
        return dict(self.options)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "equal", "Equal", "plain", balancer="equal",
            source="sum of the task losses (baseline of every comparison)",
        ),
        Method(
            "uw", "UW", "loss-weighting",
            source="uncertainty weighting, Kendall et al. CVPR 2018; own "
            "(pub_optim.loss_weighting.UncertaintyWeighting, classification form)",
        ),
        Method(
            "famo", "FAMO", "loss-weighting",
            source="Liu et al. NeurIPS 2023; own (pub_optim.loss_weighting.FAMO, reference "
            "defaults lr 0.025, gamma 0.01; one extra no-grad forward per step)",
        ),
        Method(
            "mgda", "MGDA", "callback", "min-norm", "gradient", "mgda",
            source="Sener & Koltun NeurIPS 2018; own (min-norm strategy, space='gradient')",
        ),
        Method(
            "imtl-g", "IMTL-G", "callback", "equal-magnitude", "gradient", "imtl-g",
            source="Liu et al. ICLR 2021; own (equal-magnitude strategy, space='gradient')",
        ),
        Method(
            "nash-mtl", "Nash-MTL", "callback", "pareto", "gradient", "nash-mtl",
            source="Navon et al. ICML 2022; own (pareto strategy, space='gradient', weights "
            "normalised to sum to one)",
        ),
        Method(
            "pcgrad", "PCGrad", "callback", "pcgrad", "gradient",
            source="Yu et al. NeurIPS 2020; own (pub_optim.strategies.PCGrad, seeded with the "
            "run's seed, space='gradient')",
        ),
        Method(
            "cagrad", "CAGrad", "callback", "cagrad", "gradient",
            source="Liu et al. NeurIPS 2021; own (pub_optim.strategies.CAGrad, c = 0.5, "
            "space='gradient')",
        ),
        Method(
            "pub-min-norm", "PUB min-norm", "callback", "min-norm", "update", "min-norm",
            source="PUB (Yuan et al. 2024), min-norm on the updates; own",
        ),
        Method(
            "pub-equal-magnitude", "PUB equal-mag.", "callback", "equal-magnitude", "update",
            "equal-magnitude", source="PUB, equal-magnitude on the updates; own",
        ),
        Method(
            "pub-pareto", "PUB pareto", "callback", "pareto", "update", "pareto",
            source="PUB, Nash bargaining on the updates (the paper's choice); own",
        ),
        Method(
            "pub-pareto-per-task", "PUB pareto, per-task state", "callback", "pareto", "update",
            options=(("state", "per_task"),),
            source="PUB pareto with one optimizer state per task on the shared parameters "
            "(the idea of AdaTask, Yang et al. AAAI 2023); own (state='per_task')",
        ),
        Method(
            "pub-pareto-marginal", "PUB pareto, marginal", "callback", "pareto", "marginal",
            source="PUB pareto on the task-attributable parts d_k - d_0 of the updates; own "
            "(space='marginal')",
        ),
        Method(
            "per-task-equal", "Per-task state, equal", "callback", "equal", "update",
            options=(("state", "per_task"),),
            source="per-task optimizer state with equal weights: the ablation that separates "
            "per-task state from balancing; own (strategy 'equal', state='per_task')",
        ),
        Method(
            "as-released", "As released (weights 1)", "callback", "fixed-ones", "update",
            fixed_ones=True,
            source="what the PUB paper's released code effectively ran: update space, weights "
            "fixed at 1 on every task, not normalised (pub_optim.strategies.Fixed, "
            "normalization='none')",
        ),
    )
}  # fmt: skip

METHOD_NAMES = tuple(METHODS)
BASELINE = "equal"


#: Methods of the study proper (``as-released`` belongs to the paper protocol).
STUDY_METHODS = tuple(n for n in METHODS if n != "as-released")


def _spaces(callback: Any, wrapper: Any) -> tuple[str, ...]:
    """The ``space`` values the installed ``UpdateBalancing`` accepts (from its type hints)."""
    try:
        hint = typing.get_type_hints(callback.__init__).get("space")
        values = typing.get_args(hint)
        if values:
            return tuple(values)
    except Exception:  # unresolvable annotations: fall back to the module's alias
        pass
    return tuple(typing.get_args(getattr(wrapper, "Space", Literal["update", "gradient"])))


def unavailable(method: Method) -> str | None:
    """Why the installed ``pub_optim`` cannot train ``method`` (None when it can)."""
    if method.kind != "callback":
        return None
    try:
        from pub_optim import wrapper
        from pub_optim.lightning import UpdateBalancing
    except ImportError as exc:
        return f"{method.name} needs pub_optim.lightning ({exc})"
    accepted = inspect.signature(UpdateBalancing.__init__).parameters
    missing = [k for k, _ in method.options if k not in accepted]
    if missing:
        return (
            f"method {method.name!r} needs UpdateBalancing({', '.join(missing)}=...), which the "
            "installed pub_optim lacks; update pub_optim or leave the method out"
        )
    spaces = _spaces(UpdateBalancing, wrapper)
    if method.space not in spaces:
        return (
            f"method {method.name!r} needs space={method.space!r}, which the installed pub_optim "
            f"lacks (it has {', '.join(map(repr, spaces))}); update pub_optim or leave it out"
        )
    return None


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
