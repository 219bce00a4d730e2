"""Per-task losses, over every row or, with a task mask, over each task's own rows.

A binary task's loss is the binary cross-entropy of its logit, a regression task's the squared
error of its output (see ``MultiTaskData.task_kinds``).

GRec (Wang et al., "Efficient Multi-Task Learning via Generalist Recommender", CIKM 2023) frames
tasks as scenarios: a row (an impression in one scenario) belongs to some tasks only, and a task
is trained on its own rows. A batch then carries ``task_mask`` (bool ``[B, K]``, True where row
``b`` belongs to task ``k``; see :mod:`integrations.moe_ranking.data.base`), and task ``k``'s loss
is the mean loss over the rows with ``task_mask[:, k]``.

A task with no row in the batch gets the loss 0, computed from the logits (``sum(loss * mask) /
max(sum(mask), 1)``): it stays a tensor in the autograd graph, with zero gradient, so per-task
code (PUB's per-task look-aheads, the logs) sees every task at every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from .data.base import BINARY, REGRESSION

#: Per-row loss of each task kind (``reduction`` as in torch.nn.functional).
_LOSSES = {BINARY: F.binary_cross_entropy_with_logits, REGRESSION: F.mse_loss}


def task_bce(
    logits: Mapping[str, Tensor],
    labels: Tensor,
    task_names: Sequence[str],
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Binary cross-entropy per task: the mean over all rows, or over the task's rows of ``mask``
    (:func:`task_losses` with every task binary).

    Args:
        logits: ``{task: [B]}``.
        labels: ``[B, K]`` 0/1 in ``task_names`` order.
        task_names: the tasks, in label-column order.
        mask: optional bool ``[B, K]``; row ``b`` counts for task ``k`` where it is True.
    """
    return task_losses(logits, labels, task_names, mask)


def task_losses(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    task_names: Sequence[str],
    mask: Tensor | None = None,
    kinds: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """The loss of every task by its kind: binary cross-entropy of the logit for a binary task,
    the mean squared error of the output for a regression task; the mean over all rows, or over
    the task's rows of ``mask``.

    Args:
        outputs: ``{task: [B]}`` (logits of binary tasks, predictions of regression tasks).
        labels: ``[B, K]`` in ``task_names`` order.
        task_names: the tasks, in label-column order.
        mask: optional bool ``[B, K]``; row ``b`` counts for task ``k`` where it is True.
        kinds: ``"binary"`` or ``"regression"`` per task (None: every task is binary).
    """
    kinds = tuple(kinds) if kinds is not None else (BINARY,) * len(task_names)
    if len(kinds) != len(task_names):
        raise ValueError(f"need one task kind per task {tuple(task_names)}, got {kinds}")
    losses = {}
    for i, (t, kind) in enumerate(zip(task_names, kinds, strict=True)):
        if kind not in _LOSSES:
            raise ValueError(f"unknown task kind {kind!r} for task {t!r}")
        loss = _LOSSES[kind]
        if mask is None:
            losses[t] = loss(outputs[t], labels[:, i])
            continue
        per_row = loss(outputs[t], labels[:, i], reduction="none")
        rows = mask[:, i].to(per_row.dtype)
        losses[t] = (per_row * rows).sum() / rows.sum().clamp(min=1.0)
    return losses
