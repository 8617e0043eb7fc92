"""SSE-SAM in a Lightning training loop, with manual optimization.

A SAM step runs several forward and backward passes, so Lightning must not run
the backward itself: ``automatic_optimization = False``, and ``training_step``
hands a closure of per-sample losses and the batch's tail mask to the
optimizer's ``step``. Going through ``self.optimizers().step`` (rather than the
bare optimizer) keeps Lightning's step counter and hooks working.

    python examples/lightning_sse_sam.py   # a few seconds on synthetic data, CPU;
                                           # prints the accuracy before and after
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


def synthetic_data(n: int = 96, classes: int = 6, seed: int = 0, balanced: bool = False) -> TensorDataset:
    """A long-tailed toy set: classes 4 and 5 are rare (``balanced``: every class alike,
    for testing)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(classes) if balanced else torch.tensor([8.0, 6, 4, 3, 1, 1])
    y = torch.multinomial(weights, n, replacement=True, generator=g)
    x = torch.randn(n, 16, generator=g) + y[:, None].float()
    return TensorDataset(x, y)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, classes=None) -> float:
    """Fraction of ``data`` (restricted to ``classes`` if given) that ``model`` gets right."""
    x, y = data.tensors
    if classes is not None:
        keep = torch.isin(y, torch.as_tensor(classes))
        x, y = x[keep], y[keep]
    return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 2, batch_size: int = 32, log=print) -> LitSSESAM:
    torch.manual_seed(0)
    data, test = synthetic_data(), synthetic_data(600, seed=1, balanced=True)
    tails = tail_classes(torch.bincount(data.tensors[1], minlength=6), eta=10)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))

    def report(when: str) -> None:
        overall, tail = accuracy(model, test), accuracy(model, test, tails)
        log(f"test accuracy {when}: {100 * overall:.1f}% (tail classes {tails.tolist()}: {100 * tail:.1f}%)")

    report(f"before {epochs} epochs")
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
    report("after")
    return lit


if __name__ == "__main__":
    lit = main(epochs=20)
    print(lit.trainer.optimizers[0])
