"""A Lightning module with sparse-gradient embedding tables and two optimizers (SparseAdam for the
tables, Adam for the dense layers) returned as one CombinedOptimizer from configure_optimizers:
the callback balances both, and equals the plain optimizers on identical tasks."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from mtl_helpers import trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pub_optim import CombinedOptimizer
from pub_optim.lightning import UpdateBalancing

ROWS = 30


class TableModule(pl.LightningModule):
    def __init__(self, identical: bool = False, balanced: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(ROWS, 4, sparse=True)
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        self.identical = identical
        self.balanced = balanced

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        ids, y = batch
        z = torch.tanh(self.trunk(self.table(ids)))
        losses = {}
        for k in range(2):
            j = 0 if self.identical else k
            losses[f"t{k}"] = (self.heads[j](z).squeeze(-1) - y[:, j]).pow(2).mean()
        if not self.balanced:  # the plain reference: one task's loss, both optimizers
            return losses["t0"]
        return {"loss": losses["t0"] + losses["t1"], "task_losses": losses}

    def configure_optimizers(self) -> Any:
        dense = [*self.trunk.parameters(), *self.heads.parameters()]
        return CombinedOptimizer(
            [torch.optim.SparseAdam([self.table.weight], lr=1e-2), torch.optim.Adam(dense, lr=1e-2)]
        )


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ROWS, (64,), generator=g)
    return DataLoader(TensorDataset(ids, torch.randn(64, 2, generator=g)), batch_size=16)


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_identical_tasks_train_like_the_plain_optimizers() -> None:
    plain, balanced = TableModule(identical=True, balanced=False), TableModule(identical=True)
    trainer(max_steps=4).fit(plain, _loader())
    cb = UpdateBalancing()
    trainer(max_steps=4, callbacks=[cb]).fit(balanced, _loader())
    assert cb.optimizer is not None and cb.optimizer.weights is not None
    # heads[1] is untouched by identical tasks in both runs; everything else must agree
    torch.testing.assert_close(_flat(balanced), _flat(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["update", "gradient"])
def test_different_tasks_balance_tables_and_dense_layers(space: str) -> None:
    module = TableModule()
    before = module.table.weight.detach().clone()
    cb = UpdateBalancing(space=space)  # type: ignore[arg-type]
    trainer(max_steps=4, callbacks=[cb]).fit(module, _loader())
    assert cb.optimizer is not None and cb.optimizer.weights is not None
    assert isinstance(cb.optimizer.optimizer, CombinedOptimizer)
    assert any(p is module.table.weight for p in cb.optimizer.shared_params)
    assert not torch.equal(before, module.table.weight)
