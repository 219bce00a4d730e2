"""Several ``torch.optim`` optimizers stepped as one, so that one PUB balances all of them.

A recommendation model's embedding tables train with sparse gradients and ``SparseAdam``, its
dense layers with ``Adam``: two optimizers over disjoint parameters. :class:`CombinedOptimizer`
presents them as one ``torch.optim.Optimizer`` (``param_groups`` and ``state`` are the inner
optimizers' own objects, ``step`` and ``zero_grad`` call each), which is what
:class:`pub_optim.PUB` wraps (``PUB([sparse_adam, adam])`` builds it) and what a Lightning module
returns from ``configure_optimizers``. Each parameter keeps its own optimizer's update rule and
state; PUB takes one Gram matrix over all shared parameters (Yuan, Cai, Dong, arXiv:2410.05806),
each part looked ahead by its own optimizer. LR schedulers attach to the inner optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .facade import init_facade


class _MergedState(MutableMapping[Tensor, dict[str, Any]]):
    """``{param: state}`` over the inner optimizers: each entry read from and written to the
    optimizer that owns the parameter."""

    def __init__(self, combined: CombinedOptimizer) -> None:
        self._combined = combined

    def _owner_state(self, param: Tensor) -> Any:
        return self._combined.owner(param).state

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        return self._owner_state(param)[param]

    def __setitem__(self, param: Tensor, value: dict[str, Any]) -> None:
        self._owner_state(param)[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._owner_state(param)[param]

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self._combined.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._combined.optimizers)

    def __contains__(self, param: object) -> bool:
        return any(param in optimizer.state for optimizer in self._combined.optimizers)

    def get(self, param: Tensor, default: Any = None) -> Any:
        if not isinstance(param, Tensor) or id(param) not in self._combined._owners:
            return default
        return self._owner_state(param).get(param, default)


class CombinedOptimizer(torch.optim.Optimizer):
    """Inner optimizers over disjoint parameters, as one optimizer.

    Example::

        tables = [p for n, p in model.named_parameters() if "embedding" in n]
        dense = [p for n, p in model.named_parameters() if "embedding" not in n]
        opt = PUB(
            [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(dense, lr=1e-3)],
            "pareto",
        )

    Args:
        optimizers: the inner optimizers; a parameter may belong to one of them only.

    ``state_dict()`` is in torch's format over all parameters (``state`` and ``param_groups``
    with global parameter indices) and carries each inner optimizer's own ``state_dict`` under
    ``"optimizers"``, from which ``load_state_dict`` restores them.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        owners: dict[int, int] = {}
        for n, optimizer in enumerate(optimizers):
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizers[{n}] is a {type(optimizer).__name__}, not a torch.optim.Optimizer"
                )
            if isinstance(optimizer, CombinedOptimizer):
                raise TypeError(f"optimizers[{n}] is already a CombinedOptimizer")
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in owners and owners[id(p)] != n:
                        raise ValueError(
                            f"a parameter of shape {tuple(p.shape)} is in optimizers "
                            f"[{owners[id(p)]}] and [{n}]: each parameter must belong to one "
                            "optimizer (give each its own parameters)"
                        )
                    owners[id(p)] = n
        self.optimizers = optimizers
        self._owners = owners
        self.defaults: dict[str, Any] = {}
        init_facade(self)

    def owner(self, param: Tensor) -> torch.optim.Optimizer:
        """The inner optimizer that steps ``param``."""
        try:
            return self.optimizers[self._owners[id(param)]]
        except KeyError:
            raise KeyError(
                f"a parameter of shape {tuple(param.shape)} is in none of the optimizers"
            ) from None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizers' groups (the same dicts: setting ``lr`` in one changes it)."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("set the param_groups of the inner optimizers")

    @property  # type: ignore[override]
    def state(self) -> _MergedState:
        return _MergedState(self)

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("set the state of the inner optimizers")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ for o in self.optimizers)
        return f"CombinedOptimizer({inner})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError(
            "add the group to one of the inner optimizers (combined.optimizers[i]."
            "add_param_group(...)), then build the CombinedOptimizer again"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Each inner optimizer's step; ``closure`` (as Lightning passes it) is evaluated once,
        before them, and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        inner = [optimizer.state_dict() for optimizer in self.optimizers]
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for saved in inner:
            count = 0
            for group in saved["param_groups"]:
                groups.append({**group, "params": [offset + i for i in group["params"]]})
                count += len(group["params"])
            state.update({offset + int(i): s for i, s in saved["state"].items()})
            offset += count
        return {"state": state, "param_groups": groups, "optimizers": inner}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ValueError(
                f"expected the state of {len(self.optimizers)} optimizers under 'optimizers' "
                "(a CombinedOptimizer state_dict)"
            )
        previous = [optimizer.state_dict() for optimizer in self.optimizers]
        try:
            for optimizer, saved in zip(self.optimizers, inner, strict=True):
                optimizer.load_state_dict(saved)
        except Exception:
            for optimizer, saved in zip(self.optimizers, previous, strict=True):
                optimizer.load_state_dict(saved)  # nothing changed
            raise
