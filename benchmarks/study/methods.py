"""The methods compared in the study: what each one is, where it comes from, how it trains.

Every method trains the same model with the same Adam optimizer; they differ only in how the K
task losses become one step. All implementations are this project's own (``pub_optim``); TorchJD
serves as a test oracle for PCGrad and CAGrad and as a cost reference (UPGrad) in ``cost.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
            method as is (else None: the study's own training path, ``train.train_custom``).
        source: the paper, and which implementation.
    """

    name: str
    label: str
    kind: Kind
    strategy: str | None = None
    space: str = "gradient"
    balancer: str | None = None
    source: str = ""


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
    )
}  # fmt: skip

METHOD_NAMES = tuple(METHODS)
BASELINE = "equal"


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
