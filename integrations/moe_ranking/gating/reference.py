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
* ``z_loss`` and the probabilities use the sanitised logits, so they are finite for every input:
  ``z_loss`` is the mean of ``lse^2`` saturated at the compute dtype's largest finite value
  (reached for router logits beyond ~1.8e19 in float32), where it passes no gradient.

Dispatch metadata is computed from the ids with torch ops: ``bincount`` for the counts, ``cumsum``
for the offsets and a stable ``sort`` of the flat expert ids for the order.
"""

from __future__ import annotations

import torch

from .output import GatingOutput

__all__ = [
    "compute_dtype",
    "reference_topk_gating",
    "sanitize_router_logits",
    "saturated_z_loss",
    "select_topk",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gating is computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sanitize_router_logits(x: torch.Tensor) -> torch.Tensor:
    """Map router logits ``[N, E]`` to logits whose row maximum is finite (same softmax semantics).

    NaN becomes ``-inf``; a row holding ``+inf`` becomes ``0`` at its ``+inf`` entries and ``-inf``
    elsewhere; a row with no finite entry and no ``+inf`` becomes all zeros. Rows with a finite
    maximum are returned unchanged (and keep their gradient).
    """
    inf = float("inf")
    x = torch.nan_to_num(x, nan=-inf, posinf=inf, neginf=-inf)
    row_max = x.detach().amax(dim=1, keepdim=True)
    # The common all-finite case skips the masking; the check is a host synchronisation, so only
    # on CPU, and not while torch.compile traces (it would break the graph).
    if (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and bool(torch.isfinite(row_max).all())
    ):
        return x
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    neg_inf = torch.full((), -inf, dtype=x.dtype, device=x.device)
    y = torch.where(row_max == inf, torch.where(x == inf, zero, neg_inf), x)
    return torch.where(row_max == -inf, zero, y)


def saturated_z_loss(lse: torch.Tensor, n: int) -> torch.Tensor:
    """``mean(lse^2)`` over ``n`` rows, at most the largest finite value of ``lse``'s dtype.

    The squares are summed in float64, so that only a mean that does not fit saturates; a
    saturated value has zero gradient (no ``inf * 0`` in the backward pass).
    """
    largest = torch.finfo(lse.dtype).max
    mean = lse.to(torch.float64).square().sum() / max(n, 1)
    return mean.clamp(max=largest).to(lse.dtype)


def select_topk(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` largest entries per row of sanitised logits ``y``.

    Descending order, equal values to the lowest index, ``-0.0`` equal to ``+0.0``. For float32,
    each (value, index) pair is packed into a unique int64 key, the float as a sign-magnitude
    integer turned two's complement (order-preserving, both zeros map to 0) in the high half and
    ``E - 1 - index`` in the low half, and ``torch.topk`` runs on the keys; float64 uses a stable
    descending sort.
    """
    key = y.detach()
    if key.dtype != torch.float32:
        key = torch.where(key == 0, torch.zeros((), dtype=key.dtype, device=key.device), key)
        return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    bits = key.view(torch.int32)
    sign = bits >> 31  # 0 or -1
    ordered = (((bits & 0x7FFFFFFF) ^ sign) - sign).to(torch.int64)
    low = torch.arange(key.shape[1] - 1, -1, -1, device=key.device)
    return torch.topk((ordered << 32) | low, k, dim=1, sorted=True).indices


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
    z_loss = saturated_z_loss(lse, n)
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
