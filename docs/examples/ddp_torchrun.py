"""PUB with plain torch.distributed / DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 docs/examples/ddp_torchrun.py

Each rank trains on its shard of every batch; the per-task gradients of the shared parameters are
averaged across ranks in one all-reduce at the end of ``opt.backward``, so every rank solves the
same task weights and the parameters stay identical everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pub_optim import PUB
from pub_optim.distributed import GradientAllReduce

ACCUMULATE = 2  # micro-batches per optimizer step


class SharedBottom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.towers = nn.ModuleList(nn.Linear(32, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.bottom(x)
        return [tower(h).squeeze(-1) for tower in self.towers]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())


def synthetic_data(n: int = 2048) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen)
    logits = x @ torch.randn(16, 2, generator=gen) + 0.5 * torch.sin(x[:, :2])
    return TensorDataset(x, (logits > 0).float())


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" on GPUs (then move model and batches to the GPU)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = SharedBottom()
    ddp = DistributedDataParallel(model)
    opt = PUB(
        torch.optim.Adam(ddp.parameters(), lr=3e-3),
        strategy="pareto",
        shared_params=model.shared_parameters(),
        gradient_sync=GradientAllReduce(ddp),  # follows ddp.no_sync(), like DDP itself
    )
    data = synthetic_data()
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)

    for epoch in range(2):
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i % ACCUMULATE == 0:
                opt.zero_grad()
            out = ddp(x)  # forward through the DDP wrapper
            losses = {
                name: nn.functional.binary_cross_entropy_with_logits(out[k], y[:, k]) / ACCUMULATE
                for k, name in enumerate(("income", "married"))
            }
            last = (i + 1) % ACCUMULATE == 0 or i + 1 == len(loader)
            if last:
                opt.backward(losses)  # K backward passes, then one all-reduce
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
                opt.step()
            else:
                with ddp.no_sync():  # accumulate locally; nothing is communicated
                    opt.backward(losses)
        if rank == 0:
            assert opt.weights is not None
            print(f"epoch {epoch}: weights {opt.weights.tolist()}")

    # every rank holds exactly the same parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged"
    if rank == 0:
        print(f"OK: parameters identical on {world} ranks (pid {os.getpid()})")
    # every rank reaches this point before any tears down its connections: a rank that destroys
    # the group while its peer still finishes the last collective can abort the peer at exit
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
