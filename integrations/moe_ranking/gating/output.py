"""The result type of :func:`~integrations.moe_ranking.gating.topk_gating`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GatingOutput:
    """Routing decision for ``N`` examples over ``E`` experts with ``k`` slots each.

    Attributes:
        weights: ``[N, k]`` float32 (float64 for float64 inputs), differentiable: the router
            probabilities of the selected experts, renormalised to sum to 1 over the ``k`` slots
            when ``renormalize=True``.
        expert_ids: ``[N, k]`` int64, in descending probability; ties go to the lowest expert id.
            The ids of one row are distinct.
        expert_counts: ``[E]`` int64, how many (example, slot) pairs picked each expert
            (not differentiable).
        mean_probs: ``[E]`` float32, the router probability of each expert averaged over the
            ``N`` examples (differentiable).
        z_loss: scalar, ``mean_n logsumexp(router_logits_n)^2``: the router z-loss of ST-MoE
            (Zoph et al. 2022), differentiable.
        load_balancing_loss: scalar, ``E * sum_e (counts_e / (N k)) * mean_probs_e``: the
            auxiliary load-balancing loss of the Switch Transformer (Fedus et al. 2021) extended
            to ``k`` slots, differentiable through ``mean_probs`` only.
        expert_offsets: ``[E + 1]`` int64, exclusive prefix sum of ``expert_counts``
            (``expert_offsets[-1] == N * k``).
        dispatch_order: ``[N * k]`` int64 indices into the flattened (example, slot) pairs
            (flat index ``n * k + slot``), grouped by expert: the pairs routed to expert ``e`` are
            ``dispatch_order[expert_offsets[e]:expert_offsets[e + 1]]``, in ascending flat index.
        backend: ``"torch"`` or ``"triton"``: the implementation that produced this output.
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor
    expert_counts: torch.Tensor
    mean_probs: torch.Tensor
    z_loss: torch.Tensor
    load_balancing_loss: torch.Tensor
    expert_offsets: torch.Tensor
    dispatch_order: torch.Tensor
    backend: str = "torch"
