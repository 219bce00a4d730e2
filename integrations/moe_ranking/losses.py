"""Per-task losses, over every row or, with a task mask, over each task's own rows.

GRec (Wang et al., "Efficient Multi-Task Learning via Generalist Recommender", CIKM 2023) frames
tasks as scenarios: a row (an impression in one scenario) belongs to some tasks only, and a task
is trained on its own rows. A batch then carries ``task_mask`` (bool ``[B, K]``, True where row
``b`` belongs to task ``k``; see :mod:`integrations.moe_ranking.data.base`), and task ``k``'s loss
is the mean binary cross-entropy over the rows with ``task_mask[:, k]``.

A task with no row in the batch gets the loss 0, computed from the logits (``sum(bce * mask) /
max(sum(mask), 1)``): it stays a tensor in the autograd graph, with zero gradient, so per-task
code (PUB's per-task look-aheads, the logs) sees every task at every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor


def task_bce(
    logits: Mapping[str, Tensor],
    labels: Tensor,
    task_names: Sequence[str],
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Binary cross-entropy per task: the mean over all rows, or over the task's rows of ``mask``.

    Args:
        logits: ``{task: [B]}``.
        labels: ``[B, K]`` 0/1 in ``task_names`` order.
        task_names: the tasks, in label-column order.
        mask: optional bool ``[B, K]``; row ``b`` counts for task ``k`` where it is True.
    """
    losses = {}
    for i, t in enumerate(task_names):
        if mask is None:
            losses[t] = F.binary_cross_entropy_with_logits(logits[t], labels[:, i])
            continue
        rows = mask[:, i].to(logits[t].dtype)
        per_row = F.binary_cross_entropy_with_logits(logits[t], labels[:, i], reduction="none")
        losses[t] = (per_row * rows).sum() / rows.sum().clamp(min=1.0)
    return losses
