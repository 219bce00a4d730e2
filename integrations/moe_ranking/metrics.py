"""Per-task metrics (AUC and log loss of binary tasks through torchmetrics, R² and RMSE of
regression tasks) and expert-load statistics."""

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

from .data.base import BINARY, REGRESSION
from .models.base import TASK_GROUP_SEP


def score_key(metrics: Mapping[str, float], task: str, prefix: str = "test") -> str:
    """The key of ``task``'s score in ``metrics`` (what :meth:`TaskMetrics.compute` returns):
    ``{prefix}/auc/{task}`` for a binary task, ``{prefix}/r2/{task}`` for a regression task."""
    auc = f"{prefix}/auc/{task}"
    return auc if auc in metrics else f"{prefix}/r2/{task}"


class _SquaredError:
    """Sums for the R² and RMSE of one regression task over a split, in float64."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        #: ``[sum y, sum y², sum (p - y)²]`` on the batches' device, read once in ``compute``.
        self.sums: Tensor | None = None

    def update(self, prediction: Tensor, target: Tensor) -> None:
        y, p = target.double(), prediction.double()
        self.n += int(y.numel())
        batch = torch.stack([y.sum(), (y * y).sum(), ((p - y) ** 2).sum()])
        self.sums = batch if self.sums is None else self.sums + batch

    def compute(self) -> tuple[float, float]:
        """``(r2, rmse)``; R² is ``1 - SSE / SST`` with the split's own label mean (NaN when the
        labels are constant or there are none)."""
        if self.n == 0 or self.sums is None:
            return float("nan"), float("nan")
        sum_y, sum_y2, sse = (float(v) for v in self.sums.cpu())
        sst = sum_y2 - sum_y * sum_y / self.n
        r2 = 1.0 - sse / sst if sst > 0 else float("nan")
        return r2, math.sqrt(sse / self.n)


class TaskMetrics(nn.Module):
    """Per-task metrics for one split, and their mean over tasks as the split's score.

    Keys of :meth:`compute`: for a binary task ``{prefix}/auc/{task}`` and
    ``{prefix}/logloss/{task}``, for a regression task ``{prefix}/r2/{task}`` and
    ``{prefix}/rmse/{task}`` (in label units); ``{prefix}/mean_score``, the mean over tasks of the
    AUC of binary tasks and the R² of regression tasks (what early stopping and model selection
    follow); and ``{prefix}/mean_auc`` when every task is binary, ``{prefix}/mean_r2`` when every
    task is a regression.
    """

    def __init__(
        self, task_names: Sequence[str], prefix: str, kinds: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.prefix = prefix
        self.kinds = tuple(kinds) if kinds is not None else (BINARY,) * len(self.task_names)
        if len(self.kinds) != len(self.task_names) or set(self.kinds) - {BINARY, REGRESSION}:
            raise ValueError(
                f"need 'binary' or 'regression' per task {self.task_names}, got {self.kinds}"
            )
        binary = [t for t, k in zip(self.task_names, self.kinds, strict=True) if k == BINARY]
        self.auc = nn.ModuleDict({t: BinaryAUROC() for t in binary})
        self.logloss = nn.ModuleDict({t: MeanMetric() for t in binary})
        self.squared_error = {
            t: _SquaredError()
            for t, k in zip(self.task_names, self.kinds, strict=True)
            if k == REGRESSION
        }

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
            if t in self.squared_error:
                self.squared_error[t].update(z, y)
                continue
            self.auc[t].update(torch.sigmoid(z), y.long())
            self.logloss[t].update(F.binary_cross_entropy_with_logits(z, y, reduction="none"))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        scores = []
        for t in self.task_names:
            if t in self.squared_error:
                r2, rmse = self.squared_error[t].compute()
                scores.append(r2)
                out[f"{self.prefix}/r2/{t}"] = r2
                out[f"{self.prefix}/rmse/{t}"] = rmse
                continue
            auc = float(self.auc[t].compute())
            scores.append(auc)
            out[f"{self.prefix}/auc/{t}"] = auc
            out[f"{self.prefix}/logloss/{t}"] = float(self.logloss[t].compute())
        mean = sum(scores) / len(scores)
        out[f"{self.prefix}/mean_score"] = mean
        if REGRESSION not in self.kinds:
            out[f"{self.prefix}/mean_auc"] = mean
        elif BINARY not in self.kinds:
            out[f"{self.prefix}/mean_r2"] = mean
        return out

    def reset(self) -> None:
        for t in self.auc:
            self.auc[t].reset()
            self.logloss[t].reset()
        for e in self.squared_error.values():
            e.reset()


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
