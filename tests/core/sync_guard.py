"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``.

On CUDA the host waits for the device when it reads a value (``.item()``, ``bool()``,
``.tolist()``, ``.numpy()``, ``.cpu()``), when an operator's output size depends on values
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``), and when a linear-algebra
operator checks its result (``_linalg_check_errors``: ``torch.linalg.solve``, ``eigh``, ``pinv``).
:func:`no_host_reads` fails on every one of those, whatever the device, so the
synchronisation-free code paths are checked on CPU tensors in CI. Tensors that live on the host
by design on CUDA too (an optimizer's ``step`` counters, hyper-parameters) are allowed by
identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._linalg_check_errors.default,
    torch.ops.aten.index.Tensor,  # with a boolean mask it is nonzero (ints are fine: see below)
}


class _Guard(TorchDispatchMode):
    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _HOST_READS:
            first = args[0] if args else None
            exempt = isinstance(first, torch.Tensor) and id(first) in self.allowed
            if func is torch.ops.aten.index.Tensor:
                indices = args[1]
                exempt = not any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
                )
            if not exempt:
                raise AssertionError(f"host read: {func} (synchronises on CUDA)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads(allowed: Iterable[Any] = ()) -> Iterator[None]:
    """Fail with ``AssertionError("host read: ...")`` on any read of a tensor value by the host,
    except of the tensors in ``allowed``."""
    allowed_ids = {id(t) for t in allowed}

    def refuse(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if id(self) not in allowed_ids:
                raise AssertionError(f"host read: Tensor.{name}() (synchronises on CUDA)")
            return original(self, *args, **kwargs)

        return method

    names = ("tolist", "numpy", "cpu")
    saved = {name: torch.Tensor.__dict__.get(name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _Guard(allowed_ids):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)
