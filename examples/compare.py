"""SGD and the SAM family on scikit-learn's digits: accuracy, loss curves and flatness of the minima.

Real data that ships inside scikit-learn (1797 8x8 digits, no download; scikit-learn's larger
sets -- fetch_openml, fetch_covtype, ... -- all need the network). The MLP, split, batches and
initialization of examples/digits.py; every optimizer sees the same init and batch order per
seed. The optimizers are the ones sharpfused exports when this runs, among SGD, SAM, ASAM, GSAM,
XSAM and BiSAM. After training, sharpness is measured on the training set with
:mod:`sharpfused.metrics`: the Hessian's top eigenvalue, the surrogate gap at rho=0.05, and a 1-D
filter-normalized loss slice.

    python examples/compare.py [--epochs 40] [--seeds 2]      # 3.5 minutes on 2 shared CPU cores
    python examples/compare.py --out examples/results         # update the committed figures

Writes compare.md (table), compare_accuracy.png, compare_loss.png, compare_landscape.png into
``--out``: by default out/examples/ at the repository root (untracked, gitignored), so a run
never touches the committed examples/results/ unless that folder is asked for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits import load, make_model  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused import metrics  # noqa: E402

RESULTS = HERE / "results"  # the committed figures: written only when --out names this folder
OUT = HERE.parent / "out" / "examples"  # the default output folder (untracked)
CANDIDATES = ["SGD", "SAM", "ASAM", "GSAM", "XSAM", "BiSAM"]
BASE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def add_out_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--out",
        default=str(OUT),
        help="folder of the tables and figures (default out/examples/, untracked); "
        "--out examples/results updates the committed ones",
    )


def shown(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it, else as given."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def out_flag(out: Path) -> str:
    """The ``--out`` part of the command line written into a table (empty for the default folder)."""
    return "" if out.resolve() == OUT.resolve() else f" --out {shown(out)}"


def available() -> list[str]:
    """SGD, SAM, ASAM (SAM with adaptive=True), then each successor that sharpfused exports now."""
    return [n for n in CANDIDATES if n in ("SGD", "SAM", "ASAM") or hasattr(sharpfused, n)]


def make_optimizer(name: str, params, rho: float):
    if name == "SGD":
        return torch.optim.SGD(params, **BASE)
    if name == "SAM":
        return sharpfused.SAM(params, torch.optim.SGD, rho=rho, **BASE)
    if name == "ASAM":
        return sharpfused.SAM(params, torch.optim.SGD, rho=10 * rho, adaptive=True, **BASE)
    if name == "GSAM":  # rho follows the cosine lr from rho_max down to rho_min
        return sharpfused.GSAM(params, torch.optim.SGD, rho_max=rho, rho_min=rho / 5, alpha=0.1, **BASE)
    if name == "XSAM":
        return sharpfused.XSAM(params, torch.optim.SGD, rho=rho, rho_max=2 * rho, **BASE)
    if name == "BiSAM":
        return sharpfused.BiSAM(params, torch.optim.SGD, rho=rho, **BASE)
    raise ValueError(name)


def train_step(name: str, model, opt, x, y, search: bool = False) -> None:
    if name == "SGD":
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return
    if name == "BiSAM":  # the perturbation ascends BiSAM's lower bound of the 0-1 loss
        sharpfused.losses.bisam_lower_bound(model(x), y, backend="torch").backward()
    else:
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    if search and name == "XSAM":  # the authors' alpha search, on the first batch of each epoch
        opt.search_alpha(lambda: F.cross_entropy(model(x), y))
    opt.second_step(zero_grad=True)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        return (out.argmax(1) == y).float().mean().item(), F.cross_entropy(out, y).item()


def run(name: str, epochs: int, data, seed: int, rho: float, bar=None, landscape: bool = False) -> dict:
    """Train one model; returns per-epoch curves, final accuracy and sharpness measures."""
    xtr, ytr, xte, yte = data
    model = make_model(seed)
    opt = make_optimizer(name, model.parameters(), rho)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    curve = {"train_loss": [], "test_loss": [], "test_acc": []}
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for i, idx in enumerate(torch.randperm(len(xtr), generator=g).split(64)):
            train_step(name, model, opt, xtr[idx], ytr[idx], search=i == 0)
        sched.step()
        acc, loss = evaluate(model, xte, yte)
        curve["test_acc"].append(acc)
        curve["test_loss"].append(loss)
        curve["train_loss"].append(evaluate(model, xtr, ytr)[1])
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - t0
    model.eval()  # dropout off: the loss is a deterministic function of the weights
    batch = (xtr, ytr)
    out = dict(name=name, seed=seed, seconds=seconds, **curve, acc=curve["test_acc"][-1])
    out["lambda_max"] = metrics.hessian_top_eigenvalue(model, ce, [batch], iters=30, tol=1e-3, seed=seed)
    out["gap"] = metrics.surrogate_gap(model, ce, batch, rho=0.05)
    if landscape:
        out["landscape"] = metrics.loss_landscape(model, ce, batch, directions=1, span=1.0, steps=21, seed=seed)
    return out


def mean(xs):
    return statistics.fmean(xs)


def summarize(results: dict[str, list[dict]], header: str) -> str:
    lines = [header, "",
             "| optimizer | test acc (mean) | per seed | final train loss | Hessian top eigenvalue | surrogate gap (rho=0.05) | s/run |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, rs in results.items():
        per = " ".join(f"{r['acc']:.3f}" for r in rs)
        lines.append(
            f"| {n} | {mean([r['acc'] for r in rs]):.4f} | {per} "
            f"| {mean([r['train_loss'][-1] for r in rs]):.4f} | {mean([r['lambda_max'] for r in rs]):.2f} "
            f"| {mean([r['gap'] for r in rs]):.5f} | {mean([r['seconds'] for r in rs]):.1f} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict]], prefix: str, title: str, out: Path = OUT) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in [("test_acc", "test accuracy", "accuracy"), (None, "loss", "loss")]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (n, rs) in enumerate(results.items()):
            color = f"C{i}"
            keys = [key] if key else ["test_loss", "train_loss"]
            for k in keys:
                ys = [mean(v) for v in zip(*[r[k] for r in rs])]
                ls = "--" if k == "train_loss" else "-"
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    ls,
                    color=color,
                    label=f"{n}" + (f" ({k.split('_')[0]})" if not key else ""),
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if key:
            lo = min(min(r[key][-1] for r in rs) for rs in results.values())
            ax.set_ylim(max(0.0, lo - 0.08), 1.0)
        else:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"{prefix}_{fname}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--optimizers", default=None, help=f"comma-separated subset of {CANDIDATES}")
    add_out_argument(ap)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = args.optimizers.split(",") if args.optimizers else available()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tqdm(total=args.epochs * len(names) * args.seeds, desc="training", unit="epoch") as bar:
        for seed in range(args.seeds):
            data = load(0.0, seed)
            for n in names:
                bar.set_postfix_str(f"{n} seed {seed}")
                results[n].append(run(n, args.epochs, data, seed, args.rho, bar, landscape=seed == 0))
    title = (f"scikit-learn digits, MLP 64-256-256-10, {args.epochs} epochs, SGD momentum base, "
             f"rho={args.rho}, mean of {args.seeds} seeds")  # fmt: skip
    table = summarize(results, f"### {title}")
    print("\n" + table)
    plot_curves(results, "compare", title, out)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n, rs in results.items():
        metrics.plot_landscape(rs[0]["landscape"], ax=ax, label=n)
    ax.set_yscale("log")
    ax.set_title("training loss along one filter-normalized direction (seed 0)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare_landscape.png", dpi=110)
    plt.close(fig)
    (out / "compare.md").write_text(
        table + "\n\nHessian top eigenvalue: power iteration on Hessian-vector products of the training loss "
        "(dropout off, full training set). Surrogate gap: L(w + rho g/||g||) - L(w) on the training set.\n"
        f"Command: `python examples/compare.py --epochs {args.epochs} --seeds {args.seeds} --rho {args.rho}"
        f"{out_flag(out)}`.\n"
    )
    print(f"\nwrote {shown(out)}/compare.md and compare_*.png")


if __name__ == "__main__":
    main()
