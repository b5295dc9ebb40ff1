"""SAM in PyTorch Lightning: scikit-learn's digits (no download), a small MLP with BatchNorm.

The module derives from ``sharpfused.integrations.lightning.SAMLightningModule`` and returns a
sharpfused optimizer from ``configure_optimizers``; everything else is ordinary Lightning
(a step scheduler, gradient clipping, validation). Prints test accuracy at the end.

    python examples/lightning.py [--algo sam|asam|looksam|xsam] [--epochs 15] [--accumulate 1]
                                 [--precision 32-true|bf16-mixed] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

# run as a script, this file's folder comes first on sys.path, and this file (lightning.py) would
# shadow the lightning package
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused.integrations.lightning import SAMLightningModule  # noqa: E402


def data(batch: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(xte, yte), batch_size=512)
    return train, test


class Digits(SAMLightningModule):
    def __init__(self, algo: str = "sam", lr: float = 0.05, rho: float = 0.05, epochs: int = 15):
        super().__init__()
        self.algo, self.lr, self.rho, self.epochs = algo, lr, rho, epochs
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)  # logged once per step: the first pass's loss
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        base = dict(lr=self.lr, momentum=0.9, weight_decay=5e-4)
        if self.algo == "sam":
            opt = sharpfused.SAM(self.parameters(), torch.optim.SGD, rho=self.rho, **base)
        elif self.algo == "asam":
            opt = sharpfused.SAM(self.parameters(), torch.optim.SGD, rho=10 * self.rho, adaptive=True, **base)
        elif self.algo == "looksam":
            opt = sharpfused.LookSAM(self.parameters(), torch.optim.SGD, rho=self.rho, k=5, **base)
        elif self.algo == "xsam":
            opt = sharpfused.XSAM(self.parameters(), torch.optim.SGD, rho=self.rho, steps=2, **base)
        else:
            raise ValueError(self.algo)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs * 20)  # on the SAM object
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", default="sam", choices=["sam", "asam", "looksam", "xsam"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--quick", action="store_true", help="2 epochs, for a smoke test")
    args = ap.parse_args()
    epochs = 2 if args.quick else args.epochs
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    train, test = data(batch=64)
    model = Digits(args.algo, epochs=epochs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, precision=args.precision, gradient_clip_val=5.0,
        accumulate_grad_batches=args.accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, train, test)
    acc = float(trainer.callback_metrics["val_acc"])
    opt = trainer.optimizers[0]
    print(
        f"{args.algo}: {trainer.global_step} optimizer steps, {int(model.net[1].num_batches_tracked)} BatchNorm "
        f"updates, max_grad_norm={opt.max_grad_norm}, test accuracy {acc:.3f}, {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
