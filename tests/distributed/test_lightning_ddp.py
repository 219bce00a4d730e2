"""The callback under Lightning's ``strategy="ddp"`` (2 CPU processes, gloo), against one process.

Lightning's DDP launcher re-executes the script it runs in, so the DDP side runs as a script in a
subprocess (``lightning_ddp_script.py``); the single-process references run here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))

from mtl_helpers import MultiTask, flat, loader, trainer

from pub_optim.lightning import UpdateBalancing

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
SPAWN_SCRIPT = Path(__file__).with_name("lightning_spawn_script.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("lightning_ddp")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single_process(**kw: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """One process, batch 2 x 8: what the two ranks together see at every step."""
    model = MultiTask(tasks=3, scheduler="step")
    cb = UpdateBalancing()
    trainer(precision="64-true", callbacks=[cb], **kw).fit(model, loader(batch_size=16, n=96))
    assert cb.optimizer is not None
    return flat(model), cb.optimizer.state_dict()["pub"]


@pytest.mark.parametrize(
    ("scenario", "fit_kwargs"),
    [
        ("plain", {"max_epochs": 1}),
        ("accumulate", {"max_epochs": 1, "accumulate_grad_batches": 2, "gradient_clip_val": 0.5}),
    ],
)
def test_ddp_ranks_identical_and_equal_to_one_process(
    ranks: list[dict[str, Any]], scenario: str, fit_kwargs: dict[str, Any]
) -> None:
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert torch.equal(r0["params"], r1["params"])  # bit-identical across ranks
    assert r0["pub"] == r1["pub"]
    params, pub = _single_process(**fit_kwargs)
    torch.testing.assert_close(r0["params"], params, rtol=1e-10, atol=1e-12)
    assert r0["pub"]["step"] == pub["step"]
    torch.testing.assert_close(
        torch.tensor(r0["pub"]["weights"]), torch.tensor(pub["weights"]), rtol=1e-9, atol=1e-12
    )
    # one synchronisation per optimizer step (none in the no_sync accumulation micro-batches)
    assert r0["calls"] == pub["step"]


def test_ddp_one_collective_per_step_of_the_expected_size(ranks: list[dict[str, Any]]) -> None:
    r0 = ranks[0]["plain"]
    assert r0["collectives"] == r0["calls"] == 6
    shared = 6 * 16 + 16 + 16 * 8 + 8
    heads = 3 * (8 + 1)
    flags = 4 + 6 + 1  # presence of the 4 shared and 6 head tensors, the non-finite count
    assert r0["bytes"] == 8 * (3 * shared + heads + flags)


def test_ddp_nonfinite_loss_on_one_rank_stops_both_and_changes_nothing(
    ranks: list[dict[str, Any]],
) -> None:
    e0, e1 = ranks[0]["nan"], ranks[1]["nan"]
    assert e0["error"] is not None and "another rank" in e0["error"]
    assert e1["error"] is not None and "['t2']" in e1["error"]
    assert torch.equal(e0["params"], e1["params"])
    after_one_step, _ = _single_process(max_steps=1)  # the NaN came at the second step
    torch.testing.assert_close(e0["params"], after_one_step, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_ddp_spawn_trains_like_one_process(tmp_path: Path) -> None:
    # Spawned workers unpickle the callback: the step must still run under no_grad (it crashed
    # at the first step with an in-place operation on a leaf that requires grad).
    proc = subprocess.run(
        [sys.executable, str(SPAWN_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    params, _ = _single_process(max_epochs=1)
    torch.testing.assert_close(torch.load(tmp_path / "spawn.pt"), params, rtol=1e-10, atol=1e-12)
