"""Pure-torch top-k gating: the reference semantics, and the path used on CPU.

Every quantity is differentiable by ordinary autograd, so this module is also the ground truth the
Triton kernels are tested against (values and logits gradients).

Semantics (shared with the Triton kernels, see :func:`sanitize_router_logits`):

* ``x = float(logits) + float(task_bias)``, computed in float32 (float64 for float64 inputs).
* Non-finite values: NaN counts as ``-inf``. In a row holding ``+inf``, the ``+inf`` entries share
  the probability mass equally and every other entry gets 0 (the limit of the softmax as those
  logits grow together). A row that is entirely ``-inf``/NaN gets uniform probabilities. Such rows
  contribute no gradient to the logits (their probabilities do not depend on them).
* Selection ranks experts by the sanitised logit, which is the ranking by probability (softmax is
  monotone) made independent of ``exp`` rounding; equal logits go to the lowest expert id
  (``-0.0`` equals ``+0.0``). Ids within a row are therefore always distinct.
* ``z_loss`` and the probabilities use the sanitised logits, so they are finite for every input.

Dispatch metadata is computed from the ids with torch ops: ``bincount`` for the counts, ``cumsum``
for the offsets and a stable ``sort`` of the flat expert ids for the order.
"""

from __future__ import annotations

import torch

from .output import GatingOutput

__all__ = ["compute_dtype", "reference_topk_gating", "sanitize_router_logits", "select_topk"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gating is computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sanitize_router_logits(x: torch.Tensor) -> torch.Tensor:
    """Map router logits ``[N, E]`` to logits whose row maximum is finite (same softmax semantics).

    NaN becomes ``-inf``; a row holding ``+inf`` becomes ``0`` at its ``+inf`` entries and ``-inf``
    elsewhere; a row with no finite entry and no ``+inf`` becomes all zeros. Rows with a finite
    maximum are returned unchanged (and keep their gradient).
    """
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(torch.isnan(x), neg_inf, x)
    row_max = x.detach().amax(dim=1, keepdim=True)
    pos_inf_row = row_max == float("inf")
    neg_inf_row = row_max == float("-inf")
    y = torch.where(pos_inf_row, torch.where(x == float("inf"), zero, neg_inf), x)
    return torch.where(neg_inf_row, zero, y)


def select_topk(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` largest entries per row of sanitised logits ``y``.

    Descending order, equal values to the lowest index (a stable descending sort). ``-0.0`` is
    mapped to ``+0.0`` first so that the two zeros tie whatever sort the device uses.
    """
    key = y.detach()
    key = torch.where(key == 0, torch.zeros((), dtype=key.dtype, device=key.device), key)
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]


def reference_topk_gating(
    logits: torch.Tensor,
    k: int,
    task_bias: torch.Tensor | None = None,
    renormalize: bool = True,
) -> GatingOutput:
    """Top-k softmax gating in plain torch (inputs already validated by ``topk_gating``)."""
    n, e = logits.shape
    cdt = compute_dtype(logits.dtype)
    x = logits.to(cdt)
    if task_bias is not None:
        x = x + task_bias.to(cdt)
    y = sanitize_router_logits(x)
    probs = torch.softmax(y, dim=1)
    lse = torch.logsumexp(y, dim=1)

    ids = select_topk(y, k)
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)

    counts = torch.bincount(ids.reshape(-1), minlength=e)
    mean_probs = probs.sum(dim=0) / max(n, 1)
    z_loss = lse.square().sum() / max(n, 1)
    load = counts.to(cdt) / max(n * k, 1)
    lb_loss = e * (load * mean_probs).sum()
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=logits.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    return GatingOutput(
        weights=weights,
        expert_ids=ids,
        expert_counts=counts,
        mean_probs=mean_probs,
        z_loss=z_loss,
        load_balancing_loss=lb_loss,
        expert_offsets=offsets,
        dispatch_order=order,
        backend="torch",
    )
