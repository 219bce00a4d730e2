"""Serving one task of a trained run: ``model.pt``, :func:`load_model` and :func:`predict`.

``fit`` saves ``model.pt`` next to ``metrics.json``: a ``torch.save`` of a dict with

* ``format``: :data:`FORMAT`;
* ``config``: the run's ``TrainConfig`` as a dict (dataset, data options, model, model options,
  ``esmm``, ``embed_dim``, ...), what rebuilds the model and reloads the data;
* ``schema``: the data's ``name``, ``task_names``, ``cat_names``, ``cat_cardinalities``,
  ``num_names``, ``funnel``, the model-relevant ``info`` entries (``history_vocab``,
  ``history_len``, ``text_buckets``, ``text_len``) and ``train_fingerprint``, a SHA-256 of the
  preprocessed training split's features (a hash only: no data is stored);
* ``state_dict``: the weights of the best validation epoch (on CPU).

The preprocessing (vocabularies, standardisation) is not stored: it is fitted on the training
split, so loading the data again with the run's data options rebuilds it exactly, and
:func:`load_data_for` checks that with the fingerprint (data that changed since the run is
refused rather than scored with mismatched ids). This also keeps data whose licence forbids
redistribution (MovieLens) out of the run folder.

Scoring one task calls ``model(batch, tasks=[task])``: only that task's tower (gate, task experts)
runs besides the shared part. Rows outside the task (data with a task mask) are not scored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.base import BINARY, REGRESSION, MultiTaskData, Split
from .errors import ConfigError, DataError
from .models import MultiTaskModel, build_model

MODEL_FILE = "model.pt"
FORMAT = 1
#: ``MultiTaskData.info`` entries that shape a model (read by ``build_model`` for grec).
MODEL_INFO_KEYS = ("history_vocab", "history_len", "text_buckets", "text_len")


def train_fingerprint(data: MultiTaskData) -> str:
    """SHA-256 of the preprocessed training features (ids and standardised values)."""
    digest = hashlib.sha256()
    for tensor in (data.train.cat, data.train.num):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def schema_of(data: MultiTaskData) -> dict[str, Any]:
    return {
        "name": data.name,
        "task_names": list(data.task_names),
        "cat_names": list(data.cat_names),
        "cat_cardinalities": [int(c) for c in data.cat_cardinalities],
        "num_names": list(data.num_names),
        "funnel": list(data.funnel) if data.funnel is not None else None,
        "info": {k: data.info[k] for k in MODEL_INFO_KEYS if k in data.info},
        "train_fingerprint": train_fingerprint(data),
    }


def save_model(path: str | Path, model: MultiTaskModel | None, config: Mapping[str, Any],
               data: MultiTaskData) -> Path:  # fmt: skip
    """Write ``model.pt`` (see the module docstring) for ``model`` trained on ``data``."""
    if model is None:
        raise ValueError("no model to save (the run result holds none)")
    path = Path(path)
    payload = {
        "format": FORMAT,
        "config": dict(config),
        "schema": schema_of(data),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)
    return path


@dataclass
class SavedRun:
    """A run folder's ``model.pt``, read."""

    folder: Path
    config: dict[str, Any]
    schema: dict[str, Any]
    state_dict: dict[str, Tensor]

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.schema["task_names"])

    def check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise ConfigError(
                f"unknown task {task!r}; the run {str(self.folder)!r} has the tasks "
                f"{', '.join(self.task_names)}"
            )


def read_run(run_dir: str | Path) -> SavedRun:
    """Read ``run_dir/model.pt`` (ConfigError naming what is missing)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"run folder {str(folder)!r} does not exist; pass the --out folder of a `fit` run"
        )
    file = folder / MODEL_FILE
    if not file.is_file():
        raise ConfigError(
            f"{str(folder)!r} has no {MODEL_FILE}: it is not the folder of a `fit` run (runs "
            f"write {MODEL_FILE} next to metrics.json); run `fit` again to get one"
        )
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ConfigError(f"could not read {str(file)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{str(file)!r} is not a model file of format {FORMAT}")
    return SavedRun(folder, payload["config"], payload["schema"], payload["state_dict"])


def _schema_data(schema: Mapping[str, Any]) -> MultiTaskData:
    """A data object without rows that carries the schema ``build_model`` reads."""
    k, f, d = len(schema["task_names"]), len(schema["cat_names"]), len(schema["num_names"])
    empty = Split(torch.zeros(0, f, dtype=torch.long), torch.zeros(0, d), torch.zeros(0, k))
    funnel = schema["funnel"]
    return MultiTaskData(
        name=schema["name"],
        task_names=tuple(schema["task_names"]),
        cat_names=tuple(schema["cat_names"]),
        cat_cardinalities=tuple(schema["cat_cardinalities"]),
        num_names=tuple(schema["num_names"]),
        train=empty,
        val=empty,
        test=empty,
        funnel=(funnel[0], funnel[1]) if funnel is not None else None,
        info=dict(schema["info"]),
    )


def build_saved_model(run: SavedRun) -> MultiTaskModel:
    """Rebuild the run's model from its config and schema, load its weights, eval mode."""
    config = run.config
    model = build_model(
        config["model"],
        _schema_data(run.schema),
        esmm=bool(config.get("esmm", False)),
        embed_dim=int(config.get("embed_dim", 8)),
        **dict(config.get("model_options", {})),
    )
    model.load_state_dict(run.state_dict)
    return model.eval()


def load_model(run_dir: str | Path) -> MultiTaskModel:
    """The trained model of a ``fit`` run folder, in eval mode (``model.pt``; no data needed)."""
    return build_saved_model(read_run(run_dir))


def load_data_for(run: SavedRun, **overrides: Any) -> MultiTaskData:
    """The run's data, loaded with its data options (``overrides`` replace some, e.g. a moved
    ``data_dir``); refused when its schema or training split differ from the run's."""
    from .data import load_data

    options = {**dict(run.config.get("data_options", {})), **overrides}
    data = load_data(run.config["data"], **options)
    saved, now = run.schema, schema_of(data)
    for key in ("task_names", "cat_names", "cat_cardinalities", "num_names", "train_fingerprint"):
        if saved[key] != now[key]:
            raise DataError(
                f"the {run.config['data']} data loaded now differs from the data the run was "
                f"trained on ({key} changed), so its ids and scales would not match the model; "
                "load the same files with the data options the run used "
                f"({run.config.get('data_options', {})})"
            )
    return data


@torch.no_grad()
def predict(
    model: MultiTaskModel, split: Split, task: str, batch_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """(row positions, logits) of ``task`` on ``split``'s rows that belong to it (all rows without
    a task mask), computed with ``model(batch, tasks=[task])``."""
    if task not in model.task_names:
        raise ConfigError(f"unknown task {task!r}; the model's tasks are {model.task_names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split.mask is None:
        rows = torch.arange(len(split))
    else:
        rows = split.mask[:, model.task_names.index(task)].nonzero().flatten()
    device = next(model.parameters()).device
    logits = []
    for start in range(0, len(rows), batch_size):
        batch = split.batch(rows[start : start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits.append(model(batch, tasks=[task])[task].float().cpu())
    return rows, torch.cat(logits) if logits else torch.zeros(0)


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Fail early when ``path`` may not be written (a folder, or a file without ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a folder; give a file name such as scores.csv")
    if path.exists() and not overwrite:
        raise ConfigError(f"{str(path)!r} already exists; choose another --out or pass --overwrite")
    return path


def write_scores(
    path: str | Path,
    rows: Tensor,
    logits: Tensor,
    kind: str = BINARY,
    units: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """``row,logit,probability`` per scored row of a binary task, ``row,prediction,value`` of a
    regression task (``prediction`` in label units, ``value = offset + scale * prediction`` in
    the data's units, with ``units = (offset, scale)``), written to a temporary file renamed
    into place (a failed write leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if kind == BINARY:
                f.write("row,logit,probability\n")
                second = torch.sigmoid(logits.double())
            elif kind == REGRESSION:
                f.write("row,prediction,value\n")
                second = units[0] + units[1] * logits.double()
            else:
                raise ValueError(f"unknown task kind {kind!r}")
            for r, z, p in zip(rows.tolist(), logits.tolist(), second.tolist(), strict=True):
                f.write(f"{r},{z:.9g},{p:.9g}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "MODEL_FILE",
    "SavedRun",
    "build_saved_model",
    "load_data_for",
    "load_model",
    "predict",
    "read_run",
    "save_model",
    "write_scores",
]
