"""Containers for preprocessed multi-task data and the batches the models consume.

A batch is a ``dict`` with ``"cat"`` (int64 ``[B, F]``, vocabulary ids per categorical field),
``"num"`` (float32 ``[B, D]``, standardised numeric features) and ``"labels"`` (float32 ``[B, K]``,
one column per task, in ``task_names`` order: 0/1 for a binary task, a real value for a regression
task, see ``MultiTaskData.task_kinds``). Datasets with a behaviour sequence add
``"history"`` (int64 ``[B, L]``, item ids in time order, newest last, 0 = padding in front), those
with text ``"text"`` (int64 ``[B, T]``, hashed n-gram ids, 0 = padding); see ``MultiTaskData.info``
for their vocabularies. Data whose rows belong to some tasks only (the scenario rows of GRec, Wang
et al., CIKM 2023) add ``"task_mask"`` (bool ``[B, K]``, True where the row belongs to the task);
each task's loss and metrics then use its own rows only, and its label elsewhere is a placeholder 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

Batch = dict[str, Tensor]

BINARY = "binary"
REGRESSION = "regression"
#: What a task predicts: a 0/1 label (cross-entropy, AUC) or a real value (squared error, R²).
TASK_KINDS = (BINARY, REGRESSION)


@dataclass
class Split:
    """One split (train, validation or test) as dense tensors."""

    cat: Tensor
    num: Tensor
    labels: Tensor
    #: Optional behaviour sequence ``[N, L]`` (0 = padding) and text ``[N, T]`` (0 = padding).
    history: Tensor | None = None
    text: Tensor | None = None
    #: Optional bool ``[N, K]``: which tasks each row belongs to (None: every row, every task).
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        extra = [t for t in (self.history, self.text) if t is not None]
        if self.cat.shape[0] != n or self.num.shape[0] != n or any(t.shape[0] != n for t in extra):
            shapes = {k: tuple(v.shape) for k, v in self.tensors().items()}
            raise ValueError(f"split tensors disagree on the number of rows: {shapes}")
        if self.mask is not None and (
            self.mask.shape != self.labels.shape or self.mask.dtype != torch.bool
        ):
            raise ValueError(
                f"the task mask must be bool with the labels' shape {tuple(self.labels.shape)}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the split by batch key (``history``, ``text`` and ``task_mask`` when
        present)."""
        out = {"cat": self.cat, "num": self.num, "labels": self.labels}
        if self.history is not None:
            out["history"] = self.history
        if self.text is not None:
            out["text"] = self.text
        if self.mask is not None:
            out["task_mask"] = self.mask
        return out

    def rows(self, index: Tensor | slice) -> Split:
        """The split of rows ``index`` (every tensor, the task mask included)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Split(
            self.cat[index], self.num[index], self.labels[index],
            history=pick(self.history), text=pick(self.text), mask=pick(self.mask),
        )  # fmt: skip

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor | slice) -> Batch:
        """Rows ``index`` as a batch dict."""
        return {key: value[index] for key, value in self.tensors().items()}

    def positive_rate(self) -> list[float]:
        """Share of positive labels per task (over the task's own rows when there is a mask)."""
        if len(self) == 0:
            return [float("nan")] * self.labels.shape[1]
        if self.mask is None:
            return [float(v) for v in self.labels.mean(dim=0)]
        rows = self.mask.sum(dim=0)
        sums = (self.labels * self.mask).sum(dim=0)
        return [float(s / r) if r > 0 else float("nan") for s, r in zip(sums, rows, strict=True)]

    def task_rows(self) -> list[int]:
        """Rows per task (every row when there is no mask)."""
        if self.mask is None:
            return [len(self)] * self.labels.shape[1]
        return [int(v) for v in self.mask.sum(dim=0)]


@dataclass
class MultiTaskData:
    """A preprocessed multi-task dataset: three splits plus the schema the models need.

    Attributes:
        name: dataset name (``"adult"``, ``"movielens"``, ...).
        task_names: one name per label column.
        cat_names: categorical field names, in column order of ``Split.cat``.
        cat_cardinalities: vocabulary size per field (including the out-of-vocabulary and missing
            buckets), i.e. the number of embedding rows the field needs.
        num_names: numeric feature names, in column order of ``Split.num``.
        funnel: ``(ctr_task, ctcvr_task)`` when the second task is nested in the first (every
            positive of the second is a positive of the first), which enables the ESMM option;
            else None.
        info: free-form provenance (source file, split sizes, licence notes).
        task_kinds: ``"binary"`` or ``"regression"`` per task (empty: every task is binary).
            Binary tasks train on cross-entropy and are scored by AUC; regression tasks train on
            the squared error and are scored by R².
    """

    name: str
    task_names: tuple[str, ...]
    cat_names: tuple[str, ...]
    cat_cardinalities: tuple[int, ...]
    num_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    funnel: tuple[str, str] | None = None
    info: dict[str, object] = field(default_factory=dict)
    task_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task_kinds:
            if len(self.task_kinds) != len(self.task_names):
                raise ValueError(
                    f"task_kinds {self.task_kinds} must give one kind per task {self.task_names}"
                )
            unknown = sorted(set(self.task_kinds) - set(TASK_KINDS))
            if unknown:
                raise ValueError(f"unknown task kinds {unknown}; choose from {TASK_KINDS}")
        if self.funnel is not None and any(k != BINARY for k in self.kinds()):
            raise ValueError("funnel tasks (ESMM) must be binary")

    def kinds(self) -> tuple[str, ...]:
        """The kind of every task, in ``task_names`` order."""
        return self.task_kinds or (BINARY,) * len(self.task_names)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def describe(self) -> str:
        """One line per split with size and positive rates (label means of regression tasks),
        for logs."""
        lines = [
            f"{self.name}: tasks {', '.join(self.task_names)}; {len(self.cat_names)} categorical "
            f"fields, {len(self.num_names)} numeric features"
        ]
        for split_name, split in self.splits().items():
            rates = ", ".join(
                f"{t} {r:.3f}" for t, r in zip(self.task_names, split.positive_rate(), strict=True)
            )
            what = "positive rate" if REGRESSION not in self.kinds() else "label mean"
            line = f"  {split_name:5s} {len(split):7d} rows; {what} {rates}"
            if split.mask is not None:
                line += "; rows per task " + ", ".join(str(r) for r in split.task_rows())
            lines.append(line)
        return "\n".join(lines)


class _BatchDataset(Dataset[Batch]):
    """Index a :class:`Split` by a list of row ids, returning a whole batch at once."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Sequence[int]) -> Batch:  # type: ignore[override]
        return self.split.batch(torch.as_tensor(index, dtype=torch.long))


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader[Batch]:
    """A DataLoader yielding batch dicts (whole batches are gathered by one tensor index).

    Shuffling uses a dedicated generator seeded with ``seed``, so the order of the batches depends
    only on ``seed`` and the epoch, not on other random draws.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        sampler: RandomSampler | SequentialSampler = RandomSampler(
            range(len(split)), generator=generator
        )
    else:
        sampler = SequentialSampler(range(len(split)))
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return DataLoader(_BatchDataset(split), sampler=batches, batch_size=None, num_workers=0)


def iterate(split: Split, batch_size: int) -> Iterator[Batch]:
    """Plain in-order iteration without a DataLoader (for evaluation helpers and tests)."""
    for start in range(0, len(split), batch_size):
        yield split.batch(slice(start, start + batch_size))
