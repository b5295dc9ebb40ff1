"""Host cost of an optimizer step: the Python/dispatch side alone, kernel launches replaced by no-ops.

Issue 15 ("Host cost"). What a SAM + SGD(momentum) step (first_step + second_step, gradients
present, no forward/backward) costs the host on GPT-2 small's parameter list (bench/shapes.py:
148 tensors), per backend path, on any machine: no GPU, no compiled extension, no Triton
interpreter. Each path runs on small CPU tensors of the same COUNT and shapes divided by
``--scale`` (host cost depends on the number of tensors, not their size: the table prints two
scales to show it).

Paths (each patch below is installed in this process only; nothing in the package changes):

* ``triton``: ``sharpfused.kernels``, its launches stubbed. Patches:
  1. ``TRITON_INTERPRET=1`` before triton is imported, so that ``ops.unavailable_reason`` lets the
     triton backend take CPU tensors (the flow the tests use, tests/conftest.py);
  2. ``InterpretedFunction.run`` and ``JITFunction.run`` (what ``kernel[grid](...)`` calls, from
     ``kernels/table.py: launch()`` and the direct launches in sq_norm.py, dot_norms.py, ...)
     replaced by a counter: nothing is interpreted or compiled. ``kernel[grid]`` itself (Triton's
     ``KernelInterface.__getitem__``) still runs;
     The per-tensor stage of sq_norm gets its output (a torch.empty) filled with 1.0 by the stub
     (through numpy; the op counter skips it), so that the step sees finite norms as a real one does;
  3. sentinels on the interpreter (``GridExecutor.__call__``, ``InterpretedFunction.rewrite``) and
     the compiler (``triton.compile``): each counts a call, and the run reports the counts (0).
  Left out, so the GPU figure will be higher: Triton's own launcher (``JITFunction.run``: argument
  binding, specialization key, kernel-cache lookup, driver launch; some 10-40 us per launch in
  Triton 3.x, to add per launch counted here), and ``upload()``'s pinned copy of a rebuilt table
  (on CPU ``upload`` returns the host tensor as it is).
* ``cuda``: ``sharpfused.backends.cuda_ops`` over a fake extension. Patches:
  1. ``sys.modules["sharpfused._C"]``: a module whose seven functions count calls and return
     preallocated outputs (ones) of the right shape (sq_norm: a 0-d total and per-tensor norms,
     dot_norms: 3 values), installed before ``cuda_ops`` is imported;
  2. ``cuda_ops._check_cuda``: keeps the non-empty check, drops the device-type-cuda check;
  3. ``ops.unavailable_reason``: "cuda" on a CPU device is accepted once the module loaded.
  Left out: the extension's own C++ side (argument parsing, output allocation, table packing,
  launches), to add per call counted here.
* ``torch``: ``sharpfused.backends.torch_ops`` on CPU, unpatched. Its ops compute on the CPU, so
  host time is not separable from kernel time: a reference only (at a large ``--scale`` the
  tensors are tiny and the figure is mostly host).

Counts per step (two extra steps under counting, which must agree; timing runs without any counter on):
Triton launches or ``_C`` calls, and the torch ops the step issues (aten ops seen by a
``TorchDispatchMode``), split into "launching" ops (would be a device kernel on a GPU) and
metadata-only ones (views, ``empty``, ...). "launches" = kernel launches + launching torch ops.

Step kinds: ``reuse`` (the same gradient tensors every step: every Triton table is a cache hit)
and ``fresh`` (other gradient tensors every step, two sets in turn as after
``zero_grad(set_to_none=True)``, and every Triton address table dropped: a rebuild per table,
the worst case; bench/run.py --fresh-grads does the same).

    python bench/host_cost.py                  # --scale 64 and 128, 200 steps
    python bench/host_cost.py --scale 32 --steps 500
    python bench/host_cost.py --quick --json   # a few steps (tests/test_host_cost.py)
"""

from __future__ import annotations

import os

# Patch triton-1: before anything imports triton (see the docstring).
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import shapes as shape_sets  # noqa: E402

PATHS = ("triton", "cuda", "torch")
KINDS = ("reuse", "fresh")

#: counters the stubs and sentinels write
HITS: Counter = Counter()


# ------------------------------------------------------------------------------ triton stubs
#: kernels whose output the host goes on with, made by torch.empty: the stub writes 1.0 there
#: (argument index), so the step sees finite norms and takes its usual (not skipped) path. Left
#: uninitialized, a garbage non-finite norm made a step skip on the device, and then the next
#: step's first-step host read of the skip flag (base.py: _fused_base_step) came back.
_FILL = {"_sq_norm_per_tensor_kernel": 2}
_IN_STUB = [False]


def install_triton_stubs() -> None:
    """Patches triton-2 and triton-3 (docstring): launches counted, interpreter/compiler sentinels."""
    import triton
    from triton.runtime import interpreter, jit

    def stub_run(self, *args, grid, warmup=False, **kwargs):
        name = getattr(self.fn, "__name__", "?")
        HITS["triton_launch"] += 1
        HITS["triton:" + name] += 1
        fill = _FILL.get(name)
        if fill is not None:  # not counted: OpCounter skips what the stub itself issues
            _IN_STUB[0] = True
            try:
                args[fill].numpy()[:] = 1.0
            finally:
                _IN_STUB[0] = False

    interpreter.InterpretedFunction.run = stub_run
    jit.JITFunction.run = stub_run

    def sentinel(name, orig):
        def hit(*a, **k):
            HITS[name] += 1
            return orig(*a, **k)

        return hit

    interpreter.GridExecutor.__call__ = sentinel("interpreter_grid", interpreter.GridExecutor.__call__)
    interpreter.InterpretedFunction.rewrite = sentinel("interpreter_rewrite", interpreter.InterpretedFunction.rewrite)
    triton.compile = sentinel("triton_compile", triton.compile)
    if hasattr(triton.compiler, "compile"):
        triton.compiler.compile = sentinel("triton_compile", triton.compiler.compile)


# ------------------------------------------------------------------------------ cuda stubs
def _fake_c() -> types.ModuleType:
    """Patch cuda-1: a stand-in for the compiled extension; every function counts its calls."""
    mod = types.ModuleType("sharpfused._C")
    mod.__file__ = "<host_cost fake>"
    outs: dict = {}

    def out(key, make):
        t = outs.get(key)
        if t is None:
            t = outs[key] = make()
        return t

    def counted(name, result=None):
        def f(*args, **kwargs):
            HITS["c_call"] += 1
            HITS["c:" + name] += 1
            return None if result is None else result(*args)

        f.__name__ = name
        return f

    def sq_norm_out(xs, *rest):
        dev = xs[0].device
        return out(("total", dev), lambda: torch.ones((), device=dev)), out(
            ("per", dev, len(xs)), lambda: torch.ones(len(xs), device=dev)
        )

    def dot_norms_out(a, *rest):
        dev = a[0].device
        return out(("dot", dev), lambda: torch.ones(3, device=dev))

    mod.sq_norm = counted("sq_norm", sq_norm_out)
    mod.dot_norms = counted("dot_norms", dot_norms_out)
    for name in ("perturb_", "restore_", "combine_", "restore_sgd_", "restore_adamw_"):
        setattr(mod, name, counted(name))
    return mod


def install_cuda_stubs() -> None:
    """Patches cuda-1..3 (docstring)."""
    import sharpfused
    from sharpfused import ops

    fake = _fake_c()
    sys.modules["sharpfused._C"] = fake
    sharpfused._C = fake
    from sharpfused.backends import cuda_ops  # imports the fake

    assert cuda_ops._C is fake

    def check_nonempty(xs):  # patch cuda-2
        if not xs:
            raise ValueError("primitives take a non-empty list of tensors")

    cuda_ops._check_cuda = check_nonempty
    orig = ops.unavailable_reason

    def unavailable_reason(name, device):  # patch cuda-3
        if name == "cuda" and torch.device(device).type == "cpu" and ops._load("cuda") is not None:
            return None
        return orig(name, device)

    ops.unavailable_reason = unavailable_reason


# ------------------------------------------------------------------------------ torch-op counter
#: aten ops that launch nothing on a GPU (metadata, allocation without a fill)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a step issues: ``launching`` (a kernel on a GPU) and ``meta`` (views...)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _IN_STUB[0]:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> tuple[int, int]:
        launching = meta = 0
        for name, n in self.ops.items():
            op = getattr(torch.ops.aten, name, None)
            is_view = False
            if op is not None:
                try:
                    is_view = any(getattr(op, o).is_view for o in op.overloads())
                except Exception:
                    pass
            if is_view or name in _NO_LAUNCH:
                meta += n
            else:
                launching += n
        return launching, meta


# ------------------------------------------------------------------------------ the step
def make_step(path: str, shape_list, fresh: bool) -> Callable[[], None]:
    """SAM + SGD(momentum) first_step + second_step on ``path``: bench/run.py's step (imported here,
    after the stubs), with its fresh-gradients mode (other gradient tensors every step, every
    launch table dropped)."""
    import run

    import sharpfused

    step, _ = run.step_call(sharpfused.SAM, {"backend": path}, shape_list, torch.float32, torch.device("cpu"), fresh)
    return step


def measure(path: str, shape_list, fresh: bool, steps: int, warmup: int) -> dict:
    step = make_step(path, shape_list, fresh)
    for _ in range(warmup):
        step()
    counts, ops_seen = [], []
    for _ in range(2):  # two counted steps: the counts of a step are the same every step
        before = Counter(HITS)
        counter = OpCounter()
        with counter:
            step()
        hits = HITS - before
        counts.append((hits["triton_launch"] + hits["c_call"], *counter.split()))
        ops_seen.append(dict(counter.ops))
    launching, meta = counter.split()
    kernels = hits["triton_launch"] + hits["c_call"]
    gc.collect()
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t0) * 1e3)
    import run  # after the stubs (see make_step)

    med, p20, p80 = run.summarize(ms)
    return {
        "path": path,
        "kind": "fresh" if fresh else "reuse",
        "tensors": len(shape_list),
        "elements": shape_sets.numel(shape_list),
        "median_ms": med,
        "p20_ms": p20,
        "p80_ms": p80,
        "kernel_launches": kernels,
        "torch_ops_launching": launching,
        "torch_ops_meta": meta,
        "launches": kernels + launching,
        "counts_stable": counts[0] == counts[1],
        "counts_seen": counts,
        "ops_seen": ops_seen,
        "kernels": {k.split(":", 1)[1]: v for k, v in hits.items() if ":" in k},
        "torch_ops": dict(counter.ops),
    }


# ------------------------------------------------------------------------------ main
HEADER = (
    "| path | grads | list | host ms median | p20 / p80 | launches/step | kernel launches | torch ops "
    "(launching + metadata) |"
)
RULE = "|---|---|---|---:|---:|---:|---:|---:|"


def format_row(r: dict) -> str:
    return (
        f"| {r['path']} | {r['kind']} | {r['list']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} / {r['p80_ms']:.3f} "
        f"| {r['launches']} | {r['kernel_launches']} | {r['torch_ops_launching']} + {r['torch_ops_meta']} |"
    )


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scale",
        type=int,
        action="append",
        default=None,
        help="divide every dimension of GPT-2 small's shapes by N (repeatable; default 64 and 128)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 200; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20; --quick 2)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: triton, cuda, torch")
    ap.add_argument("--quick", action="store_true", help="one scale (128), a few steps: for the tests")
    ap.add_argument("--json", action="store_true", help="print one JSON object (rows and sentinel counts) only")
    ap.add_argument("--detail", action="store_true", help="also print each row's kernels and torch ops")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scales = args.scale or ([128] if args.quick else [64, 128])
    steps = args.steps or (5 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}; choose from {', '.join(PATHS)}")
    if "triton" in paths:
        install_triton_stubs()
    if "cuda" in paths:
        install_cuda_stubs()
    import sharpfused
    from sharpfused import ops

    for p in paths:
        why = ops.unavailable_reason(p, torch.device("cpu"))
        if why is not None:
            raise SystemExit(f"host_cost: path {p!r} cannot run: {why}")
    rows = []
    full = shape_sets.gpt2_small()
    out = (lambda *a, **k: None) if args.json else print
    out(
        f"# sharpfused {sharpfused.__version__}, host cost of SAM + SGD(momentum) first_step + second_step, "
        f"GPT-2 small list ({len(full)} tensors), kernel launches stubbed; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread; {steps} steps after {warmup} warm-up per row\n"
    )
    out(HEADER)
    out(RULE, flush=True)
    for path in paths:
        for scale in scales:
            shape_list = shape_sets.scaled(full, scale) if scale > 1 else full
            for fresh in (False, True):
                r = measure(path, shape_list, fresh, steps, warmup)
                r["list"] = f"gpt2-small/{scale} ({r['elements'] / 1e3:.0f}k elts)"
                rows.append(r)
                out(format_row(r), flush=True)
                if args.detail:
                    out(f"    kernels: {r['kernels']}\n    torch ops: {r['torch_ops']}")
    sentinels = {k: HITS[k] for k in ("interpreter_grid", "interpreter_rewrite", "triton_compile")}
    out(
        f"\nInterpreter/compiler calls (must be 0): {sentinels}. launches/step = kernel launches (stubbed Triton "
        "launches or _C calls) + torch ops that launch a kernel on a GPU. torch path: CPU compute included "
        "(reference only)."
    )
    result = {"rows": rows, "sentinels": sentinels, "stub_hits": {k: HITS[k] for k in ("triton_launch", "c_call")}}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
