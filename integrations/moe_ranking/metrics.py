"""Per-task ranking metrics (AUC, log loss) through torchmetrics, and expert-load statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torchmetrics import MeanMetric
    from torchmetrics.classification import BinaryAUROC
except ImportError as _exc:
    from ._extras import missing_extra

    raise missing_extra("torchmetrics", _exc, "the AUC and log-loss metrics") from _exc

from .models.base import TASK_GROUP_SEP


class TaskMetrics(nn.Module):
    """AUC and log loss per task, plus the mean AUC over tasks, for one split.

    Keys of :meth:`compute`: ``{prefix}/auc/{task}``, ``{prefix}/logloss/{task}`` and
    ``{prefix}/mean_auc``.
    """

    def __init__(self, task_names: Sequence[str], prefix: str) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.prefix = prefix
        self.auc = nn.ModuleDict({t: BinaryAUROC() for t in self.task_names})
        self.logloss = nn.ModuleDict({t: MeanMetric() for t in self.task_names})

    @torch.no_grad()
    def update(self, logits: dict[str, Tensor], labels: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch; with ``mask`` (bool ``[B, K]``) each task sees its own rows only."""
        for i, t in enumerate(self.task_names):
            y, z = labels[:, i], logits[t].float()
            if mask is not None:
                rows = mask[:, i]
                y, z = y[rows], z[rows]
                if y.numel() == 0:
                    continue
            self.auc[t].update(torch.sigmoid(z), y.long())
            self.logloss[t].update(F.binary_cross_entropy_with_logits(z, y, reduction="none"))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        aucs = []
        for t in self.task_names:
            auc = float(self.auc[t].compute())
            aucs.append(auc)
            out[f"{self.prefix}/auc/{t}"] = auc
            out[f"{self.prefix}/logloss/{t}"] = float(self.logloss[t].compute())
        out[f"{self.prefix}/mean_auc"] = sum(aucs) / len(aucs)
        return out

    def reset(self) -> None:
        for t in self.task_names:
            self.auc[t].reset()
            self.logloss[t].reset()


class ExpertLoad:
    """Accumulate per-expert routing mass over batches and summarise it.

    ``update`` takes a model's ``expert_usage()`` (a vector of routing mass per expert for each
    group of experts; ``<group>@<task>`` for one task's mass). ``compute`` gives, per group, each
    expert's share of the mass, the largest share, the number of *dead* experts: experts whose
    share is below ``dead_fraction / E`` (below a tenth of a uniform share by default; for the
    sparse MoE an expert that is never picked has share 0), and the routing entropy
    ``-sum_e share_e ln share_e`` in nats (``ln E`` for a uniform load, 0 when one expert takes
    everything).
    """

    def __init__(self, dead_fraction: float = 0.1) -> None:
        self.dead_fraction = dead_fraction
        self.mass: dict[str, Tensor] = {}

    def update(self, usage: dict[str, Tensor]) -> None:
        for group, mass in usage.items():
            mass = mass.detach().to("cpu", torch.float64)
            self.mass[group] = self.mass[group] + mass if group in self.mass else mass.clone()

    def reset(self) -> None:
        self.mass = {}

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, mass in self.mass.items():
            total = float(mass.sum())
            n = mass.numel()
            share = mass / total if total > 0 else torch.full_like(mass, math.nan)
            for i, s in enumerate(share.tolist()):
                out[f"experts/{group}/share_{i}"] = s
            out[f"experts/{group}/max_share"] = float(share.max())
            out[f"experts/{group}/dead"] = float((share < self.dead_fraction / n).sum())
            terms = torch.where(share > 0, -share * torch.log(share), torch.zeros_like(share))
            out[f"experts/{group}/entropy"] = float(terms.sum()) if total > 0 else math.nan
        return out


def task_shares(expert_load: Mapping[str, float]) -> dict[str, dict[str, list[float]]]:
    """Per group, per task, the experts' shares: ``{group: {task: [share_0, ...]}}``, read from
    :meth:`ExpertLoad.compute`'s ``experts/<group>@<task>/share_<i>`` entries."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for key, value in expert_load.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "experts" or not parts[2].startswith("share_"):
            continue
        group, sep, task = parts[1].partition(TASK_GROUP_SEP)
        if not sep:
            continue
        out.setdefault(group, {}).setdefault(task, {})[int(parts[2][len("share_") :])] = value
    return {
        g: {t: [shares[i] for i in sorted(shares)] for t, shares in tasks.items()}
        for g, tasks in out.items()
    }
