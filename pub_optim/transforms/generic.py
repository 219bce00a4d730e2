"""Generic look-ahead for any ``torch.optim.Optimizer``: snapshot, step, read the delta, restore.

Used for optimizers without an exact transform (NAdam, RAdam, Adamax, user-defined ones...). For
each task it runs the wrapped optimizer's own ``step()`` on that task's gradient alone, reads the
parameter delta, then restores the parameters and the optimizer state exactly. It costs K extra
optimizer steps and a copy of the shared parameters and their state, and assumes that ``step()``
treats parameters independently (true for every elementwise optimizer; not for L-BFGS).
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor


class GenericLookahead:
    """Snapshot-based look-ahead and commit over a list of shared parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.theta = [p.detach().clone() for p in self.params]
        self.state = [self._copy_state(p) for p in self.params]

    def _copy_state(self, param: Tensor) -> dict[str, Any] | None:
        if param not in self.optimizer.state or not self.optimizer.state[param]:
            return None
        return copy.deepcopy(self.optimizer.state[param])

    def _restore(self) -> None:
        for p, theta, state in zip(self.params, self.theta, self.state, strict=True):
            p.data.copy_(theta)
            if state is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p] = copy.deepcopy(state)

    def updates(
        self,
        task_grads: Sequence[Tensor],
        stores: Sequence[MutableMapping[Tensor, dict[str, Any]]] | None = None,
    ) -> tuple[list[Tensor], list[dict[Tensor, dict[str, Any]]] | None]:
        """Per-task deltas ``[K, *shape]`` for each parameter; parameters and state unchanged.

        ``stores``: one state store per row (``PUB(state="per_task")``): row ``k`` steps from a
        copy of ``stores[k]``'s state, and that advanced copy is returned (per row,
        ``{param: state}``) for the caller to keep; ``None``: every row steps from the optimizer's
        own state, and ``None`` is returned."""
        every = [p for g in self.optimizer.param_groups for p in g["params"]]
        saved = [p.grad for p in every]
        num_tasks = task_grads[0].shape[0]
        deltas = [torch.empty_like(g) for g in task_grads]
        advanced: list[dict[Tensor, dict[str, Any]]] | None = None if stores is None else []
        try:
            for p in every:
                p.grad = None
            for k in range(num_tasks):
                if stores is not None:
                    for p in self.params:
                        own = stores[k].get(p)
                        if own:
                            self.optimizer.state[p] = copy.deepcopy(own)
                        else:
                            self.optimizer.state.pop(p, None)
                for p, g in zip(self.params, task_grads, strict=True):
                    p.grad = g[k].clone()
                self.optimizer.step()
                for p, theta, delta in zip(self.params, self.theta, deltas, strict=True):
                    torch.sub(p.detach(), theta, out=delta[k])
                if advanced is not None:
                    advanced.append({p: self.optimizer.state[p] for p in self.params})
                self._restore()
        except BaseException:
            self._restore()
            raise
        finally:
            for p, g in zip(every, saved, strict=True):
                p.grad = g
        return deltas, advanced

    def set_parameters(self, updates: Sequence[Tensor]) -> None:
        """The shared parameters set to ``theta_before + update`` (no optimizer step)."""
        with torch.no_grad():
            for p, theta, u in zip(self.params, self.theta, updates, strict=True):
                torch.add(theta, u, out=p.data)

    def commit(self, combined_grads: Sequence[Tensor], updates: Sequence[Tensor] | None) -> None:
        """One real ``step()`` with the combined gradients (advances the state of every parameter
        with a gradient, including task-specific ones); then, if ``updates`` is given, the shared
        parameters are set to ``theta_before + update`` instead of the optimizer's own result."""
        saved: list[Tensor | None] = [p.grad for p in self.params]
        try:
            for p, g in zip(self.params, combined_grads, strict=True):
                p.grad = g
            self.optimizer.step()
        finally:
            for p, old in zip(self.params, saved, strict=True):
                p.grad = old
        if updates is not None:
            with torch.no_grad():
                for p, theta, u in zip(self.params, self.theta, updates, strict=True):
                    torch.add(theta, u, out=p.data)
