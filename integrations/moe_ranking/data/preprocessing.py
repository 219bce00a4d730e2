"""Train-only preprocessing for tabular multi-task data.

Everything is fitted on the training split only and then applied unchanged to validation and test:

* categorical fields: a vocabulary of the training values seen at least ``min_count`` times; id 0 is
  the out-of-vocabulary bucket (unseen or rare values), id 1 the missing bucket (NaN, None, ``""``,
  ``"?"``), known values start at 2;
* numeric features: optional ``log1p`` for heavy-tailed non-negative columns, then standardisation
  with the training mean and standard deviation; missing values either raise a :class:`DataError`
  (``numeric_missing="error"``, the default) or are imputed with the training mean (0 after
  standardisation) with a 0/1 indicator column added for each column that had missing values in
  the training split (``numeric_missing="impute"``); infinite values always raise;
* binned numeric features (optional, ``bins={column: n_bins}``): a numeric column also becomes a
  categorical field ``<column>_bin`` of training-quantile bins (for a column that is zero in at
  least half of the training rows, zero gets its own bin and the quantiles are those of the
  non-zero values); tabular networks learn thresholds such as "capital gain above 5,000" much
  more easily from these than from the standardised value alone;
* labels: must be 0/1 (booleans or numbers); anything else raises a :class:`DataError` naming the
  column, the count and a few offending values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

try:
    import pandas as pd
except ImportError as _exc:
    from .._extras import missing_extra

    raise missing_extra("pandas", _exc, "reading the data sets") from _exc
import torch

from ..errors import DataError
from .base import Split

OOV_ID = 0
MISSING_ID = 1
MISSING_TOKENS = ("", "?", "nan", "NaN", "None", "NULL", "null")


def require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    """Raise a :class:`DataError` listing every column of ``columns`` absent from ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        available = ", ".join(map(str, frame.columns[:30]))
        more = " ..." if len(frame.columns) > 30 else ""
        raise DataError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the file has: {available}{more}"
        )


def binary_labels(frame: pd.DataFrame, columns: Sequence[str], source: str) -> np.ndarray:
    """The label columns as a float32 ``[N, K]`` array, checking every value is 0 or 1."""
    require_columns(frame, columns, source)
    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        values = frame[col]
        if values.dtype == bool:
            out[:, j] = values.to_numpy(dtype=np.float32)
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna() | ~numeric.isin([0, 1])
        if bool(bad.any()):
            examples = ", ".join(repr(v) for v in pd.unique(values[bad])[:5])
            raise DataError(
                f"{source}: label column {col!r} must contain only 0 and 1; "
                f"{int(bad.sum())} of {len(values)} rows do not (e.g. {examples})"
            )
        out[:, j] = numeric.to_numpy(dtype=np.float32)
    return out


def _category_strings(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Values as stripped strings and a mask of missing entries (NaN, None or a missing marker)."""
    missing = values.isna().to_numpy()
    strings = values.astype(str).str.strip()
    missing = missing | strings.isin(MISSING_TOKENS).to_numpy()
    return strings, missing


@dataclass
class TabularPreprocessor:
    """Vocabularies and standardisation statistics, fitted on the training split only.

    Args:
        categorical: categorical column names.
        numeric: numeric column names.
        log1p: numeric columns transformed with ``sign(x) * log1p(|x|)`` before standardising.
        min_count: training values seen fewer times go to the out-of-vocabulary bucket (so that the
            bucket's embedding is trained and unseen test values land somewhere sensible).
        numeric_missing: ``"error"`` (NaN in a numeric feature is a data error) or ``"impute"``.
        bins: numeric columns to add as quantile-binned categorical fields, with the number of
            quantile bins (fewer when quantiles coincide).
    """

    categorical: Sequence[str]
    numeric: Sequence[str]
    log1p: Sequence[str] = ()
    min_count: int = 1
    numeric_missing: Literal["error", "impute"] = "error"
    bins: Mapping[str, int] = field(default_factory=dict)
    bin_edges: dict[str, np.ndarray] = field(default_factory=dict, init=False)
    vocabularies: dict[str, dict[str, int]] = field(default_factory=dict, init=False)
    means: dict[str, float] = field(default_factory=dict, init=False)
    stds: dict[str, float] = field(default_factory=dict, init=False)
    indicator_columns: list[str] = field(default_factory=list, init=False)
    fitted: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.numeric_missing not in ("error", "impute"):
            raise ValueError(
                f"numeric_missing must be 'error' or 'impute', not {self.numeric_missing!r}"
            )
        unknown = set(self.log1p) - set(self.numeric)
        if unknown:
            raise ValueError(f"log1p columns {sorted(unknown)} are not numeric columns")
        unknown = set(self.bins) - set(self.numeric)
        if unknown:
            raise ValueError(f"bins columns {sorted(unknown)} are not numeric columns")
        if any(n < 2 for n in self.bins.values()):
            raise ValueError(f"every bins count must be >= 2, got {dict(self.bins)}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")

    # ------------------------------------------------------------------ fitting
    def fit(self, train: pd.DataFrame, source: str = "training data") -> TabularPreprocessor:
        """Fit vocabularies and statistics on ``train`` (the training split only)."""
        require_columns(train, [*self.categorical, *self.numeric], source)
        if len(train) == 0:
            raise DataError(f"{source}: the training split is empty")
        self.vocabularies = {}
        for col in self.categorical:
            strings, missing = _category_strings(train[col])
            counts = strings[~missing].value_counts()
            kept = counts[counts >= self.min_count]
            # Most frequent first, ties by value, so ids do not depend on row order.
            order = sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))
            self.vocabularies[col] = {value: i + 2 for i, (value, _) in enumerate(order)}
        self.means, self.stds, self.indicator_columns = {}, {}, []
        for col in self.numeric:
            values = self._numeric_values(train, col, source)
            finite = values[~np.isnan(values)]
            if finite.size == 0:
                raise DataError(
                    f"{source}: numeric column {col!r} has no values in the training split"
                )
            if np.isnan(values).any():
                self.indicator_columns.append(col)
            std = float(finite.std())
            self.means[col] = float(finite.mean())
            self.stds[col] = std if std > 0 else 1.0
            if col in self.bins:
                self.bin_edges[col] = quantile_edges(finite, self.bins[col])
        self.fitted = True
        return self

    def _numeric_values(self, frame: pd.DataFrame, col: str, source: str) -> np.ndarray:
        raw = frame[col]
        numeric = pd.to_numeric(raw, errors="coerce")
        not_numbers = numeric.isna() & raw.notna()
        if bool(not_numbers.any()):
            examples = ", ".join(repr(v) for v in pd.unique(raw[not_numbers])[:5])
            raise DataError(
                f"{source}: numeric column {col!r} has {int(not_numbers.sum())} non-numeric "
                f"value(s) (e.g. {examples})"
            )
        values = numeric.to_numpy(dtype=np.float64)
        n_inf = int(np.isinf(values).sum())
        if n_inf:
            raise DataError(f"{source}: numeric column {col!r} has {n_inf} infinite value(s)")
        n_nan = int(np.isnan(values).sum())
        if n_nan and self.numeric_missing == "error":
            rows = np.flatnonzero(np.isnan(values))[:5].tolist()
            raise DataError(
                f"{source}: numeric column {col!r} has {n_nan} missing (NaN) value(s), e.g. rows "
                f"{rows}; clean the file or enable imputation (--impute-missing on the command "
                "line, numeric_missing='impute' in Python)"
            )
        if col in self.log1p:
            values = np.sign(values) * np.log1p(np.abs(values))
        return values

    # ------------------------------------------------------------------ transforming
    @property
    def num_names(self) -> tuple[str, ...]:
        return (*self.numeric, *(f"{c}_missing" for c in self.indicator_columns))

    @property
    def cat_names(self) -> tuple[str, ...]:
        return (*self.categorical, *(f"{c}_bin" for c in self.bins))

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Embedding rows per field: known values (or bins) + out-of-vocabulary + missing."""
        self._check_fitted()
        vocab = [len(self.vocabularies[c]) + 2 for c in self.categorical]
        return (*vocab, *(len(self.bin_edges[c]) + 3 for c in self.bins))

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("TabularPreprocessor.fit must be called before transform")

    def transform_features(
        self, frame: pd.DataFrame, source: str = "data"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Categorical ids ``[N, F]`` (int64) and numeric features ``[N, D]`` (float32)."""
        self._check_fitted()
        require_columns(frame, [*self.categorical, *self.numeric], source)
        n = len(frame)
        cat = np.empty((n, len(self.cat_names)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            vocab = self.vocabularies[col]
            strings, missing = _category_strings(frame[col])
            ids = strings.map(vocab).fillna(OOV_ID).to_numpy(dtype=np.int64, copy=True)
            ids[missing] = MISSING_ID
            cat[:, j] = ids
        columns = []
        bin_ids = {}
        for col in self.numeric:
            values = self._numeric_values(frame, col, source)
            standardised = (values - self.means[col]) / self.stds[col]
            columns.append(np.nan_to_num(standardised, nan=0.0))
            if col in self.bins:
                ids = np.searchsorted(self.bin_edges[col], values, side="right") + 2
                bin_ids[col] = np.where(np.isnan(values), MISSING_ID, ids)
        for j, col in enumerate(self.bins, start=len(self.categorical)):
            cat[:, j] = bin_ids[col]
        for col in self.indicator_columns:
            columns.append(frame[col].isna().to_numpy(dtype=np.float64))
        num = np.stack(columns, axis=1) if columns else np.zeros((n, 0))
        return torch.from_numpy(cat), torch.from_numpy(num.astype(np.float32))

    def transform(
        self, frame: pd.DataFrame, label_columns: Sequence[str], source: str = "data"
    ) -> Split:
        """Features and 0/1 labels of ``frame`` as a :class:`Split`."""
        labels = binary_labels(frame, label_columns, source)
        cat, num = self.transform_features(frame, source)
        return Split(cat=cat, num=num, labels=torch.from_numpy(labels))


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges from training quantiles (``searchsorted(edges, x, side="right")`` is the bin).

    A column that is zero in at least half of the rows (capital gains, counts) gets an edge at 0,
    so that zero has its own bin, and quantile edges of its non-zero values.
    """
    q = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    nonzero = values[values != 0]
    if nonzero.size and nonzero.size <= values.size / 2:
        return np.unique(np.concatenate([[0.0], np.quantile(nonzero, q)]))
    return np.unique(np.quantile(values, q))


def random_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (kept, held-out) index arrays, ``fraction`` held out, seeded."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_out = max(1, round(n * fraction))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])
