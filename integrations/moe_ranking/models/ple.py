"""PLE: Progressive Layered Extraction (Tang, Liu, Zhao, Gong, "Progressive Layered Extraction
(PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

Each level is a CGC (Customized Gate Control) layer: task-specific experts per task plus shared
experts; task ``k``'s gate mixes (its own experts + the shared experts). Below the last level a
shared gate also mixes *all* experts of the level into the input of the next level's shared
experts. Stacking ``num_levels`` CGC layers gives PLE; ``num_levels=1`` is CGC alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch
from .base import MultiTaskModel, Tower, task_group
from .inputs import InputLayer
from .mmoe import Experts, gate_mix


class CGCLayer(nn.Module):
    """One extraction level. Expert order in ``usage``: shared experts, then each task's experts
    (the per-task usage of a task gate covers the shared experts and that task's own)."""

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_shared: int,
        num_specific: int,
        expert_hidden: Sequence[int],
        last: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.shared = Experts(in_dim, num_shared, expert_hidden, dropout)
        self.specific = nn.ModuleDict(
            {t: Experts(in_dim, num_specific, expert_hidden, dropout) for t in self.task_names}
        )
        self.task_gates = nn.ModuleDict(
            {t: nn.Linear(in_dim, num_specific + num_shared) for t in self.task_names}
        )
        total = num_shared + num_specific * len(self.task_names)
        self.shared_gate = None if last else nn.Linear(in_dim, total)
        self.num_shared, self.num_specific = num_shared, num_specific
        self.output_dim = self.shared.output_dim

    def forward(
        self, task_inputs: dict[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor, dict[str, Tensor]]:
        """(task outputs, next shared input, gate mass per expert, the same per task gate)."""
        shared_out = self.shared(shared_input)
        specific_out = {t: self.specific[t](task_inputs[t]) for t in self.task_names}
        total = self.num_shared + self.num_specific * len(self.task_names)
        usage = torch.zeros(total, device=shared_input.device)
        outputs, per_task = {}, {}
        for i, t in enumerate(self.task_names):
            experts = torch.cat([specific_out[t], shared_out], dim=1)
            outputs[t], weights = gate_mix(self.task_gates[t](task_inputs[t]), experts)
            w = weights.detach().sum(0)
            start = self.num_shared + i * self.num_specific
            mine = torch.zeros(total, device=shared_input.device)
            mine[start : start + self.num_specific] = w[: self.num_specific]
            mine[: self.num_shared] = w[self.num_specific :]
            per_task[t] = mine
            usage += mine
        next_shared = None
        if self.shared_gate is not None:
            every = torch.cat([shared_out, *(specific_out[t] for t in self.task_names)], dim=1)
            next_shared, weights = gate_mix(self.shared_gate(shared_input), every)
            usage += weights.detach().sum(0)
        return outputs, next_shared, usage, per_task


class PLE(MultiTaskModel):
    """Stacked CGC layers with a tower per task.

    Partition (derived from which outputs feed which): shared are the input layer, every shared
    expert and shared gate, the task-specific experts of every level but the last (the shared gate
    of their level mixes them into the next level's shared experts) and the task gates below the
    last two levels. Task ``k`` owns its experts at the last level, its gates at the last two
    levels and its tower. ``expert_usage()``: gate mass per expert of each level (``level<i>``)
    and of each task's gate (``level<i>@<task>``).
    """

    def __init__(
        self,
        inputs: InputLayer,
        task_names: Sequence[str],
        num_levels: int = 2,
        num_shared: int = 2,
        num_specific: int = 1,
        expert_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(task_names)
        if num_levels < 1 or num_shared < 1 or num_specific < 1:
            raise ValueError("PLE needs num_levels, num_shared and num_specific >= 1")
        self.inputs = inputs
        levels = []
        dim = inputs.output_dim
        for level in range(num_levels):
            layer = CGCLayer(
                dim, self.task_names, num_shared, num_specific, expert_hidden,
                last=level == num_levels - 1, dropout=dropout,
            )  # fmt: skip
            levels.append(layer)
            dim = layer.output_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict({t: Tower(dim, tower_hidden, dropout) for t in self.task_names})
        self._usage: dict[str, Tensor] = {}

    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        last = len(self.levels) - 1
        items: list[nn.Module | nn.Parameter] = [self.inputs]
        for index, layer in enumerate(self.levels):
            items.append(layer.shared)
            if layer.shared_gate is not None:
                items.append(layer.shared_gate)
            if index < last:
                items.extend(layer.specific.values())
            if index < last - 1:
                items.extend(layer.task_gates.values())
        return items

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        last = len(self.levels) - 1
        items: list[nn.Module | nn.Parameter] = [self.levels[last].specific[task]]
        items.extend(self.levels[i].task_gates[task] for i in range(max(0, last - 1), last + 1))
        items.append(self.towers[task])
        return items

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits of ``tasks`` (default all). Every level runs in full (below the last level all
        tasks' experts feed the shared gate); only the requested towers run."""
        selected = self.select_tasks(tasks)
        x = self.inputs(batch)
        task_inputs = {t: x for t in self.task_names}
        shared: Tensor | None = x
        usage = {}
        for index, layer in enumerate(self.levels):
            assert shared is not None
            task_inputs, shared, usage[f"level{index}"], per_task = layer(task_inputs, shared)
            for t in selected:
                usage[task_group(f"level{index}", t)] = per_task[t]
        self._usage = usage
        return {t: self.towers[t](task_inputs[t]) for t in selected}

    def expert_usage(self) -> dict[str, Tensor]:
        return dict(self._usage)
