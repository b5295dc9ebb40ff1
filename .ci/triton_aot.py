"""Ahead-of-time compile of every Triton kernel variant of kernels/*.py for sm_80 and sm_90, no GPU.

The variants are the ones the launch wrappers really launch: each wrapper (perturb_, restore_,
restore_sgd_, restore_adamw_, restore_rmsprop_, combine_, dot_norms, sq_norm, bisam_lower_bound_fwd) is called on
small CPU tensors over a grid of dtypes (fp32/bf16/fp16), aligned and unaligned tables (one
tensor moved off 16 bytes makes a table unaligned) and its option flags, with
``JITFunction.run`` replaced by a recorder. The recorder binds the arguments with Triton's own
binder for a CUDA target, so each variant gets exactly the signature, constexprs and
``tt.divisibility`` attributes a launch on a GPU would compile. Duplicates are dropped; each
variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
down to a cubin (ptxas) for each arch, in parallel.

Flags that only change arithmetic or where a per-step scalar comes from (``*_PTR``, weight decay,
nesterov, the AdamW variants' coefficients) are flipped one at a time from a default for every
(dtype, alignment) pair, not crossed with each other: the cross product would compile the same
memory accesses hundreds of times. The structural flags (backup, mask, momentum, first momentum
step, found_inf) are flipped the same way, also with every (dtype, alignment) pair.

Vectorization: for every aligned variant of a streaming (multi-tensor table) kernel the PTX
must hold 16-byte global loads (``ld.global.v4.b32`` and the like), and 16-byte stores when the
kernel stores; the table lists the widths of every global load/store by count. Per data stream:
the variant's unaligned twin (same constexprs, ALIGNED off) issues one scalar instruction per
element in both the full-block and the tail path, which gives the bytes a full block moves per
thread; the aligned variant must move all of them with vector instructions ("vector B/thread":
moved/expected, loads then stores), so one list left scalar fails. For bisam (no full/tail
split) only the widths count; "aligned" there is a row length K divisible by 16 (with a 16-byte
aligned logits pointer).

Prints one line per (kernel, variant, arch): ok/FAIL, load and store widths, vector ok/NOVEC.
Exit status: 1 on any compile failure, 2 when an aligned streaming variant is not fully vectorized
(unless --no-vec-fail), 0 otherwise. Usage: python .ci/triton_aot.py [-j N] [--archs 80,90]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32", "int16": "i16", "uint8": "u8"}
#: kernels that stream the multi-tensor table (checked for 16-byte access when aligned)
STREAMING = {
    "_perturb_kernel", "_restore_kernel", "_restore_step_kernel",
    "_combine_kernel", "_dot_norms_kernel", "_sq_norm_kernel", "_bisam_lower_bound_kernel",
}  # fmt: skip
#: streaming kernels that store only one scalar per program
REDUCTIONS = {"_dot_norms_kernel", "_sq_norm_kernel"}

# ------------------------------------------------------------------------------------- recording
_BACKEND = make_backend(GPUTarget("cuda", 90, 32))
RECORDED: dict[tuple, dict] = {}


def _record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: bind as a CUDA launch would, record, launch nothing."""
    kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = tjit.create_function_from_signature(self.signature, self.params, _BACKEND)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(_BACKEND, kwargs, bound, spec, opts)
    key = (
        self.__name__,
        tuple(signature.items()),
        tuple((k, str(v)) for k, v in sorted(constexprs.items())),
        repr(sorted(attrs.items())),
        options.num_warps,
        options.num_stages,
    )
    if key not in RECORDED:
        names = [p.name for p in self.params]
        RECORDED[key] = {
            "fn": self,
            "signature": signature,
            "constexprs": constexprs,
            "attrs": attrs,
            "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
            "label": _label(self.__name__, names, constexprs, attrs, signature, CONTEXT.get("aligned")),
            "aligned": CONTEXT.get("aligned") if self.__name__ in STREAMING else None,
        }
    return None


CONTEXT: dict = {}


def _label(name, names, constexprs, attrs, signature, aligned) -> str:
    parts = []
    for (i,), v in sorted(constexprs.items()):
        n = names[i]
        if n in ("CHUNK", "ALIGNED") or (n == "BLOCK" and name != "_bisam_lower_bound_kernel"):
            continue
        if signature.get(n) != "constexpr":  # a runtime int specialized to a constant (== 1)
            parts.append(f"{n}=={v}")
            continue
        s = str(v)
        s = SHORT.get(s, s)
        if s in ("True", "False"):
            if s == "True":
                parts.append(n.lower())
            continue
        parts.append(f"{n.lower()}={s}")
    if name == "_bisam_lower_bound_kernel":
        parts.insert(0, "x=" + signature["X"].lstrip("*"))
        k_div = any(names[i] == "K" and v for (i,), v in attrs.items())
        parts.append("K%16==0" if k_div else "K%16!=0")
    if aligned is not None and name in STREAMING and name != "_bisam_lower_bound_kernel":
        parts.append("aligned" if aligned else "unaligned")
    return " ".join(parts)


def _lists(n_lists, dtypes, aligned, sizes=(3000, 40000)):
    """Parallel lists of CPU tensors; unaligned: the first tensor of the first list 4 bytes off."""
    out = []
    for li in range(n_lists):
        dt = dtypes[li]
        row = []
        for j, n in enumerate(sizes):
            if li == 0 and j == 0 and not aligned:
                shift = 2 if dt.itemsize == 2 else 1  # 4 bytes off either way
                buf = torch.zeros(n + shift, dtype=dt)
                row.append(buf[shift:])
            else:
                row.append(torch.zeros(n, dtype=dt))
        out.append(row)
    return out


def _bases():
    for dn, dt in DTYPES.items():
        for aligned in (True, False):
            yield dn, dt, aligned


def enumerate_variants() -> None:
    from sharpfused.kernels import bisam_loss

    from sharpfused import kernels as K

    tjit.JITFunction.run = _record
    one = torch.ones(1)

    for _dn, dt, al in _bases():
        CONTEXT["aligned"] = al
        # perturb_: default SAM with backup; flips: no backup, bool mask, ASAM eta (number/tensor),
        # scale tensor, mask without backup, ASAM + mask
        p, g, b = _lists(3, [dt] * 3, al)
        m = [torch.ones(x.numel(), dtype=torch.bool) for x in p]
        for kw in (
            dict(backup=b), dict(backup=None), dict(backup=b, mask=m), dict(backup=b, eta=0.01),
            dict(backup=b, eta=one * 0.01), dict(backup=b, scale=one), dict(backup=None, mask=m),
            dict(backup=b, eta=0.01, mask=m), dict(backup=b, norm_sq=one), dict(backup=b, eta=0.01, norm_sq=one),
        ):  # fmt: skip
            kw.setdefault("scale", 0.05)
            K.perturb_(p, g, **kw)
        # perturb_ on a one-tensor list (n_tensors == 1 may be specialized)
        K.perturb_(p[:1], g[:1], b[:1], 0.05)
        # restore_: bits copy (same dtype)
        K.restore_(p, b)
        # restore_sgd_
        buf = _lists(1, [dt], True)[0]
        base = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, init_momentum=False)
        for flip in (
            {}, dict(momentum=0.0), dict(init_momentum=True), dict(weight_decay=1e-4), dict(nesterov=True),
            dict(lr=one * 0.1), dict(grad_coef=0.5), dict(grad_coef=one * 0.5), dict(found_inf=torch.zeros(1)),
            dict(found_inf=torch.zeros(1), init_momentum=True), dict(found_inf=torch.zeros(1), momentum=0.0),
            dict(found_inf=torch.zeros((), dtype=torch.bool)),
        ):  # fmt: skip
            K.restore_sgd_(p, b, g, buf, **{**base, **flip})
        # restore_adamw_
        mm, vv = _lists(2, [dt, dt], True)
        base = dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        for flip in (
            {}, dict(step=torch.tensor(3.0)), dict(lr=one * 1e-3), dict(grad_coef=0.5), dict(grad_coef=one * 0.5),
            dict(found_inf=torch.zeros(1)), dict(step=torch.tensor(3.0), found_inf=torch.zeros(1), grad_coef=one),
            dict(decoupled=False), dict(decoupled=False, step=torch.tensor(3.0), found_inf=torch.zeros(1)),
        ):  # fmt: skip
            K.restore_adamw_(p, b, g, mm, vv, **{**base, **flip})
        # restore_rmsprop_
        base = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9)
        for flip in (
            {}, dict(momentum=0.0), dict(weight_decay=1e-4), dict(lr=one * 1e-2), dict(grad_coef=0.5),
            dict(grad_coef=one * 0.5), dict(found_inf=torch.zeros(1)), dict(found_inf=torch.zeros(1), momentum=0.0),
        ):  # fmt: skip
            K.restore_rmsprop_(p, b, g, vv, buf, **{**base, **flip})
        # combine_: each coefficient a number or a device tensor (the first list: the unaligned one)
        for c1 in (0.5, one * 0.5):
            for c2 in (0.5, one * 0.5):
                K.combine_(p, g, c1, c2)
        # dot_norms, sq_norm (plain, ASAM-weighted with eta a number or a tensor)
        K.dot_norms(p, g)
        K.sq_norm(p)
        K.sq_norm(p, per_tensor=True)
        K.sq_norm(p, g, 0.01)
        K.sq_norm(p, g, one * 0.01)

    # mixed dtypes within a tensor: bf16/fp16 params (grads, states) with an fp32 backup
    CONTEXT["aligned"] = True
    for dt in (torch.bfloat16, torch.float16):
        p, g, buf, mm, vv = _lists(5, [dt] * 5, True)
        (b,) = _lists(1, [torch.float32], True)
        K.restore_(p, b)
        K.restore_sgd_(p, b, g, buf, 0.1, 0.9, 0.0, 0.0, False, False, None, torch.zeros(1))
        K.restore_adamw_(p, b, g, mm, vv, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, None, torch.zeros(1))
        K.restore_rmsprop_(p, b, g, vv, buf, 1e-2, 0.99, 1e-8, 0.0, 0.9, None, torch.zeros(1))

    # bisam: row lengths giving BLOCK 16 / 1024 / 4096, with K % 16 == 0 (aligned) or not
    for _dn, dt in DTYPES.items():
        for k in (10, 1000, 1024, 50257, 50304):
            CONTEXT["aligned"] = k % 16 == 0
            x = torch.zeros(4, k, dtype=dt)
            y = torch.zeros(4, dtype=torch.int64)
            for with_grad in (True, False):
                bisam_loss.bisam_lower_bound_fwd(x, y, "log", with_grad=with_grad)
            if k in (1024, 50257):
                bisam_loss.bisam_lower_bound_fwd(x, y, "tanh", with_grad=True)
    CONTEXT.clear()


# ------------------------------------------------------------------------------------- compiling
_WIDTH = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s")


def widths(ptx: str) -> tuple[Counter, Counter, dict]:
    """Histograms of global load / store widths in bytes, and per op (ld/st): the bytes moved by
    vector instructions and the count of scalar ones by width (the 8-byte table entries left out)."""
    lds, sts = Counter(), Counter()
    split = {"ld": [0, Counter()], "st": [0, Counter()]}
    for op, mods in _WIDTH.findall(ptx):
        parts = mods.split(".")
        vec = 1
        bits = None
        for s in parts:
            if re.fullmatch(r"v[248]", s):
                vec = int(s[1:])
            elif re.fullmatch(r"[bfus](8|16|32|64|128)", s):
                bits = int(s[1:])
        if bits is None:
            continue
        (lds if op == "ld" else sts)[vec * bits // 8] += 1
        if vec > 1:
            split[op][0] += vec * bits // 8
        elif bits != 64:
            split[op][1][bits // 8] += 1
    return lds, sts, split


VARIANTS: list[dict] = []


def compile_one(job):
    i, arch = job
    v = VARIANTS[i]
    t0 = time.time()
    try:
        src = ASTSource(v["fn"], v["signature"], v["constexprs"], v["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v["options"]))
        lds, sts, split = widths(k.asm["ptx"])
        return i, arch, True, dict(lds), dict(sts), split, time.time() - t0, ""
    except Exception as e:  # noqa: BLE001 -- reported, then the exit status says it
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return i, arch, False, {}, {}, None, time.time() - t0, " | ".join(msg[:6])


def _const(v: dict, name: str):
    names = [p.name for p in v["fn"].params]
    return v["constexprs"][(names.index(name),)]


def _twin_key(v: dict, arch: int) -> tuple:
    """A variant's identity without ALIGNED (and the table pointers' divisibility)."""
    names = [p.name for p in v["fn"].params]
    cx = tuple((k, str(x)) for k, x in sorted(v["constexprs"].items()) if names[k[0]] != "ALIGNED")
    return (v["fn"].__name__, arch, tuple(v["signature"].items()), cx, v["options"]["num_warps"])


def _hist(h: dict) -> str:
    return ",".join(f"{w}Bx{n}" for w, n in sorted(h.items(), reverse=True)) or "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--no-vec-fail", action="store_true", help="report unvectorized aligned variants, exit 0")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    t_start = time.time()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_aot_cache_"))
    print(f"triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}, archs {archs}")
    enumerate_variants()
    VARIANTS.extend(RECORDED.values())
    kernels = Counter(v["fn"].__name__ for v in VARIANTS)
    print(f"{len(VARIANTS)} distinct variants ({', '.join(f'{k} {n}' for k, n in sorted(kernels.items()))}), "
          f"{len(VARIANTS) * len(archs)} compiles, {args.jobs} processes")  # fmt: skip
    jobs = [(i, a) for i in range(len(VARIANTS)) for a in archs]
    results = []
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(compile_one, jobs, chunksize=2))
    else:
        results = [compile_one(j) for j in jobs]
    results.sort(key=lambda r: (VARIANTS[r[0]]["fn"].__name__, VARIANTS[r[0]]["label"], r[1]))
    n_fail = n_novec = 0
    novec = []
    # Per-stream check. Unaligned, every element is one scalar instruction in both the full-block
    # and the tail path: 2E per data stream (E = BLOCK / threads elements per thread), plus a few
    # scalar-argument loads (< 2E). So the unaligned twin (same constexprs but ALIGNED) tells the
    # bytes one full block moves per thread, P = sum over widths w of E * w * (count_w // 2E); the
    # aligned variant must move all of them with vector instructions (its tail stays scalar).
    twins = {}
    for i, arch, ok, _l, _s, split, *_ in results:
        v = VARIANTS[i]
        if ok and v["aligned"] is False:
            twins[_twin_key(v, arch)] = split

    def expected(v, split_u, op):
        e = _const(v, "BLOCK") // (32 * v["options"]["num_warps"])
        return sum(e * w * (n // (2 * e)) for w, n in split_u[op][1].items())

    print(f"{'kernel':28} {'variant':80} {'arch':5} {'result':6} {'ld/st':6} {'vec':5} {'vector B/thread ld st':22} "
          "global loads / stores: bytes x count")  # fmt: skip
    for i, arch, ok, lds, sts, split, _dt, err in results:
        v = VARIANTS[i]
        name = v["fn"].__name__
        vec, full = "-", ""
        if ok and name in STREAMING and v["aligned"]:
            # reductions store one scalar per program: only their loads stream
            stores = name not in REDUCTIONS and not (
                name == "_bisam_lower_bound_kernel" and "write_grad" not in v["label"]
            )
            good = max(lds, default=0) >= 16 and (not stores or max(sts, default=0) >= 16)
            # (bisam has no full/tail split: its twin by BLOCK is another K, so only the widths count)
            twin = None if name == "_bisam_lower_bound_kernel" else twins.get(_twin_key(v, arch))
            if twin is not None:
                pl, ps = expected(v, twin, "ld"), expected(v, twin, "st")
                vl, vs = split["ld"][0], split["st"][0]
                full = f"{vl}/{pl} {vs}/{ps}"
                good = good and vl >= pl and vs >= ps
            vec = "ok" if good else "NOVEC"
            if not good:
                n_novec += 1
                novec.append(f"{name} [{v['label']}] sm_{arch}")
        n_fail += not ok
        res = "ok" if ok else "FAIL"
        width = f"{max(lds, default=0)}/{max(sts, default=0)}"  # widest global load / store, bytes
        print(
            f"{name:28} {v['label'][:80]:80} sm_{arch:<2} {res:6} {width:6} {vec:5} {full:22} "
            f"{_hist(lds)} / {_hist(sts)}"
        )
        if not ok:
            print(f"      {err[:600]}")
    print(f"== {len(results)} compiles ({len(VARIANTS)} variants x {len(archs)} archs): {n_fail} failed, "
          f"{n_novec} aligned streaming variant(s) not fully vectorized, {time.time() - t_start:.0f} s")  # fmt: skip
    for s in novec:
        print(f"   not vectorized: {s}")
    per: dict = {}
    for i, _arch, ok, lds, _sts, *_ in results:
        v = VARIANTS[i]
        if v["aligned"] is None:
            continue
        c = per.setdefault(v["fn"].__name__, [0, 0, 0, 0])
        c[0 if v["aligned"] else 2] += 1
        c[1 if v["aligned"] else 3] += ok and max(lds, default=0) >= 16
    for name, (na, va, nu, vu) in sorted(per.items()):
        print(f"   {name:28} aligned: {va}/{na} compiles with 16-byte loads; unaligned: {vu}/{nu} (expected 0)")
    if n_fail:
        return 1
    if n_novec and not args.no_vec_fail:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
