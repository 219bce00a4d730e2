"""The interface every ranking model implements, and small building blocks.

A model is a plain :class:`torch.nn.Module` (no Lightning) with

* ``task_names``: the tasks, in label-column order;
* ``forward(batch, tasks=None) -> dict[task, logits [B]]``; ``tasks`` (a sequence of task names)
  restricts the output, and the task-specific computation, to those tasks (serving one task);
* ``shared_parameters()``: the parameters that more than one task's loss reaches (what
  :class:`pub_optim.PUB` balances; passed as ``shared_params=``);
* ``task_parameters(task)``: the parameters that only ``task``'s loss reaches;
* ``aux_losses()``: per-task auxiliary losses of the last forward pass (load balancing and router
  z-loss for the sparse MoE; empty for dense models), added to that task's loss so that the
  per-task losses still sum to the total;
* ``expert_usage()``: per-expert routing mass of the last forward pass, one vector per group of
  experts (empty for models without experts); models that route per task also give each task's
  mass as group ``task_group(group, task)`` (``"<group>@<task>"``).

The partition is declared from the architecture (not discovered from autograd); the test suite
checks it against autograd: each task's loss must reach exactly the shared parameters plus its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch

#: Separates a group of experts from a task in ``expert_usage()`` keys: ``"<group>@<task>"``.
TASK_GROUP_SEP = "@"


def task_group(group: str, task: str) -> str:
    """The ``expert_usage()`` key of ``task``'s routing mass over the experts of ``group``."""
    return f"{group}{TASK_GROUP_SEP}{task}"


def mlp(
    in_dim: int, hidden: Sequence[int], dropout: float = 0.0, final_activation: bool = True
) -> nn.Sequential:
    """``Linear -> ReLU (-> Dropout)`` blocks; the last block's activation is optional."""
    layers: list[nn.Module] = []
    dim = in_dim
    for i, width in enumerate(hidden):
        layers.append(nn.Linear(dim, width))
        if final_activation or i < len(hidden) - 1:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        dim = width
    return nn.Sequential(*layers)


def out_dim(in_dim: int, hidden: Sequence[int]) -> int:
    return hidden[-1] if len(hidden) else in_dim


class Tower(nn.Module):
    """A task tower: an MLP followed by one logit."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.body = mlp(in_dim, hidden, dropout)
        self.head = nn.Linear(out_dim(in_dim, hidden), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).squeeze(-1)


def _unique(params: Iterator[nn.Parameter] | Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MultiTaskModel(nn.Module):
    """Base class: subclasses implement ``forward``, ``shared_modules`` and ``task_modules``."""

    task_names: tuple[str, ...]

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        names = tuple(task_names)
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"task_names must be non-empty and unique, got {names}")
        self.task_names = names

    # --- partition -----------------------------------------------------------------------------
    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        """Modules (or bare parameters) whose parameters every task's loss can reach."""
        raise NotImplementedError

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        """Modules (or bare parameters) whose parameters only ``task``'s loss reaches."""
        raise NotImplementedError

    @staticmethod
    def _params_of(items: Sequence[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for item in items:
            if isinstance(item, nn.Parameter):
                params.append(item)
            else:
                params.extend(item.parameters())
        return _unique(params)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters reached by more than one task's loss (balanced by PUB)."""
        return self._params_of(self.shared_modules())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters reached only by ``task``'s loss."""
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
        return self._params_of(self.task_modules(task))

    # --- auxiliary outputs of the last forward pass ----------------------------------------------
    def aux_losses(self) -> dict[str, Tensor]:
        """Per-task auxiliary losses of the last forward pass (empty for dense models)."""
        return {}

    def expert_usage(self) -> dict[str, Tensor]:
        """Per-expert routing mass of the last forward pass, keyed by expert group."""
        return {}

    def select_tasks(self, tasks: Sequence[str] | None) -> tuple[str, ...]:
        """The tasks a forward pass computes: all for ``None``, else ``tasks`` in model order.

        Raises ``KeyError`` for an unknown name and ``ValueError`` for an empty selection.
        """
        if tasks is None:
            return self.task_names
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; tasks are {self.task_names}")
        if not tasks:
            raise ValueError("tasks must name at least one task (or be None for all)")
        wanted = set(tasks)
        return tuple(t for t in self.task_names if t in wanted)

    def forward(  # pragma: no cover - abstract
        self, batch: Batch, tasks: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def stack_logits(logits: dict[str, Tensor], task_names: Sequence[str]) -> Tensor:
    """``[B, K]`` logits in ``task_names`` order."""
    return torch.stack([logits[t] for t in task_names], dim=1)
