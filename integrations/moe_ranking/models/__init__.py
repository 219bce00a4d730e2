"""Multi-task ranking models sharing one input layer: Shared-Bottom, MMoE, PLE, a GRec-style sparse
task-routed MoE, GRec itself (task sentences, attention, sparse MoE), and the ESMM option for funnel
tasks. ``build_model`` builds one for a dataset."""

from __future__ import annotations

from typing import Any

from ..data.base import MultiTaskData
from ..errors import ConfigError
from .base import MultiTaskModel, Tower, mlp, stack_logits
from .esmm import ESMM, product_logit
from .inputs import InputLayer
from .mmoe import MMoE
from .ple import PLE
from .shared_bottom import SharedBottom

MODELS = ("shared-bottom", "mmoe", "ple", "sparse-moe", "grec")

__all__ = [
    "ESMM",
    "MODELS",
    "PLE",
    "InputLayer",
    "MMoE",
    "MultiTaskModel",
    "SharedBottom",
    "Tower",
    "build_model",
    "mlp",
    "product_logit",
    "stack_logits",
]


def _model_class(name: str) -> type[MultiTaskModel]:
    if name == "shared-bottom":
        return SharedBottom
    if name == "mmoe":
        return MMoE
    if name == "ple":
        return PLE
    if name == "sparse-moe":
        from .sparse_moe import SparseMoE  # imports the gating package

        return SparseMoE
    if name == "grec":
        from .grec import GRec  # imports the gating package

        return GRec
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def build_model(
    name: str,
    data: MultiTaskData,
    esmm: bool = False,
    embed_dim: int = 8,
    numeric_dim: int | None = None,
    **options: Any,
) -> MultiTaskModel:
    """Build model ``name`` for ``data``'s schema and tasks.

    Args:
        name: one of :data:`MODELS`.
        data: gives the categorical cardinalities, numeric width and task names.
        esmm: wrap the backbone in :class:`ESMM` (needs ``data.funnel``): the backbone predicts
            the first funnel task and a CVR head, the model outputs the first task and
            CTCVR = CTR x CVR for the second.
        embed_dim: embedding width per categorical field.
        numeric_dim: output width of the numeric features' linear projection (default
            ``2 * embed_dim``; the PUB paper's released code uses 128 with embed_dim 128).
        **options: model-specific keyword arguments (``num_experts``, ``top_k``, ``num_levels``...);
            ``None`` values are dropped. For ``grec``, ``history_vocab``, ``history_len`` and
            ``text_buckets`` default to ``data.info``'s (set by loaders that provide ``history``
            and ``text``, e.g. MovieLens).
    """
    cls = _model_class(name)
    if name == "grec":
        # The behaviour-sequence and text tokens exist when the data provides them.
        for key in ("history_vocab", "history_len", "text_buckets"):
            if key in data.info and key not in options:
                options[key] = data.info[key]
    options = {k: v for k, v in options.items() if v is not None}
    inputs = InputLayer(
        data.cat_cardinalities, len(data.num_names), embed_dim=embed_dim, numeric_dim=numeric_dim
    )
    if not esmm:
        try:
            return cls(inputs, data.task_names, **options)  # type: ignore[call-arg]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid option for model {name!r}: {exc}") from exc
    if data.funnel is None:
        raise ConfigError(
            f"--esmm needs funnel tasks (a task nested in another); dataset {data.name!r} has "
            f"tasks {', '.join(data.task_names)} without a funnel. Datasets with one: movielens "
            "(like -> five_star), aliexpress (ctr -> ctcvr), synthetic with --funnel"
        )
    ctr, ctcvr = data.funnel
    if tuple(data.task_names) != (ctr, ctcvr):
        raise ConfigError(
            f"ESMM expects tasks ({ctr}, {ctcvr}) in that order, got {data.task_names}"
        )
    try:
        backbone = cls(inputs, (ctr, "cvr"), **options)  # type: ignore[call-arg]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid option for model {name!r}: {exc}") from exc
    return ESMM(backbone, ctr_task=ctr, ctcvr_task=ctcvr, cvr_head="cvr")
