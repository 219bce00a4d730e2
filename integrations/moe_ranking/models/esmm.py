"""ESMM: Entire Space Multi-task Model (Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, "Entire Space
Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate", SIGIR 2018).

For funnel tasks (impression -> click -> conversion) the backbone predicts pCTR and pCVR (the
post-click conversion rate, never supervised directly); the model outputs pCTR and
pCTCVR = pCTR x pCVR, both trained over the whole impression space. This removes the sample
selection bias of training pCVR on clicked impressions only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import Batch
from .base import TASK_GROUP_SEP, MultiTaskModel


def product_logit(logit_a: Tensor, logit_b: Tensor) -> Tensor:
    """``logit(sigmoid(a) * sigmoid(b))``, computed in log space (stable for large |a|, |b|)."""
    log_p = F.logsigmoid(logit_a) + F.logsigmoid(logit_b)
    log_p = log_p.clamp(max=-1e-7)  # p < 1 so that log(1 - p) is finite
    log_one_minus_p = torch.log(-torch.expm1(log_p))
    return log_p - log_one_minus_p


class ESMM(MultiTaskModel):
    """Wrap a backbone with tasks ``(ctr, cvr_head)`` into a model with tasks ``(ctr, ctcvr)``.

    Partition: the ``ctcvr`` loss reaches the CTR head too (through the product), so the
    backbone's ``ctr``-specific parameters become shared; ``ctcvr`` owns the backbone's CVR-head
    parameters; ``ctr`` owns nothing of its own.
    """

    def __init__(
        self, backbone: MultiTaskModel, ctr_task: str, ctcvr_task: str, cvr_head: str = "cvr"
    ) -> None:
        super().__init__((ctr_task, ctcvr_task))
        if tuple(backbone.task_names) != (ctr_task, cvr_head):
            raise ValueError(
                f"the ESMM backbone must have tasks ({ctr_task!r}, {cvr_head!r}), "
                f"got {backbone.task_names}"
            )
        self.backbone = backbone
        self.ctr_task, self.ctcvr_task, self.cvr_head = ctr_task, ctcvr_task, cvr_head

    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        return [*self.backbone.shared_modules(), *self.backbone.task_modules(self.ctr_task)]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        if task == self.ctr_task:
            return []
        return self.backbone.task_modules(self.cvr_head)

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits of ``tasks`` (default both); CTCVR needs the backbone's CTR and CVR heads, CTR
        alone only the CTR head."""
        selected = self.select_tasks(tasks)
        heads = [self.ctr_task] if selected == (self.ctr_task,) else None
        out = self.backbone(batch, tasks=heads)
        logits = {}
        if self.ctr_task in selected:
            logits[self.ctr_task] = out[self.ctr_task]
        if self.ctcvr_task in selected:
            logits[self.ctcvr_task] = product_logit(out[self.ctr_task], out[self.cvr_head])
        return logits

    def predict_cvr(self, batch: Batch) -> Tensor:
        """Post-click conversion probability pCVR (not supervised directly)."""
        return torch.sigmoid(self.backbone(batch)[self.cvr_head])

    def aux_losses(self) -> dict[str, Tensor]:
        names = {self.ctr_task: self.ctr_task, self.cvr_head: self.ctcvr_task}
        return {names[t]: loss for t, loss in self.backbone.aux_losses().items()}

    def expert_usage(self) -> dict[str, Tensor]:
        """The backbone's usage; a per-task group of the CVR head is reported as CTCVR's."""
        suffix = TASK_GROUP_SEP + self.cvr_head
        return {
            (k[: -len(suffix)] + TASK_GROUP_SEP + self.ctcvr_task if k.endswith(suffix) else k): v
            for k, v in self.backbone.expert_usage().items()
        }
