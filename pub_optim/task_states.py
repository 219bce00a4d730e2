"""One optimizer state per task for the shared parameters (``PUB(state="per_task")``).

The idea of AdaTask (Yang et al., "AdaTask: A Task-aware Adaptive Learning Rate Approach to
Multi-task Learning", AAAI 2023): with one shared state, an adaptive optimizer's per-task look-ahead
``T(g_k; S)`` is dominated by the moments that all tasks wrote into ``S``; with one state per task,
``d_k = T(g_k; S_k)`` is what task ``k`` alone would do, and each ``S_k`` advances with its own
``g_k``. Task-specific parameters keep the wrapped optimizer's ordinary state.

:class:`TaskStates` holds the K stores (``{param: state dict}``, in the wrapped optimizer's own
state format), creates a task's state for a parameter from the optimizer's state at that moment (so
that ``Adagrad``'s constructor state and any state written before the switch carry over), and saves
them by parameter index, as ``torch.optim.Optimizer.state_dict`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .transforms.base import StateStore


class TaskStates:
    """K per-task optimizer states of the shared parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.stores: list[dict[Tensor, dict[str, Any]]] = []

    def ensure(self, num_tasks: int, params: Sequence[Tensor]) -> list[StateStore]:
        """The K stores, each holding a state for every one of ``params`` (new ones start from a
        copy of the wrapped optimizer's state of that parameter, empty if it has none)."""
        if self.stores and len(self.stores) != num_tasks:
            raise RuntimeError(
                f"PUB(state='per_task') holds the states of {len(self.stores)} tasks, and this "
                f"step has {num_tasks}"
            )
        while len(self.stores) < num_tasks:
            self.stores.append({})
        for p in params:
            for store in self.stores:
                if p not in store:
                    own = self.optimizer.state.get(p)
                    store[p] = copy.deepcopy(own) if own else {}
        return list(self.stores)

    def numel(self) -> int:
        """Values held in tensors of all the per-task states (their memory, in elements)."""
        return sum(
            v.numel()
            for store in self.stores
            for state in store.values()
            for v in state.values()
            if isinstance(v, Tensor)
        )

    def state_dict(self) -> list[dict[int, dict[str, Any]]]:
        """Per task, ``{parameter index: state}`` with the indices of the wrapped optimizer's
        ``state_dict`` (its parameters in ``param_groups`` order); tensors are not copied."""
        index = _param_index(self.optimizer)
        return [
            {index[id(p)]: state for p, state in store.items() if id(p) in index}
            for store in self.stores
        ]

    @staticmethod
    def check_loadable(
        optimizer: torch.optim.Optimizer, saved: Sequence[dict[Any, dict[str, Any]]]
    ) -> None:
        """Raise ``ValueError`` if ``saved`` (:meth:`state_dict`) does not fit ``optimizer``."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for k, task in enumerate(saved):
            for key, state in task.items():
                i = int(key)
                if not 0 <= i < len(params):
                    raise ValueError(
                        f"the per-task state of task {k} names parameter {i}, and the optimizer "
                        f"has {len(params)} parameters: the checkpoint is of another model"
                    )
                for name, value in state.items():
                    wrong = isinstance(value, Tensor) and value.dim() > 0
                    if wrong and value.shape != params[i].shape:
                        raise ValueError(
                            f"the per-task state {name!r} of task {k}, parameter {i} has "
                            f"shape {tuple(value.shape)}, the parameter "
                            f"{tuple(params[i].shape)}: the checkpoint is of another model"
                        )

    def load_state_dict(self, saved: Sequence[dict[Any, dict[str, Any]]]) -> None:
        """Replace the stores with ``saved`` (tensors cast and moved like torch's optimizers do:
        to each parameter's device, floating state to its dtype; ``step`` counters kept)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        stores: list[dict[Tensor, dict[str, Any]]] = []
        for task in saved:
            store: dict[Tensor, dict[str, Any]] = {}
            for key, state in task.items():
                p = params[int(key)]
                store[p] = {name: _cast(p, name, value) for name, value in state.items()}
            stores.append(store)
        self.stores = stores


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _cast(param: Tensor, name: str, value: Any) -> Any:
    if not isinstance(value, Tensor):
        return copy.deepcopy(value)
    if name == "step":  # torch keeps step counters as they are (float32, on CPU unless capturable)
        return value.clone()
    if value.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device).clone()
    return value.to(device=param.device).clone()
