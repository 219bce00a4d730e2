"""``topk_gating``: input checks and the choice between the torch and Triton implementations."""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from .output import GatingOutput
from .reference import reference_topk_gating

__all__ = ["BACKEND_ENV_VAR", "Backend", "resolve_backend", "topk_gating", "triton_available"]

Backend = Literal["auto", "torch", "triton"]
#: Environment variable that overrides ``backend="auto"`` process-wide ("torch" or "triton").
BACKEND_ENV_VAR = "PUB_OPTIM_GATING_BACKEND"
_BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_HINT = "install it with: pip install 'pub-optim[triton]'"


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set: Triton kernels then run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(logits: torch.Tensor, backend: str = "auto") -> str:
    """The implementation ``topk_gating`` runs for ``logits`` and the requested ``backend``.

    ``"auto"`` (unless overridden by the ``PUB_OPTIM_GATING_BACKEND`` environment variable) picks
    Triton for CUDA tensors of dtype float32/float16/bfloat16 when triton is importable, and torch
    otherwise; it never picks Triton for CPU tensors. ``"triton"`` raises ``ImportError`` without
    triton, and ``RuntimeError`` for CPU tensors unless ``TRITON_INTERPRET=1`` is set (the Triton
    interpreter, for tests) or for float64 inputs (use the torch path).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
        if forced and forced != "auto":
            if forced not in _BACKENDS:
                raise ValueError(f"{BACKEND_ENV_VAR} must be one of {_BACKENDS}, got {forced!r}")
            return resolve_backend(logits, forced)
        use_triton = logits.is_cuda and logits.dtype != torch.float64 and triton_available()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError(f"backend='triton' needs the triton package; {_TRITON_HINT}")
        if logits.dtype == torch.float64:
            raise RuntimeError("backend='triton' does not take float64 logits; use backend='torch'")
        if not logits.is_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; CPU tensors run only under the Triton "
                "interpreter (set TRITON_INTERPRET=1), otherwise use backend='torch'"
            )
    return backend


def _check_inputs(logits: torch.Tensor, k: int, task_bias: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [N, E]")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    n, e = logits.shape
    if e < 1:
        raise ValueError("logits must have at least one expert column")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e:
        raise ValueError(f"k must be an int in [1, E={e}], got {k!r}")
    if task_bias is None:
        return
    if not isinstance(task_bias, torch.Tensor) or task_bias.dtype not in _FLOAT_DTYPES:
        raise TypeError("task_bias must be a floating-point tensor")
    if tuple(task_bias.shape) not in ((e,), (n, e)):
        raise ValueError(f"task_bias must have shape [E] or [N, E], got {tuple(task_bias.shape)}")
    if task_bias.device != logits.device:
        raise ValueError("task_bias must be on the same device as logits")


def topk_gating(
    logits: torch.Tensor,
    k: int,
    task_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    backend: Backend = "auto",
) -> GatingOutput:
    """Softmax top-k routing with the statistics of the auxiliary losses and dispatch metadata.

    Args:
        logits: router logits ``[N, E]`` (float32/float16/bfloat16, computed in float32; float64
            is computed in float64 on the torch path, for ``gradcheck``).
        k: experts per example, ``1 <= k <= E``.
        task_bias: optional per-task bias added to the logits before the softmax, ``[E]`` or
            ``[N, E]``; gradients flow to it.
        renormalize: rescale the ``k`` selected probabilities to sum to 1.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`resolve_backend`).

    Returns:
        A :class:`GatingOutput`. Router logits mean ``logits + task_bias``. NaN counts as
        ``-inf``; a row with ``+inf`` entries gives them equal probability and 0 elsewhere; a row
        with no finite and no ``+inf`` entry is uniform; such rows pass no gradient. Experts are
        ranked by router logit (equivalently probability), ties to the lowest expert id, so the
        ids of a row are distinct and the weights finite for every input. The torch and Triton
        backends implement identical semantics.
    """
    _check_inputs(logits, k, task_bias)
    chosen = resolve_backend(logits, backend)
    if chosen == "triton":
        from .triton_ops import triton_topk_gating

        return triton_topk_gating(logits, k, task_bias=task_bias, renormalize=renormalize)
    return reference_topk_gating(logits, k, task_bias=task_bias, renormalize=renormalize)
