"""docs/lightning.md: its complete example is docs/examples/lightning_example.py, and it runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "lightning.md"
EXAMPLE = ROOT / "docs" / "examples" / "lightning_example.py"


def included_block(doc: Path, name: str) -> str:
    """The fenced code block right after ``<!-- include: NAME -->`` in ``doc``."""
    text = doc.read_text()
    match = re.search(
        rf"<!-- include: {re.escape(name)} -->\n```python\n(.*?)```\n", text, flags=re.DOTALL
    )
    assert match is not None, f"{doc.name} has no included listing of {name}"
    return match.group(1)


def test_doc_listing_is_the_example_file() -> None:
    assert included_block(DOC, "examples/lightning_example.py") == EXAMPLE.read_text()


def _run(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-epochs", "1", "--log-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_runs(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert "final task weights: {'pub/weight/income'" in out
    assert list(tmp_path.rglob("metrics.csv"))


@pytest.mark.slow
@pytest.mark.distributed
def test_example_runs_unchanged_under_ddp(tmp_path: Path) -> None:
    out = _run(tmp_path, "--strategy", "ddp", "--devices", "2")
    assert "final task weights: {'pub/weight/income'" in out


def _zero_task_weights(space: str, optimizer: str) -> list[float]:
    """Weight of task t1, whose loss is ``0 * loss`` (still in the graph), at each step."""
    from mtl_helpers import MultiTask, loader, trainer
    from pytorch_lightning.callbacks import Callback

    from pub_optim.lightning import UpdateBalancing

    class Record(Callback):
        def __init__(self) -> None:
            self.weights: list[float] = []

        def on_train_batch_end(self, *args: object) -> None:
            assert cb.optimizer is not None and cb.optimizer.last_stats is not None
            self.weights.append(float(cb.optimizer.last_stats.weights[1]))

    def zero_t1(out: dict, i: int) -> dict:
        tasks = {**out["task_losses"], "t1": 0 * out["task_losses"]["t1"]}
        return {"loss": sum(tasks.values()), "task_losses": tasks}

    model = MultiTask(optimizer=optimizer)
    model.mangle = zero_t1
    cb, record = UpdateBalancing(space=space), Record()
    trainer(max_steps=6, callbacks=[cb, record]).fit(model, loader())
    return record.weights


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_documented_weight_of_a_task_with_zero_gradient(optimizer: str) -> None:
    # docs/lightning.md: a zero update (weight 0) only on the first step; with momentum (Adam,
    # SGD momentum 0.9 here) the look-ahead is then the momentum step and takes a large share;
    # in the gradient space the weight stays 0.
    update = _zero_task_weights("update", optimizer)
    assert update[0] == 0.0
    assert min(update[1:]) > 0.3
    assert _zero_task_weights("gradient", optimizer) == [0.0] * 6
