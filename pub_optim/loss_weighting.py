"""Loss-weighting baselines that need no per-task gradients: one backward pass of a weighted loss.

* :class:`UncertaintyWeighting`: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to
  Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv:1705.07115): learnable
  per-task log-variances trained together with the model.
* :class:`FAMO`: Liu, Liang, Chen, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
  (arXiv:2306.03792): task logits updated once per step from the change of the log-losses.

Both are used the same way: ``total = weighting.combine(losses)``, ``total.backward()``, the model
optimizer's ``step()``; FAMO then needs ``weighting.update(new_losses)`` with the task losses of
the same batch re-evaluated after the step. ``weights()`` gives the current weights on the task
gradients, for logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

TaskLosses = Sequence[Tensor] | Mapping[str, Tensor]
UncertaintyKind = Literal["classification", "regression"]


def _stack_losses(losses: TaskLosses | Tensor, num_tasks: int) -> Tensor:
    """The K scalar losses as one ``[K]`` tensor (still attached to the graph)."""
    if isinstance(losses, Mapping):
        values = list(losses.values())
    elif isinstance(losses, (Sequence, Tensor)):
        values = list(losses)
    else:
        raise TypeError(
            "losses must be a sequence of scalar tensors or a {name: loss} mapping, "
            f"got {type(losses).__name__}"
        )
    if len(values) != num_tasks:
        raise ValueError(f"expected {num_tasks} task losses, got {len(values)}")
    for k, loss in enumerate(values):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"task loss {k} must be a scalar tensor, got {loss!r}")
    return torch.stack([loss.reshape(()) for loss in values])


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall et al., CVPR 2018).

    One learnable ``s_k = log sigma_k^2`` per task (initialised to ``init``, default 0), trained
    by the model's optimizer (this is an ``nn.Module``: put it in the module whose parameters the
    optimizer gets). The combined loss is

    * ``kind="classification"`` (default; the paper's Eq. 10-12 for a softmax / sigmoid
      likelihood with temperature ``sigma^2``): ``sum_k exp(-s_k) L_k + s_k / 2``
      (``L / sigma^2 + log sigma``);
    * ``kind="regression"`` (Gaussian likelihood): ``sum_k exp(-s_k) L_k / 2 + s_k / 2``
      (``L / (2 sigma^2) + log sigma``). This is the form that LibMTL and the Nash-MTL / FAMO code
      use for every task.

    The weight of task ``k``'s gradient is ``exp(-s_k)`` (classification) or ``exp(-s_k) / 2``
    (regression); minimising over ``s_k`` alone gives ``exp(-s_k) = 1 / (2 L_k)``
    (classification) or ``1 / L_k`` (regression), so tasks with larger losses get smaller weights.
    """

    def __init__(
        self, num_tasks: int, kind: UncertaintyKind = "classification", init: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
        self.num_tasks = num_tasks
        self.kind: UncertaintyKind = kind
        self.factor = 1.0 if kind == "classification" else 0.5
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init)))

    def weights(self) -> Tensor:
        """Current weights on the task losses, ``factor * exp(-s_k)`` (detached, ``[K]``)."""
        return (self.factor * torch.exp(-self.log_vars)).detach()

    def combine(self, losses: TaskLosses) -> Tensor:
        """``sum_k factor * exp(-s_k) L_k + s_k / 2`` (differentiable in the losses and ``s``)."""
        stacked = _stack_losses(losses, self.num_tasks)
        s = self.log_vars.to(stacked.dtype)
        return (self.factor * torch.exp(-s) * stacked + 0.5 * s).sum()

    def forward(self, losses: TaskLosses) -> Tensor:
        return self.combine(losses)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, kind={self.kind!r}"


class FAMO:
    """Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023, Algorithm 1).

    Task weights ``z = softmax(xi)`` over K logits ``xi`` (initialised to 0). Each step:

    1. ``combine(losses)`` returns ``sum_k z_k log(L_k - m_k + eps) / c`` with
       ``c = sum_k z_k / (L_k - m_k + eps)`` (``z`` and ``c`` constant), so the model receives
       ``sum_k w_k grad L_k`` with ``w_k = z_k / (c (L_k - m_k + eps))``, which sum to one
       (:meth:`weights`): the gradient of the z-weighted log-losses, rescaled;
    2. the model optimizer steps;
    3. ``update(new_losses)`` with the losses of the *same batch* after the step: with
       ``delta_k = log(L_k - m_k + eps) - log(L'_k - m_k + eps)`` (each task's log-loss
       improvement), the logits take one Adam step (learning rate ``lr``, weight decay ``gamma``)
       on the gradient ``J_softmax(xi)^T delta``: tasks that improved less than the others gain
       weight.

    Defaults are those of the reference implementation (``famo.py`` in github.com/Cranial-XIX/FAMO):
    ``lr = 0.025``, ``gamma = 0.01``, ``eps = 1e-8``, minimum losses ``m_k = 0``. The reference
    example also clips the shared gradient norm to 1 (``max_norm``); that is a training choice
    outside the weighting and is not done here.

    The cost per step is O(K) on top of the plain step (no per-task gradients), plus whatever it
    costs to re-evaluate the losses for :meth:`update` (the reference code runs one extra forward
    pass without gradients on the same batch).

    Args:
        num_tasks: K.
        lr: learning rate of the logits (``beta`` in the paper).
        gamma: weight decay of the logits (the paper's regularisation coefficient).
        eps: added to every ``L_k - m_k`` before the logarithm.
        min_losses: ``m_k``, a lower bound of each loss (default 0, fine for cross-entropies).
        device: where the logits live.
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 0.01,
        eps: float = 1e-8,
        min_losses: Sequence[float] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be non-negative, got {gamma!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        self.num_tasks = num_tasks
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.logits = torch.zeros(num_tasks, device=device, requires_grad=True)
        if min_losses is None:
            self.min_losses = torch.zeros(num_tasks, device=device)
        else:
            self.min_losses = torch.as_tensor(min_losses, dtype=torch.float32, device=device)
            if self.min_losses.shape != (num_tasks,):
                raise ValueError(f"min_losses must have {num_tasks} entries")
        self.optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        self._prev: Tensor | None = None
        self._weights: Tensor | None = None

    def z(self) -> Tensor:
        """``softmax(xi)``, the task distribution FAMO maintains (detached, ``[K]``)."""
        return torch.softmax(self.logits.detach(), dim=-1)

    def weights(self) -> Tensor:
        """Weights on the task gradients in the last :meth:`combine` (sum to one); ``z`` before."""
        return self.z() if self._weights is None else self._weights.clone()

    def _shifted(self, losses: Tensor) -> Tensor:
        shifted = losses - self.min_losses.to(losses) + self.eps
        if not bool((shifted > 0).all()):
            raise ValueError(
                "FAMO needs every task loss above its minimum (min_losses); got losses "
                f"{losses.detach().tolist()} with minima {self.min_losses.tolist()}"
            )
        return shifted

    def combine(self, losses: TaskLosses) -> Tensor:
        """The loss to backpropagate: ``sum_k z_k log(L_k - m_k + eps) / c`` (see the class)."""
        stacked = _stack_losses(losses, self.num_tasks)
        shifted = self._shifted(stacked)
        z = self.z().to(stacked)
        c = (z / shifted.detach()).sum()
        self._prev = stacked.detach().clone()
        self._weights = (z / (c * shifted.detach())).detach()
        return (z * torch.log(shifted)).sum() / c

    def update(self, new_losses: TaskLosses | Tensor) -> None:
        """One Adam step of the logits from the losses of the same batch after the model step."""
        if self._prev is None:
            raise RuntimeError("FAMO.update() needs a combine() on the same batch before it")
        if isinstance(new_losses, Tensor) and new_losses.ndim == 1:
            new = new_losses.detach()
        else:
            new = _stack_losses(new_losses, self.num_tasks).detach()
        if new.shape != (self.num_tasks,):
            raise ValueError(f"expected {self.num_tasks} task losses, got shape {tuple(new.shape)}")
        prev = self._prev
        delta = torch.log(self._shifted(prev)) - torch.log(self._shifted(new.to(prev)))
        with torch.enable_grad():
            z = torch.softmax(self.logits, dim=-1)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta.to(z))
        self.optimizer.zero_grad(set_to_none=True)
        self.logits.grad = grad
        self.optimizer.step()
        self._prev = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().clone(),
            "min_losses": self.min_losses.clone(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.min_losses = state["min_losses"].clone()
        self.optimizer.load_state_dict(state["optimizer"])

    def __repr__(self) -> str:
        return f"FAMO(num_tasks={self.num_tasks}, lr={self.lr}, gamma={self.gamma})"


__all__ = ["FAMO", "UncertaintyWeighting"]
