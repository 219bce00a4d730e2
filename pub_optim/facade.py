"""What an optimizer that wraps others needs of ``torch.optim.Optimizer`` without calling its
``__init__`` (its ``param_groups`` and ``state`` are someone else's): the hook registries that
``register_*_hook`` fill, and the patched ``step`` that runs the step hooks."""

from __future__ import annotations

from collections import OrderedDict

import torch

HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def init_facade(optimizer: torch.optim.Optimizer) -> None:
    """Empty hook registries and the step patch, as ``torch.optim.Optimizer.__init__`` sets."""
    for name in HOOK_REGISTRIES:
        setattr(optimizer, name, OrderedDict())
    optimizer._patch_step_function()
