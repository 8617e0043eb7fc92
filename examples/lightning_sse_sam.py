"""SSE-SAM in a Lightning training loop, with manual optimization.

A SAM step runs several forward and backward passes, so Lightning must not run
the backward itself: ``automatic_optimization = False``, and ``training_step``
hands a closure of per-sample losses and the batch's tail mask to the
optimizer's ``step``. Going through ``self.optimizers().step`` (rather than the
bare optimizer) keeps Lightning's step counter and hooks working.

    python examples/lightning_sse_sam.py   # a few steps on synthetic data, CPU
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sse_sam_fast import SSESAM, tail_classes, tail_mask


class LitSSESAM(L.LightningModule):
    def __init__(self, model: nn.Module, tails: torch.Tensor, epochs: int):
        super().__init__()
        self.automatic_optimization = False  # the optimizer runs its own passes
        self.model, self.epochs = model, epochs
        self.register_buffer("tails", tails)  # the tail classes, on the model's device

    def configure_optimizers(self):
        base = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return SSESAM(base, self.model, head_rho=0.05, tail_rho=0.1, gamma=0.5, total_epochs=self.epochs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        # per-sample losses, shape (B,): the optimizer weighs head and tail itself
        loss = opt.step(
            closure=lambda: F.cross_entropy(self.model(x), y, reduction="none"),
            tail_mask=tail_mask(y, self.tails),
        )
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self):
        self.optimizers().optimizer.update_rho()  # SSE-SAM's stage counter, once per epoch


def synthetic_data(n: int = 96, classes: int = 6, seed: int = 0) -> TensorDataset:
    """A long-tailed toy set: classes 4 and 5 are rare."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([8.0, 6, 4, 3, 1, 1]), n, replacement=True, generator=g)
    x = torch.randn(n, 16, generator=g) + y[:, None].float()
    return TensorDataset(x, y)


def main(epochs: int = 2, batch_size: int = 32) -> LitSSESAM:
    torch.manual_seed(0)
    data = synthetic_data()
    tails = tail_classes(torch.bincount(data.tensors[1], minlength=6), eta=10)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))
    lit = LitSSESAM(model, tails, epochs)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, DataLoader(data, batch_size=batch_size))
    return lit


if __name__ == "__main__":
    lit = main()
    print(lit.trainer.optimizers[0])
