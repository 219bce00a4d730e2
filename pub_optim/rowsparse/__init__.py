"""Row-sparse per-task gradients for embedding tables (see :mod:`.grads`, :mod:`.lookahead`,
:mod:`.untouched`)."""

from .grads import TaskRows, coalesced_rows, gram, nonzero_rows
from .lookahead import (
    SPARSE_TRANSFORMS,
    SparseAdagradTransform,
    SparseAdamTransform,
    SparseContext,
    SparseRowTransform,
    SparseSGDTransform,
    sparse_transform_for,
)
from .untouched import UntouchedRows, row_context, scatter_back

__all__ = [
    "SPARSE_TRANSFORMS",
    "SparseAdagradTransform",
    "SparseAdamTransform",
    "SparseContext",
    "SparseRowTransform",
    "SparseSGDTransform",
    "TaskRows",
    "UntouchedRows",
    "coalesced_rows",
    "gram",
    "nonzero_rows",
    "row_context",
    "scatter_back",
    "sparse_transform_for",
]
