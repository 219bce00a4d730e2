"""Multi-task training with Lightning and Parameter Update Balancing: one callback.

python docs/examples/lightning_example.py                                  # CPU, one process
python docs/examples/lightning_example.py --strategy ddp --devices 2       # 2 processes (DDP)
python docs/examples/lightning_example.py --precision bf16-mixed
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pub_optim.lightning import UpdateBalancing


def synthetic_data(n: int = 2048, seed: int = 0) -> TensorDataset:
    """Features and two binary labels ("income", "never_married") that share structure."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 2, generator=gen)
    logits = x @ w + 0.5 * torch.sin(x[:, :2])
    return TensorDataset(x, (logits > 0).float())


class SharedBottom(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.towers = nn.ModuleDict({name: nn.Linear(32, 1) for name in ("income", "married")})
        self.lr = lr

    def shared_parameters(self) -> list[nn.Parameter]:
        """The partition hook: UpdateBalancing balances exactly these parameters."""
        return list(self.bottom.parameters())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict:
        x, y = batch
        h = self.bottom(x)
        losses = {
            name: nn.functional.binary_cross_entropy_with_logits(
                tower(h).squeeze(-1).float(), y[:, k]
            )
            for k, (name, tower) in enumerate(self.towers.items())
        }
        # The contract: the total (for logging, and for training without the callback) and the
        # per-task losses (what the callback balances).
        total = sum(losses.values())
        self.log("train/loss", total, prog_bar=True)
        return {"loss": total, "task_losses": losses}

    def configure_optimizers(self) -> dict:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--log-dir", default="lightning_logs_pub")
    args = parser.parse_args()

    pl.seed_everything(0)
    model = SharedBottom()
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=args.strategy,
        devices=args.devices,
        precision=args.precision,
        max_epochs=args.max_epochs,
        gradient_clip_val=1.0,
        accumulate_grad_batches=2,
        logger=pl.loggers.CSVLogger(args.log_dir),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[UpdateBalancing(strategy="pareto", prog_bar=True)],
    )
    trainer.fit(model, DataLoader(synthetic_data(), batch_size=64, shuffle=True))
    if trainer.is_global_zero:
        logged = trainer.logged_metrics
        weights = {k: round(float(v), 4) for k, v in logged.items() if "weight" in k}
        print("final task weights:", weights)
        print("train/loss:", float(logged["train/loss"]))


if __name__ == "__main__":
    main()
