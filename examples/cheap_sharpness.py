"""Sharpness at almost the price of SGD: the variants that skip or shrink SAM's second pass, measured.

The label-noise task of examples/label_noise.py (scikit-learn digits, 40% of the training labels
replaced at random, clean test labels; the MLP of examples/digits.py, SGD momentum base, lr 0.05,
cosine): SGD, SAM, LookSAM and the cheap variants -- MSAM, RST, AE-SAM, and ESAM / MESA when this
sharpfused exports them -- trained from the same init on the same batches per seed.

Fair tuning: every method but SGD gets the same budget, three values of its main knob (the radius
rho, or MESA's lam), each trained once (seed 100) and scored on a validation fifth held out of the
noisy training set; the best goes on to the seeds, scored on the clean test set. The other knobs
stay at the papers' defaults (LookSAM k=5, RST p=0.5, AE-SAM c from 1 to -1 over training, ESAM
beta=0.6 with data selection gamma=0.5, MESA decay 0.99 from epoch 5).

Time: one loop for every method; the runs of a seed advance one epoch each in turn (interleaved,
so a slow spell of the machine hits every method alike; each run keeps its own dropout random
state), and an epoch's wall time excludes the evaluation. Reported: clean test accuracy (mean +- std over seeds), forward/backward passes per
step (counted), median seconds per epoch, cost relative to SGD, and the share of SAM's accuracy
gain over SGD that each method keeps.

    python examples/cheap_sharpness.py                        # 40 epochs, 3 seeds, tuning
    python examples/cheap_sharpness.py --out examples/results # update the committed table and plot
    python examples/cheap_sharpness.py --quick                # 2 epochs, 1 seed, no tuning (CI)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sharpfused

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import add_out_argument, out_flag, shown  # noqa: E402
from digits import load, make_model  # noqa: E402

BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
BATCH = 64
NOISE = 0.4

# method -> (the tuned knob, its three values, the fixed settings)
GRID = {
    "SGD": (None, [None], {}),
    # the base step alone through sharpfused's fused path (RST with p=0): the floor every variant pays
    "SGD (fused)": (None, [None], dict(p=0.0)),
    "SAM": ("rho", [0.05, 0.1, 0.2], {}),
    "LookSAM": ("rho", [0.05, 0.1, 0.2], dict(k=5)),
    "MSAM": ("rho", [0.1, 0.3, 1.0], {}),
    "RST": ("rho", [0.05, 0.1, 0.2], dict(p=0.5)),
    "AE-SAM": ("rho", [0.05, 0.1, 0.2], dict(c=1.0, c_end=-1.0)),
    "ESAM": ("rho", [0.05, 0.1, 0.2], dict(beta=0.6, gamma=0.5)),
    "MESA": ("lam", [0.4, 0.8, 1.6], dict(decay=0.99)),
}
#: --no-tune: the values the tuning chose in examples/results/cheap_sharpness.md (width 256)
DEFAULT = {"SAM": 0.1, "LookSAM": 0.2, "MSAM": 0.1, "RST": 0.1, "AE-SAM": 0.05, "ESAM": 0.05, "MESA": 0.8}


def build_model(seed: int, hidden: int) -> nn.Module:
    """examples/digits.py's MLP (hidden=256: that very model and init), or the same shape wider."""
    if hidden == 256:
        return make_model(seed)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))  # fmt: skip


def methods() -> list[str]:
    """Every method of GRID that this sharpfused has (ESAM and MESA may not be there yet)."""
    need = {"AE-SAM": "AESAM", "SGD (fused)": "RST"}
    return [m for m in GRID if m == "SGD" or hasattr(sharpfused, need.get(m, m))]


class Run:
    """One method, one seed: an epoch at a time, so that several runs can be interleaved."""

    def __init__(self, method: str, value, data, seed: int, epochs: int, hidden: int = 256) -> None:
        self.method, self.value, self.epochs = method, value, epochs
        self.xtr, self.ytr, self.xte, self.yte = data
        self.model = build_model(seed, hidden)
        self.rng = torch.get_rng_state()  # this run's own dropout masks, whatever runs between its epochs
        self.gen = torch.Generator().manual_seed(seed)
        steps = epochs * -(-len(self.xtr) // BATCH)
        knob, _, fixed = GRID[method]
        kw = {**fixed, **({knob: value} if knob else {})}
        p = self.model.parameters()
        sgd = torch.optim.SGD
        if method == "SGD":
            self.opt = sgd(p, **BASE)
        elif method == "AE-SAM":
            self.opt = sharpfused.AESAM(p, sgd, total_steps=steps, **kw, **BASE)
        elif method == "MESA":
            self.opt = sharpfused.MESA(p, sgd, start_step=min(5, epochs - 1) * (steps // epochs), **kw, **BASE)
        elif method == "SGD (fused)":
            self.opt = sharpfused.RST(p, sgd, **kw, **BASE)
        elif method == "ESAM":
            self.opt = sharpfused.ESAM(p, sgd, seed=seed, **kw, **BASE)
        else:
            self.opt = getattr(sharpfused, method)(p, sgd, **kw, **BASE)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, epochs)
        self.seconds: list[float] = []
        self.passes = self.steps = 0

    def _step(self, x, y) -> None:
        model, opt = self.model, self.opt
        if self.method == "SGD":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            self.passes += 1
            return
        if self.method == "ESAM":  # SWP, and the second pass on the samples whose loss rose most (SDS)
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            opt.first_step(zero_grad=True)
            with torch.no_grad():
                after = F.cross_entropy(model(x), y, reduction="none")
            idx = opt.select(losses.detach(), after)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.second_step(zero_grad=True)
            self.passes += 2  # (+ one forward without backward; the second pass on a gamma share of the batch)
            return

        def closure():
            self.passes += 1
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if self.method == "MESA":
                loss = loss + opt.trajectory_loss(logits, model, x)
            loss.backward()
            return loss

        opt.step(closure)

    def epoch(self) -> None:
        self.model.train()
        order = torch.randperm(len(self.xtr), generator=self.gen).split(BATCH)
        torch.set_rng_state(self.rng)
        t0 = time.perf_counter()
        for idx in order:
            self._step(self.xtr[idx], self.ytr[idx])
            self.steps += 1
        self.sched.step()
        self.seconds.append(time.perf_counter() - t0)
        self.rng = torch.get_rng_state()

    def accuracy(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return (self.model(self.xte).argmax(1) == self.yte).float().mean().item()

    def loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return F.cross_entropy(self.model(self.xte), self.yte).item()


def train_interleaved(runs: list[Run], epochs: int) -> None:
    for _ in range(epochs):
        for r in runs:
            r.epoch()


def tune(names: list[str], epochs: int, hidden: int) -> dict[str, object]:
    """Each method's knob chosen on a validation fifth of seed 100's noisy training set: the best
    accuracy there, ties (a fifth of 1257 samples is 251: ties are common) broken by the lower loss."""
    xtr, ytr, _, _ = load(NOISE, 100)
    n_val = len(xtr) // 5
    data = (xtr[n_val:], ytr[n_val:], xtr[:n_val], ytr[:n_val])
    chosen: dict[str, object] = {}
    for m in names:
        if GRID[m][0] is None:  # nothing to tune
            chosen[m] = None
            continue
        values = GRID[m][1]
        runs = [Run(m, v, data, 100, epochs, hidden) for v in values]
        train_interleaved(runs, epochs)
        scores = [(r.accuracy(), -r.loss()) for r in runs]
        chosen[m] = values[max(range(len(values)), key=scores.__getitem__)]
        print(f"tuning {m:<11} {GRID[m][0] or '':<4} "
              + "  ".join(f"{v}: acc {a:.4f} loss {-nl:.4f}" for v, (a, nl) in zip(values, scores)),
              flush=True)  # fmt: skip
    return chosen


def fmt_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.4f} +- {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--no-tune", action="store_true", help="use DEFAULT (the values tuned at width 256) instead of tuning"
    )
    ap.add_argument("--hidden", type=int, default=256, help="hidden width of the MLP (256: examples/digits.py's)")
    ap.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, no tuning (a smoke test, < 30 s)")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.no_tune = 2, 1, True
    out = Path(args.out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = methods()
    chosen = {m: DEFAULT.get(m) for m in names} if args.no_tune else tune(names, args.epochs, args.hidden)
    results: dict[str, list[Run]] = {m: [] for m in names}
    for seed in range(args.seeds):
        data = load(NOISE, seed)
        runs = [Run(m, chosen[m], data, seed, args.epochs, args.hidden) for m in names]
        train_interleaved(runs, args.epochs)
        for r in runs:
            results[r.method].append(r)
        print(f"seed {seed}: " + "  ".join(f"{r.method} {r.accuracy():.4f}" for r in runs), flush=True)

    acc = {m: [r.accuracy() for r in rs] for m, rs in results.items()}
    sec = {m: statistics.median([s for r in rs for s in r.seconds]) for m, rs in results.items()}
    mean_acc = {m: statistics.fmean(v) for m, v in acc.items()}
    gain_sam = mean_acc["SAM"] - mean_acc["SGD"]
    lines = [
        f"### Cheap sharpness on digits with {NOISE:.0%} label noise: MLP 64-{args.hidden}-{args.hidden}-10, {args.epochs} epochs, "
        f"SGD momentum base (lr 0.05, cosine), {args.seeds} seed(s); clean test labels",
        "",
        "| method | setting | test acc (mean +- std) | passes per step | s/epoch (median) | cost vs SGD "
        "| share of SAM's gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in names:
        knob, _, fixed = GRID[m]
        setting = ", ".join([f"{knob}={chosen[m]}"] * bool(knob) + [f"{k}={v}" for k, v in fixed.items()]) or "-"
        passes = sum(r.passes for r in results[m]) / sum(r.steps for r in results[m])
        share = (
            "-"
            if m in ("SGD", "SAM", "SGD (fused)") or gain_sam <= 0
            else f"{(mean_acc[m] - mean_acc['SGD']) / gain_sam:.0%}"
        )
        lines.append(
            f"| {m} | {setting} | {fmt_std(acc[m])} | {passes:.2f}{' (+1 fwd)' if m in ('ESAM', 'MESA') else ''} "
            f"| {sec[m]:.3f} | {sec[m] / sec['SGD']:.2f}x | {share} |"
        )
    meets = [m for m in names if m not in ("SGD", "SAM", "SGD (fused)") and gain_sam > 0 and sec[m] / sec["SGD"] <= 1.25
             and (mean_acc[m] - mean_acc["SGD"]) / gain_sam >= 0.7]  # fmt: skip
    lines += [
        "",
        f"SAM's gain over SGD: {gain_sam:+.4f}. Target (<= 1.25x SGD's time and >= 70% of SAM's gain): "
        + (", ".join(meets) if meets else "no method meets it") + ".",
        "",
        "Time: wall time on a small CPU (2 threads); this MLP's forward/backward on a batch of 64 costs about as "
        "much as an optimizer step's host work, so the optimizer's per-step overhead, not only the passes, sets "
        "the cost here. SGD (fused): the base step alone through sharpfused's fused path (RST with p=0: torch's SGD "
        "update, bit for bit on the test suite's models, within rounding on larger ones), the floor every sharpfused "
        "method pays on top of its passes.",
        "",
        "Passes: forward/backward passes per step, counted; ESAM adds a forward without backward (its data "
        "selection) and runs the second pass on half the batch; MESA adds a forward at the EMA weights. "
        + ("Settings: no tuning; the values tuned at width 256 (DEFAULT)." if args.no_tune else
           "Settings: each method's knob chosen among three values on a validation fifth of seed 100's noisy "
           "training set; the other knobs at the papers' defaults."),
        "",
        f"Command: `python examples/cheap_sharpness.py{' --quick' if args.quick else ''} --epochs {args.epochs} "
        f"--seeds {args.seeds}{' --no-tune' if args.no_tune and not args.quick else ''}"
        f"{f' --hidden {args.hidden}' if args.hidden != 256 else ''}{out_flag(out)}`.",
    ]  # fmt: skip
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cheap_sharpness" + (f"_h{args.hidden}" if args.hidden != 256 else "")
    (out / f"{stem}.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, m in enumerate(names):
        cost = sec[m] / sec["SGD"]
        sd = statistics.stdev(acc[m]) if len(acc[m]) > 1 else 0.0
        ax.errorbar(cost, mean_acc[m], yerr=sd, fmt="o", color=f"C{i}", capsize=3, label=m)
        ax.annotate(m, (cost, mean_acc[m]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if gain_sam > 0:
        ax.axhline(mean_acc["SGD"] + 0.7 * gain_sam, color="gray", ls=":", lw=1, label="70% of SAM's gain")
        ax.axvline(1.25, color="gray", ls="--", lw=1, label="1.25x SGD's time")
    ax.set_xlabel("wall time per epoch, relative to SGD")
    ax.set_ylabel("clean test accuracy")
    ax.set_title(f"digits, {NOISE:.0%} label noise, MLP width {args.hidden}: accuracy against cost "
                 f"({args.seeds} seed(s))", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {shown(out)}/{stem}.md and {stem}.png")


if __name__ == "__main__":
    main()
