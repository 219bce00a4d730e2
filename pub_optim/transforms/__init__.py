"""Look-ahead transforms for ``torch.optim`` optimizers, and how to pick one."""

from __future__ import annotations

import torch

from .adagrad import AdagradTransform
from .adam import AdamTransform
from .base import ParamContext, UpdateTransform
from .rmsprop import RMSpropTransform
from .sgd import SGDTransform

#: Exact transforms by optimizer class; subclasses are *not* matched (they may change ``step``),
#: and take the generic snapshot-and-restore path instead.
KNOWN_TRANSFORMS: dict[type[torch.optim.Optimizer], type[UpdateTransform]] = {
    torch.optim.SGD: SGDTransform,
    torch.optim.Adam: AdamTransform,
    torch.optim.AdamW: AdamTransform,
    torch.optim.RMSprop: RMSpropTransform,
    torch.optim.Adagrad: AdagradTransform,
}


def exact_transform_for(optimizer: torch.optim.Optimizer) -> UpdateTransform | None:
    """The exact transform for this optimizer's class, or ``None`` (use the generic path)."""
    cls = KNOWN_TRANSFORMS.get(type(optimizer))
    return None if cls is None else cls(optimizer)


__all__ = [
    "KNOWN_TRANSFORMS",
    "AdagradTransform",
    "AdamTransform",
    "ParamContext",
    "RMSpropTransform",
    "SGDTransform",
    "UpdateTransform",
    "exact_transform_for",
]
