"""Shared-Bottom: one shared MLP on the input, one tower per task (Caruana, "Multitask Learning",
Machine Learning 28, 1997; the baseline of the MMoE and PLE papers)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..data.base import Batch
from .base import MultiTaskModel, Tower, mlp, out_dim
from .inputs import InputLayer


class SharedBottom(MultiTaskModel):
    """Input layer and bottom MLP shared by all tasks; a tower per task.

    Partition: input layer + bottom are shared; each tower belongs to its task.
    """

    def __init__(
        self,
        inputs: InputLayer,
        task_names: Sequence[str],
        bottom_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(task_names)
        self.inputs = inputs
        self.bottom = mlp(inputs.output_dim, bottom_hidden, dropout)
        width = out_dim(inputs.output_dim, bottom_hidden)
        self.towers = nn.ModuleDict(
            {t: Tower(width, tower_hidden, dropout) for t in self.task_names}
        )

    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.inputs, self.bottom]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.towers[task]]

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        h = self.bottom(self.inputs(batch))
        return {t: self.towers[t](h) for t in self.select_tasks(tasks)}
