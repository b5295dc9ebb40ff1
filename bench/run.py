"""Benchmark the seven primitives and whole optimizer steps against eager PyTorch.

Two kinds of rows, on parameter lists shaped like real models (bench/shapes.py):

* ``primitive``: each of ops.sq_norm, perturb_, restore_, dot_norms, combine_, restore_sgd_,
  restore_adamw_ on every backend available on the machine, against the eager per-tensor loop
  equivalent (``tests/baselines.py: LOOP_PRIMITIVES``).
* ``step``: a whole optimizer step (first_step + second_step, SGD momentum base, no
  forward/backward) of SAM, ASAM and GSAM (GSAM when sharpfused has it), and SAM with an AdamW
  base (``SAM-AdamW``), against the eager
  per-parameter loop port and an eager foreach version (``tests/baselines.py``: the baselines
  the tests check against the float64 reference).

On CPU the providers of a step are built side by side and timed round-robin (a shared machine's
load drifts within a run; sequential timing once put 2x between two runs of the same code).

Prints a markdown table (median ms and p20/p80, speedup vs each baseline, the bytes per element
a step moves (counted from the primitives it calls, the minimum beside it), GB/s from that byte
model and its fraction of the device-to-device copy bandwidth measured in the same run), appends
rows to ``<results>/<device>.csv`` (``--results``; default ``out/bench``, untracked; the committed
figures are written with ``--results bench/results``) and (``--plot``, on by default) redraws the
PNGs with bench/plot.py.

    python bench/run.py            # full-size lists (ResNet-50, GPT-2 small; a 1.1B decoder on GPU)
    python bench/run.py --quick    # every dimension / 8, few repeats: under 2 minutes on CPU
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import shapes as shape_sets  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused import ops  # noqa: E402
from sharpfused.spec import SPECS  # noqa: E402
from tests.baselines import (  # noqa: E402
    LOOP_PRIMITIVES,
    EagerForeachASAM,
    EagerForeachGSAM,
    EagerForeachSAM,
    EagerLoopGSAM,
    EagerLoopSAM,
)

FIELDS = [
    "device", "version", "commit", "torch", "kind", "op", "set", "dtype", "tensors", "params", "provider",
    "median_ms", "p20_ms", "p80_ms", "gbps", "copy_gbps", "frac_copy",
]  # fmt: skip

# Bytes moved per parameter element, in units of b = bytes per element (all tensors in the
# parameter dtype). Primitives: each input read once, each output written once (ops.py).
# Bytes per element (units of b) of each primitive as the bench calls it (the spec's typical call:
# every list given but the optional inputs that default to None, ASAM's weights, SSAM's mask).
PRIMITIVE_BYTES = {n: p.typical_bytes() for n, p in SPECS.items()}
# A step's bytes are counted from the primitives it calls (step_bytes: one steady-state step on a
# tiny list with every ops.<primitive> wrapped, each call's bytes by call_bytes), so the model
# follows the code. STEP_MIN_BYTES is the least a step of the algorithm has to move (every
# gradient read the algorithm needs, nothing more); today's steps read the final gradient once
# more for the non-finite/clip check (final_grad_check's sq_norm): SAM 11b against 10b.
STEP_MIN_BYTES = {
    "SAM": 1 + 4 + 5,  # sq_norm(g) + perturb_ + restore_sgd_
    "ASAM": 2 + 4 + 5,  # sq_norm(g weighted by w) + perturb_ + restore_sgd_
    "GSAM": 2 + 1 + 4 + 2 + 3 + 5,  # copy g -> saved, sq_norm, perturb_, dot_norms, combine_, restore_sgd_
    "SAM-AdamW": 1 + 4 + 7,  # sq_norm(g) + perturb_ + restore_adamw_
}


def call_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes per parameter element (units of b) that one call of primitive ``name`` moves with
    these arguments (the spec's byte model: optional lists counted when given)."""
    p = SPECS[name]
    values = {a.name: a.default for a in p.args}
    values.update(zip(p.names, args))
    values.update(kwargs)
    return p.bytes(values)


_STEP_BYTES: dict[str, int] = {}


def step_bytes(algo: str) -> int:
    """Bytes per element (units of b) of one steady-state step of ``algo`` as the code runs it."""
    if algo not in _STEP_BYTES:
        import sharpfused.ops as ops_mod

        calls: list[int] = []
        saved = {n: getattr(ops_mod, n) for n in ops.PRIMITIVES}

        def wrap(n, f):
            def counted(*a, **k):
                calls.append(call_bytes(n, a, k))
                return f(*a, **k)

            return counted

        try:
            for n, f in saved.items():
                setattr(ops_mod, n, wrap(n, f))
            _, cls, kw = [p for p in step_providers(algo, torch.device("cpu")) if p[0] == "sharpfused-torch"][0]
            step, _ = step_call(cls, kw, [(8, 3), (5,)], torch.float32, torch.device("cpu"))
            step()  # the first step creates the base optimizer's state (no momentum read)
            calls.clear()
            step()
        finally:
            for n, f in saved.items():
                setattr(ops_mod, n, f)
        if not calls:  # the step no longer calls through sharpfused.ops: nothing was counted
            raise RuntimeError(f"step_bytes({algo!r}): no sharpfused.ops primitive was called; fix the byte model")
        _STEP_BYTES[algo] = sum(calls)
    return _STEP_BYTES[algo]


# ----------------------------------------------------------------------------- machine facts
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    if not name or name in ("x86_64", "aarch64"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return name or platform.machine() or "cpu"


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "describe", "--always", "--dirty", "--abbrev=8"], cwd=HERE, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Milliseconds per call: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    if device.type == "cuda":
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


def timer_interleaved(fns: list[Callable[[], object]], warmup: int, repeat: int) -> list[list[float]]:
    """CPU: milliseconds per call of each of ``fns``, taken round-robin (one call of each per
    round), so that the load of a shared machine drifting during the run hits every provider alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ms in zip(fns, out):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    if len(ms) >= 5:
        q = statistics.quantiles(ms, n=5)
        return statistics.median(ms), q[0], q[3]
    return statistics.median(ms), min(ms), max(ms)


def copy_elements(device: torch.device, quick: bool) -> int:
    """fp32 elements of the copy: 128 MiB on CPU, 1 GiB on GPU (far past any cache); half with --quick."""
    n = (32 << 20) if device.type == "cpu" else (256 << 20)
    return n // 2 if quick else n


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written): the memory ceiling of this run."""
    n = copy_elements(device, quick)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), device, warmup=2, repeat=5 if device.type == "cpu" else 20)
    return 2 * n * 4 / statistics.median(ms) / 1e6


# ----------------------------------------------------------------------------- inputs
def make_tensors(shape_list, dtype, device, k: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """``k`` parallel lists of random tensors (never zeros: they can time faster than real data)."""
    # drawn on the device itself: a 1B-element list drawn on the host would dominate a GPU run
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(k):
        out.append([torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shape_list])
    return out


def make_params(shape_list, dtype, device) -> list[torch.nn.Parameter]:
    w, gr = make_tensors(shape_list, dtype, device, 2)
    ps = []
    for x, y in zip(w, gr):
        p = torch.nn.Parameter(x)
        p.grad = y
        ps.append(p)
    return ps


def backends(device: torch.device) -> list[str]:
    """sharpfused backends that run natively here (the Triton interpreter on CPU is not timed)."""
    out = []
    for b in ops.BACKENDS:
        if ops.unavailable_reason(b, device) is None and not (b != "torch" and device.type == "cpu"):
            out.append(b)
    return out


# ----------------------------------------------------------------------------- primitives
def primitive_calls(name: str, shape_list, dtype, device, impl) -> Callable[[], object]:
    """A zero-argument call of primitive ``name`` through ``impl`` (a module or dict of functions)."""
    fn = impl[name] if isinstance(impl, dict) else getattr(impl, name)
    if name == "sq_norm":
        (x,) = make_tensors(shape_list, dtype, device, 1)
        return lambda: fn(x)
    if name == "perturb_":
        w, g, b = make_tensors(shape_list, dtype, device, 3)
        scale = torch.tensor(1e-4, device=device, dtype=torch.float32)
        return lambda: fn(w, g, b, scale)
    if name == "restore_":
        w, b = make_tensors(shape_list, dtype, device, 2)
        return lambda: fn(w, b)
    if name == "dot_norms":
        a, b = make_tensors(shape_list, dtype, device, 2)
        return lambda: fn(a, b)
    if name == "combine_":
        g, s = make_tensors(shape_list, dtype, device, 2)
        c1 = torch.tensor(1.0, device=device, dtype=torch.float32)
        return lambda: fn(g, s, c1, -1e-3)
    if name == "restore_sgd_":
        w, b, g, buf = make_tensors(shape_list, dtype, device, 4)
        return lambda: fn(w, b, g, buf, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=5e-4,
                          nesterov=False, init_momentum=False)  # fmt: skip
    if name == "restore_adamw_":
        w, b, g, m, v = make_tensors(shape_list, dtype, device, 5)
        for x in v:
            x.abs_()  # a second moment is non-negative
        return lambda: fn(w, b, g, m, v, step=10, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    if name == "restore_rmsprop_":
        w, b, g, v, buf = make_tensors(shape_list, dtype, device, 5)
        for x in v:
            x.abs_()  # a running mean of squares is non-negative
        return lambda: fn(w, b, g, v, buf, lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-2, momentum=0.9)
    raise ValueError(name)


class _Backend:
    """ops.<name>(..., backend=b) as an object with the primitives as attributes."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        f = getattr(ops, name)
        return lambda *a, **k: f(*a, backend=self.backend, **k)


def primitive_providers(device: torch.device) -> list[tuple[str, object]]:
    return [("eager-loop", LOOP_PRIMITIVES)] + [(f"sharpfused-{b}", _Backend(b)) for b in backends(device)]


# ----------------------------------------------------------------------------- whole steps
def step_providers(algo: str, device: torch.device) -> list[tuple[str, Callable, dict]]:
    """(provider, class, keyword arguments) for one algorithm; baselines first."""
    if algo == "SAM":
        base = [("eager-loop", EagerLoopSAM, {}), ("eager-foreach", EagerForeachSAM, {})]
        return base + [(f"sharpfused-{b}", sharpfused.SAM, {"backend": b}) for b in backends(device)]
    if algo == "ASAM":
        kw = {"adaptive": True, "rho": 0.5}
        base = [("eager-loop", EagerLoopSAM, kw), ("eager-foreach", EagerForeachASAM, kw)]
        return base + [(f"sharpfused-{b}", sharpfused.SAM, {**kw, "backend": b}) for b in backends(device)]
    if algo == "GSAM":
        base = [("eager-loop", EagerLoopGSAM, {"alpha": 0.01}), ("eager-foreach", EagerForeachGSAM, {"alpha": 0.01})]
        return base + [
            (f"sharpfused-{b}", sharpfused.GSAM, {"rho_max": 0.05, "alpha": 0.01, "backend": b})
            for b in backends(device)
        ]
    if algo == "SAM-AdamW":  # SAM with torch.optim.AdamW as the base (restore_adamw_)
        kw = {"base": "adamw"}
        base = [("eager-loop", EagerLoopSAM, kw), ("eager-foreach", EagerForeachSAM, kw)]
        return base + [(f"sharpfused-{b}", sharpfused.SAM, {**kw, "backend": b}) for b in backends(device)]
    raise ValueError(algo)


def algorithms() -> list[str]:
    return ["SAM", "ASAM"] + (["GSAM"] if hasattr(sharpfused, "GSAM") else []) + ["SAM-AdamW"]


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


def _drop_tables() -> None:
    """Forget every Triton launch table (layouts kept): what new addresses for every list cost."""
    table = sys.modules.get("sharpfused.kernels.table")
    if table is not None:
        table.drop_tables()


def step_call(cls, kw: dict, shape_list, dtype, device, fresh: bool = False) -> tuple[Callable[[], object], object]:
    """One step (first_step + second_step) on the same gradients every time; ``fresh``: the
    gradients are other tensors every step (two sets taken in turn, as after
    ``zero_grad(set_to_none=True)``) and every launch table is rebuilt (the worst case: no address
    seen before). No extra bytes move: only the host and upload cost of the rebuilds is added."""
    params = make_params(shape_list, dtype, device)
    kw = dict(kw)
    base_cls, base_kw = BASES[kw.pop("base", "sgd")]
    if "rho" not in kw and "rho_max" not in kw:
        kw["rho"] = 0.05
    opt = cls(params, base_cls, **base_kw, **kw)
    sets = [[p.grad for p in params], [p.grad.clone() for p in params]] if fresh else None
    turn = [0]

    def step() -> None:
        if sets is not None:
            turn[0] ^= 1
            for p, g in zip(params, sets[turn[0]]):
                p.grad = g
            _drop_tables()
        opt.first_step()
        opt.second_step()

    return step, opt


# ----------------------------------------------------------------------------- the run
def measure(
    shape_list,
    set_name: str,
    dtype: torch.dtype,
    device: torch.device,
    repeat: int,
    warmup: int,
    copy_gbps: float,
    prims: Optional[list[str]] = None,
    algos: Optional[list[str]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
    fresh_grads: bool = False,
) -> list[dict]:
    """Time every (primitive or algorithm, provider) on one list; returns rows with speedups.
    ``fresh_grads``: each algorithm also as "<algo> fresh-grads" (see step_call)."""
    prims = list(ops.PRIMITIVES) if prims is None else prims
    algos = algorithms() if algos is None else algos
    n = shape_sets.numel(shape_list)
    elt = torch.empty((), dtype=dtype).element_size()
    dt_name = str(dtype).replace("torch.", "")
    rows = []

    def record(kind, op, provider, ms, bytes_per_elt, min_bytes=None):
        med, p20, p80 = summarize(ms)
        gbps = n * elt * bytes_per_elt / med / 1e6
        row = dict(kind=kind, op=op, set=set_name, dtype=dt_name, tensors=len(shape_list), params=n, provider=provider,
                   median_ms=med, p20_ms=p20, p80_ms=p80, gbps=gbps, copy_gbps=copy_gbps,
                   frac_copy=gbps / copy_gbps if copy_gbps else float("nan"),
                   bytes=bytes_per_elt, min_bytes=bytes_per_elt if min_bytes is None else min_bytes)  # fmt: skip
        group = [r for r in rows if r["kind"] == kind and r["op"] == op] + [row]
        for base in ("eager-loop", "eager-foreach"):
            b = next((r for r in group if r["provider"] == base), None)
            row[f"vs_{base}"] = b["median_ms"] / med if b else float("nan")
        rows.append(row)
        if on_row:
            on_row(row)

    for name in prims:
        for pname, impl in primitive_providers(device):
            fn = primitive_calls(name, shape_list, dtype, device, impl)
            record("primitive", name, pname, timer(fn, device, warmup, repeat), PRIMITIVE_BYTES[name])
            del fn
            _free(device)
    for algo, fresh in [(a, f) for a in algos for f in ([False, True] if fresh_grads else [False])]:
        providers = step_providers(algo, device)
        op = algo + (" fresh-grads" if fresh else "")
        if device.type == "cpu":  # all providers side by side, timed round-robin (timer_interleaved)
            calls = [step_call(cls, kw, shape_list, dtype, device, fresh)[0] for _, cls, kw in providers]
            for (pname, _, _), ms in zip(providers, timer_interleaved(calls, warmup, repeat)):
                record("step", op, pname, ms, step_bytes(algo), STEP_MIN_BYTES.get(algo))
            del calls
            _free(device)
            continue
        for pname, cls, kw in providers:  # GPU: one at a time (memory), CUDA events
            fn, opt = step_call(cls, kw, shape_list, dtype, device, fresh)
            record("step", op, pname, timer(fn, device, warmup, repeat), step_bytes(algo), STEP_MIN_BYTES.get(algo))
            del fn, opt
            _free(device)
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


HEADER = (
    "| kind | op | set | dtype | tensors | params | provider | median ms | p20 | p80 "
    "| vs eager-loop | vs eager-foreach | bytes/elt | GB/s | of copy BW |"
)


def format_row(r: dict) -> str:
    def x(v):
        return "-" if v != v else f"{v:.2f}x"  # NaN: no such baseline

    nb, mb = r.get("bytes"), r.get("min_bytes")
    b = "-" if nb is None else (f"{nb}b" if mb in (None, nb) else f"{nb}b (min {mb}b)")

    return (
        f"| {r['kind']} | {r['op']} | {r['set']} | {r['dtype']} | {r['tensors']} | {r['params'] / 1e6:.2f}M "
        f"| {r['provider']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} "
        f"| {x(r['vs_eager-loop'])} | {x(r['vs_eager-foreach'])} | {b} | {r['gbps']:.1f} | {r['frac_copy']:.0%} |"
    )


HEADER_RULE = "|" + "---|" * (HEADER.count("|") - 1)


def format_table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (as printed by the run)."""
    return "\n".join([HEADER, HEADER_RULE] + [format_row(r) for r in rows])


def append_csv(rows: list[dict], path: Path, dev_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path) as f:
            if f.readline().strip().split(",") != FIELDS:  # an older layout: keep it aside, start afresh
                path.rename(path.with_suffix(".old.csv"))
                new = True
    meta = dict(device=dev_name, version=sharpfused.__version__, commit=git_commit(), torch=torch.__version__)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})


def csv_path(dev_name: str, results: Optional[str] = None) -> Path:
    """``<results>/<device>.csv``; by default under the untracked ``out/bench/`` at the repository root
    (the committed ``bench/results/`` only when asked: ``--results bench/results``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dev_name)
    return (Path(results) if results else HERE.parent / "out" / "bench") / f"{safe}.csv"


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="every dimension / 8 (GPU: / 2), few repeats (CPU: under 2 minutes)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", default=None, help="comma-separated shape sets (resnet50, gpt2-small, llm-1b)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ops", default=None, help="comma-separated primitives and/or algorithms (default: all)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--scale", type=int, default=None, help="divide every dimension by N (overrides --quick's factor)")
    ap.add_argument("--results", default=None, help="directory of the CSV and PNGs (default out/bench, untracked; "
                    "pass bench/results to add to the committed figures)")
    ap.add_argument("--fresh-grads", action="store_true",
                    help="also time each step with other gradient tensors every step and every launch table rebuilt")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # one thread by default: on a shared machine an OpenMP barrier waiting for a descheduled
        # second thread costs a scheduler quantum (seen: ~200 ms steps of a 0.4 ms copy)
        torch.set_num_threads(args.threads)
    sets = (
        args.sets.split(",")
        if args.sets
        else ["resnet50", "gpt2-small"] + (["llm-1b"] if device.type == "cuda" else [])
    )
    prims = algos = None
    if args.ops:
        chosen = args.ops.split(",")
        prims = [o for o in chosen if o in ops.PRIMITIVES]
        algos = [o for o in chosen if o in algorithms()]
    factor = args.scale or ((8 if device.type == "cpu" else 2) if args.quick else 1)
    on_cpu = device.type == "cpu"
    repeat = args.repeat or ((3 if args.quick else 7) if on_cpu else (10 if args.quick else 50))
    warmup = 1 if on_cpu else 5
    dev_name = device_name(device)
    copy_gbps = copy_bandwidth(device, args.quick)
    copy_mib = copy_elements(device, args.quick) * 4 >> 20
    print(
        f"# sharpfused {sharpfused.__version__} ({git_commit()}), {dev_name}, torch {torch.__version__}"
        + (f", {torch.get_num_threads()} threads" if on_cpu else "")
        + f"; copy bandwidth {copy_gbps:.1f} GB/s (bytes read + written by a {copy_mib} MiB fp32 copy)\n"
    )
    print(
        "Steps: first_step + second_step, SGD momentum base (SAM-AdamW: AdamW), no forward/backward. GB/s = bytes"
        " the code moves (bytes/elt: counted from the primitives each step calls, b = bytes per element;"
        " the minimum beside it) / median.\n"
    )
    print(HEADER)
    print(HEADER_RULE, flush=True)
    rows: list[dict] = []
    for set_name in sets:
        shape_list = shape_sets.SETS[set_name]()
        if factor > 1:
            shape_list = shape_sets.scaled(shape_list, factor)
        label = set_name + (f"/{factor}" if factor > 1 else "")
        # a 1B-element step takes tens of ms even on a GPU: fewer repeats keep the run within minutes
        rep = repeat if args.repeat or shape_sets.numel(shape_list) < 5e8 else max(5, repeat // 2)
        for dt_name in args.dtypes.split(","):
            rows += measure(shape_list, label, getattr(torch, dt_name), device, rep, warmup, copy_gbps, prims, algos,
                            on_row=lambda r: print(format_row(r), flush=True), fresh_grads=args.fresh_grads)  # fmt: skip
    if not args.no_csv and rows:
        path = csv_path(dev_name, args.results)
        append_csv(rows, path, dev_name)
        print(f"\nrows appended to {os.path.relpath(path)}")
        if not args.no_plot:
            try:
                import plot

                for png in plot.plot_csv(path):
                    print(f"plot: {os.path.relpath(png)}")
            except Exception as exc:  # plotting is a convenience; the CSV is the record
                print(f"plot skipped: {type(exc).__name__}: {exc}")
    return rows


if __name__ == "__main__":
    main()
