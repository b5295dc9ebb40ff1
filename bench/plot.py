"""Turn a bench/run.py CSV (<results>/<device>.csv) into PNGs (matplotlib, Agg backend).

For each kind (``step``, ``primitive``): one panel per (shape set, dtype), grouped bars of
achieved GB/s per op and provider, from the latest run of each (op, set, dtype, provider) in
the file. The speedup over the eager loop is written above each sharpfused bar.

    python bench/plot.py out/bench/<device>.csv     # writes <device>_step.png, <device>_primitive.png beside it
    python bench/plot.py                           # every CSV in out/bench/ (bench/run.py's default folder)
    python bench/plot.py --results bench/results   # redraw the committed figures
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def latest_rows(path: Path) -> list[dict]:
    """The last row written for each (kind, op, set, dtype, provider)."""
    last: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            last[(r["kind"], r["op"], r["set"], r["dtype"], r["provider"])] = r
    return list(last.values())


def plot_csv(path: Path) -> list[Path]:
    path = Path(path)
    rows = latest_rows(path)
    out = []
    for kind in ("step", "primitive"):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        panels = sorted({(r["set"], r["dtype"]) for r in sel})
        ops = list(dict.fromkeys(r["op"] for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.3 * len(ops) * len(providers) / 2), 3.2 * len(panels)),
                                 squeeze=False)  # fmt: skip
        width = 0.8 / len(providers)
        for ax, (set_name, dtype) in zip(axes[:, 0], panels):
            for j, prov in enumerate(providers):
                xs, ys, labels = [], [], []
                for i, op in enumerate(ops):
                    r = next(
                        (
                            r
                            for r in sel
                            if (r["set"], r["dtype"], r["op"], r["provider"]) == (set_name, dtype, op, prov)
                        ),
                        None,
                    )
                    if r is None:
                        continue
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(float(r["gbps"]))
                    sp = r.get("vs_eager-loop") or ""
                    labels.append(sp)
                bars = ax.bar(xs, ys, width, label=prov)
                if prov.startswith("sharpfused"):
                    loop = {r["op"]: float(r["median_ms"]) for r in sel
                            if (r["set"], r["dtype"], r["provider"]) == (set_name, dtype, "eager-loop")}  # fmt: skip
                    for b, op in zip(
                        bars,
                        [
                            op
                            for op in ops
                            if any(
                                (r["set"], r["dtype"], r["op"], r["provider"]) == (set_name, dtype, op, prov)
                                for r in sel
                            )
                        ],
                    ):
                        me = next(float(r["median_ms"]) for r in sel
                                  if (r["set"], r["dtype"], r["op"], r["provider"]) == (set_name, dtype, op, prov))  # fmt: skip
                        if op in loop:
                            ax.annotate(f"{loop[op] / me:.1f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                        ha="center", va="bottom", fontsize=7)  # fmt: skip
            copy = float(sel[0]["copy_gbps"])
            ax.axhline(copy, color="gray", ls="--", lw=0.8, label=f"copy {copy:.0f} GB/s")
            ax.set_xticks(range(len(ops)))
            ax.set_xticklabels(ops, fontsize=8)
            ax.set_ylabel("GB/s (byte model)")
            ax.set_title(f"{kind}: {set_name}, {dtype} -- {sel[0]['device']}", fontsize=9)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        png = path.with_name(f"{path.stem}_{kind}.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        out.append(png)
    return out


DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "out" / "bench"  # bench/run.py's default --results


def main(argv: Optional[list[str]] = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", help="CSV files written by bench/run.py (default: every *.csv in --results)")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS),
                    help="folder whose CSVs are drawn when none is named (default out/bench, untracked)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.csv] or sorted(p for p in Path(args.results).glob("*.csv") if ".old" not in p.name)
    if not paths:
        ap.error(f"no CSV given and none in {args.results} (bench/run.py writes them there)")
    out = []
    for p in paths:
        if not p.is_file():
            ap.error(f"{p}: no such file")
        for png in plot_csv(p):
            print(png)
            out.append(png)
    return out


if __name__ == "__main__":
    main()
