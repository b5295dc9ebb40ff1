"""Robustness to label noise, in the spirit of the SAM paper's table (Foret et al., ICLR 2021, Table 4).

A fraction of the training labels of scikit-learn's digits is replaced by uniformly random
labels (the test labels stay clean); the same MLP is trained with SGD and with sharpfused SAM at
each noise level, same init and batches per seed. Reported: clean test accuracy at the end of
training, the best over epochs, and the Hessian's top eigenvalue on the (noisy) training set.

    python examples/label_noise.py [--noise 0,0.2,0.4,0.6] [--epochs 40] [--seeds 2] [--rho 0.1]
    python examples/label_noise.py --out examples/results     # update the committed figures

Writes label_noise.md and label_noise.png into ``--out``: by default out/examples/ at the
repository root (untracked, gitignored); the committed examples/results/ only when asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import add_out_argument, mean, out_flag, run, shown  # noqa: E402
from digits import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", default="0,0.2,0.4,0.6")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rho", type=float, default=0.1)
    add_out_argument(ap)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    levels = [float(x) for x in args.noise.split(",")]
    names = ["SGD", "SAM"]
    res: dict[tuple[float, str], list[dict]] = {}
    with tqdm(total=len(levels) * len(names) * args.seeds * args.epochs, desc="label noise", unit="epoch") as bar:
        for noise in levels:
            for seed in range(args.seeds):
                data = load(noise, seed)
                for n in names:
                    bar.set_postfix_str(f"noise {noise:.0%} {n} seed {seed}")
                    res.setdefault((noise, n), []).append(run(n, args.epochs, data, seed, args.rho, bar))
    lines = [
        f"### Label noise on scikit-learn digits: MLP 64-256-256-10, {args.epochs} epochs, SGD momentum base "
        f"(lr 0.05, cosine), SAM rho={args.rho}, mean of {args.seeds} seeds; test labels clean",
        "",
        "| label noise | SGD test acc (final) | SAM test acc (final) | SAM - SGD | SGD best | SAM best "
        "| SGD Hessian top eig | SAM Hessian top eig |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for noise in levels:
        sgd, sam = res[(noise, "SGD")], res[(noise, "SAM")]
        a_sgd, a_sam = mean([r["acc"] for r in sgd]), mean([r["acc"] for r in sam])
        lines.append(
            f"| {noise:.0%} | {a_sgd:.4f} | {a_sam:.4f} | {a_sam - a_sgd:+.4f} "
            f"| {mean([max(r['test_acc']) for r in sgd]):.4f} | {mean([max(r['test_acc']) for r in sam]):.4f} "
            f"| {mean([r['lambda_max'] for r in sgd]):.2f} | {mean([r['lambda_max'] for r in sam]):.2f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_noise.md").write_text(
        table + "\n\nCommand: `python examples/label_noise.py "
        f"--noise {args.noise} --epochs {args.epochs} --seeds {args.seeds} --rho {args.rho}{out_flag(out)}`.\n"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(names):
        ax1.plot(
            [100 * x for x in levels],
            [mean([r["acc"] for r in res[(x, n)]]) for x in levels],
            "o-",
            color=f"C{i}",
            label=n,
        )
    ax1.set_xlabel("training labels replaced at random (%)")
    ax1.set_ylabel("clean test accuracy (final epoch)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    for j, noise in enumerate(levels):
        for n in names:
            ys = [mean(v) for v in zip(*[r["test_acc"] for r in res[(noise, n)]])]
            ax2.plot(range(1, len(ys) + 1), ys, "-" if n == "SAM" else "--", color=f"C{j + 2}",
                     label=f"{n}, {noise:.0%} noise")  # fmt: skip
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("clean test accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"digits, label noise: SGD vs SAM (rho={args.rho}), mean of {args.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "label_noise.png", dpi=110)
    plt.close(fig)
    print(f"\nwrote {shown(out)}/label_noise.md and label_noise.png")


if __name__ == "__main__":
    main()
