"""End to end: time per training step of a small transformer and a small ResNet.

Three ways to train each model (SGD momentum base everywhere):

* ``base``: the base optimizer alone (one forward/backward, ``opt.step()``);
* ``eager-loop SAM``: the per-parameter loop port (``tests/baselines.py: EagerLoopSAM``);
* ``sharpfused SAM``: ``sharpfused.SAM`` (backend auto).

For each: ms per training step, the forward+backward part of it, the optimizer part
(first_step + second_step, or step) and the optimizer part as a fraction of the forward+backward
time. Parts are timed with CUDA events on GPU and perf_counter on CPU. The models are built
here in plain torch (no torchvision) with random data.

    python bench/e2e.py            # GPU: mid-size models; CPU: small ones
    python bench/e2e.py --quick    # tiny models, few steps (CPU: ~30 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import sharpfused  # noqa: E402
from tests.baselines import EagerLoopSAM  # noqa: E402


class TinyGPT(nn.Module):
    """A decoder-only transformer: token + position embeddings, pre-norm blocks, tied LM head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        x = self.blocks(x, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True)
        return self.norm(x) @ self.tok.weight.T


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (He et al., 2016): 3 stages of ``n`` basic blocks, widths w, 2w, 4w."""

    def __init__(self, width: int = 16, n: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, w in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                blocks.append(Block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def workloads(
    device: torch.device, quick: bool
) -> dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor], str]]:
    """name -> (model factory, loss of a fixed random batch, description)."""
    gpu = device.type == "cuda"
    if gpu and not quick:
        t = dict(vocab=32000, d=512, layers=6, heads=8, seq=256, batch=16)
        r = dict(width=32, n=3, batch=128, res=32)
    elif gpu:
        t = dict(vocab=8000, d=256, layers=2, heads=4, seq=128, batch=8)
        r = dict(width=16, n=1, batch=64, res=32)
    elif not quick:
        t = dict(vocab=2000, d=128, layers=2, heads=4, seq=64, batch=8)
        r = dict(width=16, n=2, batch=32, res=32)
    else:
        t = dict(vocab=1000, d=64, layers=2, heads=4, seq=32, batch=4)
        r = dict(width=8, n=1, batch=16, res=16)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, t["vocab"], (t["batch"], t["seq"] + 1), generator=g).to(device)
    images = torch.randn(r["batch"], 3, r["res"], r["res"], generator=g).to(device)
    labels = torch.randint(0, 10, (r["batch"],), generator=g).to(device)

    def gpt():
        torch.manual_seed(0)
        return TinyGPT(t["vocab"], t["d"], t["layers"], t["heads"], t["seq"]).to(device)

    def gpt_loss(m):
        logits = m(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def resnet():
        torch.manual_seed(0)
        return SmallResNet(r["width"], r["n"]).to(device)

    def resnet_loss(m):
        return F.cross_entropy(m(images), labels)

    desc_t = f"d={t['d']}, {t['layers']} layers, vocab {t['vocab']}, seq {t['seq']}, batch {t['batch']}"
    desc_r = f"width {r['width']}, {3 * r['n']} blocks, {r['res']}x{r['res']}, batch {r['batch']}"
    return {"transformer": (gpt, gpt_loss, desc_t), "resnet": (resnet, resnet_loss, desc_r)}


class Clock:
    """Accumulates the time of code regions: CUDA events on GPU (read once at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: dict[str, list] = {}
        self.total: dict[str, float] = {}

    def region(self, name: str, fn: Callable[[], object]) -> None:
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            self.pending.setdefault(name, []).append((s, e))
        else:
            t0 = time.perf_counter()
            fn()
            self.total[name] = self.total.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for k, evs in self.pending.items():
                self.total[k] = self.total.get(k, 0.0) + sum(s.elapsed_time(e) for s, e in evs)
            self.pending = {}
        out, self.total = self.total, {}
        return out


def measure(make: Callable[[], nn.Module], loss_fn, mode: str, device: torch.device, steps: int, warmup: int) -> dict:
    """ms per step and its split into fwd+bwd and optimizer work: medians over ``steps`` steps."""
    model = make()
    model.train()
    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    if mode == "base":
        opt = torch.optim.SGD(model.parameters(), **kw)
    elif mode == "eager-loop SAM":
        opt = EagerLoopSAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    else:
        opt = sharpfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    clock = Clock(device)

    def one_step():
        if mode == "base":
            opt.zero_grad(set_to_none=False)
            clock.region("fwdbwd", lambda: loss_fn(model).backward())
            clock.region("opt", opt.step)
        else:
            clock.region("fwdbwd", lambda: loss_fn(model).backward())
            clock.region("opt", lambda: opt.first_step(zero_grad=True))
            with sharpfused.frozen_bn_stats(model):
                clock.region("fwdbwd", lambda: loss_fn(model).backward())
            clock.region("opt", lambda: opt.second_step(zero_grad=True))

    for _ in range(warmup):
        one_step()
    clock.read()
    per, fbs, ops_ = [], [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) * 1e3)
        parts = clock.read()
        fbs.append(parts["fwdbwd"])
        ops_.append(parts["opt"])
    # medians of each part over the same steps: robust to a step slowed by another job
    fb, op = statistics.median(fbs), statistics.median(ops_)
    n = sum(p.numel() for p in model.parameters())
    return dict(mode=mode, step_ms=statistics.median(per), fwdbwd_ms=fb, opt_ms=op, frac=op / fb, params=n)


def run(device: torch.device, quick: bool, steps: int, warmup: int, models: Optional[list[str]] = None) -> list[dict]:
    rows = []
    for name, (make, loss_fn, desc) in workloads(device, quick).items():
        if models and name not in models:
            continue
        for mode in ("base", "eager-loop SAM", "sharpfused SAM"):
            r = measure(make, loss_fn, mode, device, steps, warmup)
            r.update(model=name, desc=desc)
            rows.append(r)
            print(format_row(r), flush=True)
    return rows


HEADER = "| model | params | optimizer | ms/step | fwd+bwd ms | optimizer ms | optimizer / fwd+bwd |\n|---|---|---|---|---|---|---|"


def format_row(r: dict) -> str:
    return (f"| {r['model']} ({r['desc']}) | {r['params'] / 1e6:.2f}M | {r['mode']} | {r['step_ms']:.2f} "
            f"| {r['fwdbwd_ms']:.2f} | {r['opt_ms']:.2f} | {r['frac']:.1%} |")  # fmt: skip


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--models", default=None, help="transformer,resnet")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as bench/run.py)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else (10 if device.type == "cpu" else 50))
    warmup = 2 if device.type == "cpu" else 5
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# end to end, {name}, torch {torch.__version__}, sharpfused {sharpfused.__version__}, "
          f"median of {steps} steps after {warmup} warm-up\n")  # fmt: skip
    print(HEADER, flush=True)
    return run(device, args.quick, steps, warmup, args.models.split(",") if args.models else None)


if __name__ == "__main__":
    main()
