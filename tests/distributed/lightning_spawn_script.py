"""Lightning ``strategy="ddp_spawn"`` on 2 CPU processes (gloo) with the UpdateBalancing callback.

Run as a script: ``python lightning_spawn_script.py OUT_DIR``. The workers are started with the
``spawn`` method, so each one unpickles the trainer and the callback (no ``__init__`` runs there,
and no plain ``PUB`` is ever made in the worker). After ``fit`` the main process holds rank 0's
trained weights (Lightning sends them back) and writes them to ``OUT_DIR/spawn.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))

from lightning_ddp_script import Sharded
from mtl_helpers import flat, trainer

from pub_optim.lightning import UpdateBalancing


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    # float64 in the main process too: the weights sent back from rank 0 keep their precision.
    model = Sharded(tasks=3, scheduler="step").double()
    tr = trainer(
        strategy="ddp_spawn",
        devices=2,
        precision="64-true",
        max_epochs=1,
        callbacks=[UpdateBalancing()],
        use_distributed_sampler=False,
    )
    tr.fit(model)
    torch.save(flat(model), out_dir / "spawn.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
