"""Main job: the same network trained with SGD and with sharpfused SAM on scikit-learn's digits.

Real data that ships inside scikit-learn (1797 8x8 handwritten digits, no download). A small
MLP, identical initialization, identical batches; prints test accuracy of each at the end.

    python examples/digits.py [--epochs 40] [--rho 0.05] [--noise 0.0]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import sharpfused


def load(noise: float, seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    if noise > 0:  # symmetric label noise on the training set only
        g = torch.Generator().manual_seed(seed)
        flip = torch.rand(len(ytr), generator=g) < noise
        ytr = torch.where(flip, torch.randint(0, 10, (len(ytr),), generator=g), ytr)
    return xtr, ytr, xte, yte


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def run(name: str, epochs: int, data, seed: int, rho: float, bar: tqdm) -> dict:
    xtr, ytr, xte, yte = data
    model = make_model(seed)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if name == "SGD":
        opt = torch.optim.SGD(model.parameters(), **kw)
    else:
        opt = sharpfused.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=name == "ASAM", **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            x, y = xtr[idx], ytr[idx]
            if name == "SGD":
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            else:
                # a dropout mask of its own per pass is fine: both passes see the same batch
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
        sched.step()
        bar.update(1)
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        train_loss = F.cross_entropy(model(xtr), ytr).item()
    return dict(name=name, acc=acc, train_loss=train_loss, seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--noise", type=float, default=0.0, help="fraction of training labels replaced at random")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = ["SGD", "SAM"]
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tqdm(total=args.epochs * len(names) * args.seeds, desc="training", unit="epoch") as bar:
        for seed in range(args.seeds):
            data = load(args.noise, seed)
            for n in names:
                bar.set_postfix_str(f"{n} seed {seed}")
                results[n].append(run(n, args.epochs, data, seed, args.rho, bar))
    print(f"\nscikit-learn digits, MLP 64-256-256-10, {args.epochs} epochs, label noise {args.noise:.0%}, "
          f"{args.seeds} seeds (same init and batches per seed)")
    print(f"{'optimizer':<14} {'test accuracy (mean over seeds)':>32} {'per seed':>24} {'train loss':>11} {'s/run':>7}")
    for n in names:
        accs = [r["acc"] for r in results[n]]
        mean = sum(accs) / len(accs)
        per = " ".join(f"{a:.3f}" for a in accs)
        tl = sum(r["train_loss"] for r in results[n]) / len(accs)
        sec = sum(r["seconds"] for r in results[n]) / len(accs)
        label = n if n == "SGD" else f"{n} rho={args.rho}"
        print(f"{label:<14} {mean:>32.4f} {per:>24} {tl:>11.4f} {sec:>7.1f}")


if __name__ == "__main__":
    main()
