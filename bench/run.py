"""Benchmark a whole optimizer step (first_step + second_step, no forward/backward).

Providers: the eager per-parameter loop of the popular SAM port and an eager foreach version
(both from tests/baselines.py, the baselines the tests trust), against sharpfused on every
backend available on the machine. Prints a markdown table and appends rows to
bench/results/<device>.csv.

    python bench/run.py            # full-size lists (ResNet-50, GPT-2 small; 1B on GPU)
    python bench/run.py --quick    # small lists, CPU, under 2 minutes
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import shapes as shape_sets  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused import ops  # noqa: E402
from tests.baselines import EagerForeachSAM, EagerLoopSAM  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def timer(fn, device, warmup: int, repeat: int) -> list[float]:
    """Milliseconds per call: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def make_params(shape_list, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    ps = []
    for s in shape_list:
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype))
        p.grad = torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def providers(device):
    out = [("eager-loop", EagerLoopSAM, {}), ("eager-foreach", EagerForeachSAM, {})]
    for b in ops.BACKENDS:
        if ops.unavailable_reason(b, device) is None and not (b == "triton" and device.type == "cpu"):
            out.append((f"sharpfused-{b}", sharpfused.SAM, {"backend": b}))
    return out


def sam_step_bytes(n: int, elt: int, momentum: bool) -> int:
    """Fewest bytes a SAM+SGD step moves: norm (read g), perturb (read w,g; write w,backup),
    restore+SGD (read backup,g,[buf]; write w,[buf])."""
    return n * elt * (1 + 4 + 3 + (2 if momentum else 0))


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small lists on CPU, under 2 minutes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", default=None, help="comma-separated shape sets")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sets = args.sets.split(",") if args.sets else (["resnet50", "gpt2-small"] + (["llm-1b"] if device.type == "cuda" else []))
    factor = 4 if args.quick else 1
    repeat = args.repeat or (5 if device.type == "cpu" else 50)
    dev_name = device_name(device)
    rows = []
    print(f"# SAM step (first_step + second_step, SGD momentum base), {dev_name}, torch {torch.__version__}\n")
    print("| set | dtype | tensors | params | provider | median ms | p20 | p80 | vs eager-loop | vs eager-foreach | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for set_name in sets:
        shape_list = shape_sets.SETS[set_name]()
        if factor > 1:
            shape_list = shape_sets.scaled(shape_list, factor)
        n = shape_sets.numel(shape_list)
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            results = {}
            for pname, cls, extra in providers(device):
                params = make_params(shape_list, dtype, device)
                opt = cls(params, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, **extra)

                def step(opt=opt):
                    opt.first_step()
                    opt.second_step()

                ms = timer(step, device, warmup=2 if device.type == "cpu" else 10, repeat=repeat)
                q = statistics.quantiles(ms, n=5) if len(ms) >= 5 else [min(ms)] * 4
                med = statistics.median(ms)
                results[pname] = med
                del opt, params
                gbs = sam_step_bytes(n, torch.empty((), dtype=dtype).element_size(), True) / med / 1e6
                rows.append(dict(set=set_name + ("/4" if factor > 1 else ""), dtype=dt_name, tensors=len(shape_list),
                                 params=n, provider=pname, median_ms=med, p20_ms=q[0], p80_ms=q[3], gbps=gbs))
                loop, fe = results.get("eager-loop"), results.get("eager-foreach")
                print(f"| {rows[-1]['set']} | {dt_name} | {len(shape_list)} | {n / 1e6:.1f}M | {pname} | {med:.2f} | "
                      f"{q[0]:.2f} | {q[3]:.2f} | {loop / med:.2f}x | {(fe / med) if fe else float('nan'):.2f}x | {gbs:.1f} |",
                      flush=True)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{dev_name.replace(' ', '_').replace('/', '_')}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "version", "commit", "op", *rows[0].keys()])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"device": dev_name, "version": sharpfused.__version__, "commit": git_commit(), "op": "sam_step", **r})
    print(f"\nrows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
