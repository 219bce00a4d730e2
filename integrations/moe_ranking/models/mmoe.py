"""MMoE: Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships
in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018).

``n`` expert MLPs see the shared input; task ``k`` has its own softmax gate
``g_k(x) = softmax(W_k x)`` and tower input ``sum_i g_k(x)_i E_i(x)``. Dense: every expert runs for
every example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch
from .base import MultiTaskModel, Tower, mlp, out_dim, task_group
from .inputs import InputLayer


class Experts(nn.Module):
    """``n`` independent expert MLPs; output ``[B, n, width]``."""

    def __init__(self, in_dim: int, n: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"need at least one expert, got {n}")
        self.experts = nn.ModuleList(mlp(in_dim, hidden, dropout) for _ in range(n))
        self.output_dim = out_dim(in_dim, hidden)

    def __len__(self) -> int:
        return len(self.experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([e(x) for e in self.experts], dim=1)


def gate_mix(gate_logits: Tensor, expert_out: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax gate over experts; returns (mixture ``[B, width]``, gate weights ``[B, n]``)."""
    weights = torch.softmax(gate_logits, dim=-1)
    return torch.einsum("bn,bnd->bd", weights, expert_out), weights


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts.

    Partition: input layer + experts are shared; task ``k``'s gate and tower belong to task ``k``.
    ``expert_usage()`` gives the mean gate weight per expert (summed over the task gates, then
    normalised), i.e. each expert's share of the routing mass, and the same per task
    (``mmoe@<task>``). With ``tasks=`` only those tasks' gates and towers run (the experts always).
    """

    def __init__(
        self,
        inputs: InputLayer,
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(task_names)
        self.inputs = inputs
        self.experts = Experts(inputs.output_dim, num_experts, expert_hidden, dropout)
        self.gates = nn.ModuleDict(
            {t: nn.Linear(inputs.output_dim, num_experts) for t in self.task_names}
        )
        self.towers = nn.ModuleDict(
            {t: Tower(self.experts.output_dim, tower_hidden, dropout) for t in self.task_names}
        )
        self._usage: dict[str, Tensor] = {}

    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.inputs, self.experts]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.gates[task], self.towers[task]]

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        x = self.inputs(batch)
        expert_out = self.experts(x)
        logits, mass = {}, torch.zeros(len(self.experts), device=x.device)
        usage = {}
        for t in self.select_tasks(tasks):
            mixed, weights = gate_mix(self.gates[t](x), expert_out)
            logits[t] = self.towers[t](mixed)
            usage[task_group("mmoe", t)] = weights.detach().sum(0)
            mass = mass + usage[task_group("mmoe", t)]
        self._usage = {"mmoe": mass, **usage}
        return logits

    def expert_usage(self) -> dict[str, Tensor]:
        return dict(self._usage)
