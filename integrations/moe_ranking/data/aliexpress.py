"""AliExpress (the PUB paper's benchmark): click and conversion on search traffic of four countries.

The data is not redistributable here: users download it themselves. This loader reads the usual
processed CSV layout (the one of MTReclib, Zhu et al., and of the PUB paper's code)::

    <root>/AliExpress_NL/train.csv
    <root>/AliExpress_NL/test.csv          (likewise AliExpress_ES, AliExpress_FR, AliExpress_US)

with the header ``search_id, categorical_1..categorical_16, numerical_1..numerical_63, click,
conversion``. Tasks: ``ctr`` (click) and ``ctcvr`` (conversion, which is only ever 1 on clicked
impressions), so the pair supports the ESMM option. A validation split is carved from the training
file by whole ``search_id`` groups (a search session stays in one split).

Source: Li et al., "Improving Multi-Scenario Learning to Rank in E-commerce by Exploiting Task
Relationships in the Label Space", CIKM 2020; https://tianchi.aliyun.com/dataset/74690.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import pandas as pd
except ImportError as _exc:
    from .._extras import missing_extra

    raise missing_extra("pandas", _exc, "reading the data sets") from _exc

from ..errors import DataError
from .base import MultiTaskData
from .preprocessing import TabularPreprocessor, binary_labels, require_columns

COUNTRIES = ("NL", "ES", "FR", "US")
CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
NUMERIC = tuple(f"numerical_{i}" for i in range(1, 64))
LABELS = ("click", "conversion")
TASKS = ("ctr", "ctcvr")
DOWNLOAD_HELP = (
    "AliExpress is not shipped with this project: download it yourself. Either the processed "
    "CSVs linked from https://github.com/easezyc/Multitask-Recommendation-Library#datasets "
    "(unpack them so that <root>/AliExpress_NL/train.csv and test.csv exist), or the original "
    "files from https://tianchi.aliyun.com/dataset/74690 processed with that repository's "
    "data/preprocess.py. Then pass the folder that contains AliExpress_NL/ etc. with --data-dir "
    "(default: ./data)."
)


def aliexpress_files(root: str | Path, country: str) -> tuple[Path, Path]:
    """``(train.csv, test.csv)`` of ``country`` under ``root``; a DataError says how to get them."""
    if country not in COUNTRIES:
        raise DataError(
            f"unknown AliExpress country {country!r}; choose one of {', '.join(COUNTRIES)}"
        )
    folder = Path(root) / f"AliExpress_{country}"
    train, test = folder / "train.csv", folder / "test.csv"
    absent = [str(p) for p in (train, test) if not p.is_file()]
    if absent:
        raise DataError(f"AliExpress data not found: missing {', '.join(absent)}. {DOWNLOAD_HELP}")
    return train, test


def _read_csv(path: Path, max_rows: int | None) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, nrows=max_rows)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"could not read {str(path)!r}: {exc}") from exc
    require_columns(frame, ["search_id", *CATEGORICAL, *NUMERIC, *LABELS], str(path))
    if len(frame) == 0:
        raise DataError(f"{path}: no data rows")
    return frame


def load_aliexpress(
    root: str | Path = "data",
    country: str = "NL",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    max_rows: int | None = None,
    min_count: int = 1,
    numeric_missing: str = "error",
) -> MultiTaskData:
    """Load one AliExpress country split (see the module docstring for the layout).

    Args:
        root: folder containing ``AliExpress_<country>/``.
        country: NL, ES, FR or US.
        val_fraction: share of the training ``search_id`` groups held out for validation.
        split_seed: seed of that split.
        max_rows: read only the first rows of each file (quick experiments).
        min_count: rarer categorical values go to the out-of-vocabulary id.
        numeric_missing: ``"error"`` or ``"impute"`` (see :class:`TabularPreprocessor`).
    """
    train_path, test_path = aliexpress_files(root, country)
    train_all = _read_csv(train_path, max_rows)
    test_frame = _read_csv(test_path, max_rows)
    label_cols = list(LABELS)
    for frame, path in ((train_all, train_path), (test_frame, test_path)):
        labels = binary_labels(frame, label_cols, str(path))
        nested = (labels[:, 1] == 1) & (labels[:, 0] != 1)
        if bool(nested.any()):
            raise DataError(
                f"{path}: {int(nested.sum())} rows have conversion = 1 without a click; "
                "expected conversions only on clicked impressions"
            )
    groups = train_all["search_id"].to_numpy()
    unique = np.unique(groups)
    if len(unique) < 2:
        raise DataError(
            f"{train_path}: need at least two search_id groups to carve a validation split"
        )
    rng = np.random.default_rng(split_seed)
    n_val = max(1, round(len(unique) * val_fraction))
    val_groups = rng.permutation(unique)[:n_val]
    is_val = np.isin(groups, val_groups)
    train_frame, val_frame = train_all[~is_val], train_all[is_val]

    prep = TabularPreprocessor(
        CATEGORICAL,
        NUMERIC,
        min_count=min_count,
        numeric_missing=numeric_missing,  # type: ignore[arg-type]
    ).fit(train_frame, str(train_path))
    return MultiTaskData(
        name=f"aliexpress-{country}",
        task_names=TASKS,
        cat_names=prep.cat_names,
        cat_cardinalities=prep.cardinalities,
        num_names=prep.num_names,
        train=prep.transform(train_frame, label_cols, str(train_path)),
        val=prep.transform(val_frame, label_cols, str(train_path)),
        test=prep.transform(test_frame, label_cols, str(test_path)),
        funnel=("ctr", "ctcvr"),
        info={"source": str(train_path.parent), "country": country, "max_rows": max_rows},
    )
