"""Which parameters each task's loss reaches: the shared / task-specific partition.

A parameter is *shared* when more than one task's loss depends on it. Discovery walks each loss's
autograd graph once (no backward pass) and collects the leaves it reaches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor


def reached_leaves(loss: Tensor) -> set[int]:
    """``id`` of every leaf tensor that requires grad and that ``loss`` depends on."""
    found: set[int] = set()
    root = loss.grad_fn
    if root is None:
        return found
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            found.add(id(variable))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def sparse_leaves(losses: Sequence[Tensor]) -> set[int]:
    """``id`` of the leaves whose gradient these losses produce as a sparse COO tensor: the
    weights of ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` (their backward
    nodes record ``sparse``); one walk of each graph, as :func:`reached_leaves`."""
    found: set[int] = set()
    for loss in losses:
        root = loss.grad_fn
        if root is None:
            continue
        seen = {root}
        stack = [root]
        while stack:
            node = stack.pop()
            sparse = bool(getattr(node, "_saved_sparse", False))
            for child, _ in node.next_functions:
                if child is None:
                    continue
                variable = getattr(child, "variable", None)
                if sparse and variable is not None:
                    found.add(id(variable))
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return found


def task_owners(losses: Sequence[Tensor], params: Iterable[Tensor]) -> dict[int, list[int]]:
    """For every parameter (by ``id``), the indices of the tasks whose loss reaches it."""
    reach = [reached_leaves(loss) for loss in losses]
    return {id(p): [k for k, ids in enumerate(reach) if id(p) in ids] for p in params}
