"""Lightning ``strategy="ddp"`` on 2 CPU processes (gloo) with the UpdateBalancing callback.

Run as a script (Lightning's launcher re-executes it for rank 1): ``python lightning_ddp_script.py
OUT_DIR``. Each rank writes ``OUT_DIR/rank{r}.pt`` with what the test compares.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))

from mtl_helpers import MultiTask, flat, make_data, trainer

from pub_optim.lightning import UpdateBalancing

BATCH = 8  # per rank; the single-process reference uses 2 * BATCH


class Sharded(MultiTask):
    """Rank r gets samples r, r + 2, r + 4, ... in order: together the ranks see, at every step,
    the batch of 2 * BATCH consecutive samples that the single-process reference sees."""

    def train_dataloader(self) -> DataLoader:
        data = make_data(n=96)
        sampler = DistributedSampler(data, num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH, sampler=sampler)


def run(model: MultiTask | None = None, **kw: Any) -> tuple[MultiTask, UpdateBalancing, Any]:
    model = model or Sharded(tasks=3, scheduler="step")
    cb = UpdateBalancing(**kw.pop("cb", {}))
    tr = trainer(
        strategy="ddp",
        devices=2,
        precision="64-true",
        max_epochs=1,
        callbacks=[cb],
        use_distributed_sampler=False,
        **kw,
    )
    tr.fit(model)
    return model, cb, tr


def nan_on_rank_one(out: dict[str, Any], i: int) -> dict[str, Any]:
    if i == 1 and torch.distributed.get_rank() == 1:
        tasks = dict(out["task_losses"])
        tasks["t2"] = tasks["t2"] * math.nan
        return {"loss": sum(tasks.values()), "task_losses": tasks}
    return out


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    model, cb, _ = run()
    assert cb.optimizer is not None and cb.sync is not None
    result["plain"] = {
        "params": flat(model),
        "pub": cb.optimizer.state_dict()["pub"],
        "calls": cb.sync.stats.calls,
        "collectives": cb.sync.stats.collectives,
        "bytes": cb.sync.stats.last_bytes,
    }
    model, cb, _ = run(accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert cb.optimizer is not None and cb.sync is not None
    result["accumulate"] = {
        "params": flat(model),
        "pub": cb.optimizer.state_dict()["pub"],
        "calls": cb.sync.stats.calls,
    }
    # a NaN task loss on rank 1 only: both ranks must stop with the same error (no hang)
    model = Sharded(tasks=3, scheduler="step")
    model.mangle = nan_on_rank_one
    try:
        run_model(model)
        result["nan"] = {"error": None}
    except FloatingPointError as err:
        result["nan"] = {"error": str(err), "params": flat(model)}
    rank = torch.distributed.get_rank()
    torch.save(result, out_dir / f"rank{rank}.pt")


def run_model(model: MultiTask) -> None:
    run(model=model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
