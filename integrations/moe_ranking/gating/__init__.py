"""Fused top-k softmax gating for the sparse MoE: a torch reference and Triton kernels.

``from integrations.moe_ranking.gating import topk_gating`` never imports triton; the Triton
backend is imported on first use (``pip install 'pub-optim[triton]'``). See ``docs/kernels.md``.
"""

from .dispatch import BACKEND_ENV_VAR, resolve_backend, topk_gating, triton_available
from .output import GatingOutput

__all__ = ["BACKEND_ENV_VAR", "GatingOutput", "resolve_backend", "topk_gating", "triton_available"]
