"""The CUDA backend (``sharpfused._C`` through ``sharpfused.backends.cuda_ops``) and its build.

On CUDA (a GPU and the built extension) every primitive is checked against the float64
reference and the torch backend: fp32 within 1e-6 relative (fp64 within 1e-12), bf16/fp16 at
most twice the torch backend's error in the same dtype (helpers.assert_within_torch_error: plus
4 fp32 eps where the result is an fp32 reduction, where both errors can be ~0).
On CPU the build decision, the arch list, the JIT build's error and the backend's refusal of
CPU tensors are checked.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharpfused
from sharpfused import _build, ops

from . import reference as R
from .helpers import assert_within_torch_error, rel_err

T = ops.on("torch")
ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
WHY_NOT = "no CUDA device" if not HAS_CUDA else ops.unavailable_reason("cuda", torch.device("cuda"))
gpu = pytest.mark.skipif(WHY_NOT is not None, reason=f"cuda backend cannot run here: {WHY_NOT}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CHUNK = 65536
SIZES = (1, 7, 0, 1000, 4099, 2 * CHUNK + 3)  # odd sizes, an empty tensor, one crossing chunks


# ====================================================================== CPU: build and refusal
def test_skip_flag_wins():
    assert _build.build_decision({"SHARPFUSED_SKIP_CUDA": "1"}, torch_cuda="12.4", nvcc="/x/nvcc") == (
        False,
        "SHARPFUSED_SKIP_CUDA=1",
    )
    assert (
        _build.build_decision({"SHARPFUSED_SKIP_CUDA": "1", "SHARPFUSED_FORCE_CUDA": "1"}, torch_cuda=None, nvcc=None)[
            0
        ]
        is False
    )


def test_build_needs_cuda_torch_and_nvcc():
    assert _build.build_decision({}, torch_cuda="12.4", nvcc="/usr/local/cuda/bin/nvcc")[0] is True
    build, why = _build.build_decision({}, torch_cuda=None, nvcc="/usr/local/cuda/bin/nvcc")
    assert not build and "no CUDA" in why
    build, why = _build.build_decision({}, torch_cuda="12.4", nvcc=None)
    assert not build and "nvcc" in why


def test_force_flag():
    assert _build.build_decision({"SHARPFUSED_FORCE_CUDA": "1"}, torch_cuda="12.4", nvcc="/n/nvcc") == (
        True,
        "SHARPFUSED_FORCE_CUDA=1",
    )
    with pytest.raises(RuntimeError, match="SHARPFUSED_FORCE_CUDA=1 but .*no CUDA"):
        _build.build_decision({"SHARPFUSED_FORCE_CUDA": "1"}, torch_cuda=None, nvcc="/n/nvcc")


def test_decision_probes_this_machine(monkeypatch):
    monkeypatch.delenv("SHARPFUSED_SKIP_CUDA", raising=False)
    monkeypatch.delenv("SHARPFUSED_FORCE_CUDA", raising=False)
    build, _ = _build.build_decision()
    assert build == bool(torch.version.cuda and _build.find_nvcc())
    monkeypatch.setenv("SHARPFUSED_SKIP_CUDA", "1")
    assert _build.build_decision() == (False, "SHARPFUSED_SKIP_CUDA=1")


def test_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.arch_list() == "8.0;8.6;8.9;9.0+PTX"
    assert _build.arch_list({"TORCH_CUDA_ARCH_LIST": ""}) == "8.0;8.6;8.9;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.arch_list() == "9.0"


def test_max_jobs_bounded():
    jobs = _build.default_max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def test_sources_are_found():
    src = _build.csrc_dir()
    for name in (*_build.SOURCES, "multi_tensor.cuh", "sharpfused.h"):
        assert (src / name).is_file(), name


def test_setup_py_honours_skip(tmp_path):
    env = dict(os.environ, SHARPFUSED_SKIP_CUDA="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--name"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "building without the CUDA extension: SHARPFUSED_SKIP_CUDA=1" in out.stdout
    assert "sharpfused" in out.stdout.splitlines()[-1]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: build_extension would compile")
def test_build_extension_needs_cuda_torch():
    with pytest.raises(RuntimeError, match="cannot build sharpfused._C: this torch .* without CUDA"):
        sharpfused.build_extension()


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu: .*CUDA tensors only"):
        ops.resolve("cuda", torch.device("cpu"))
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="cuda"):
        sharpfused.SAM([w], torch.optim.SGD, lr=0.1, backend="cuda")


@pytest.mark.skipif(WHY_NOT is None, reason="the cuda backend is available here")
def test_unavailable_reason_is_given():
    why = ops.unavailable_reason("cuda", torch.device("cuda"))
    assert why and "cuda" in why


# ====================================================================== GPU: primitives
def rand(sizes, dtype, positive=False):
    xs = [torch.randn(n, dtype=dtype, device="cuda") for n in sizes]
    return [x.abs() + 0.01 for x in xs] if positive else xs


def clone(xs):
    return None if xs is None else [x.clone() for x in xs]


def check(out_cuda, out_torch, ref, dtype, what):
    """fp64 within 1e-12 relative, fp32 within 1e-6; bf16/fp16 inputs: the 2x rule
    (helpers.assert_within_torch_error, its floor by the result's dtype)."""
    if dtype == torch.float64:
        e_cuda = rel_err(out_cuda, ref)
        assert e_cuda < 1e-12, f"{what}: fp64 error {e_cuda}"
    elif dtype == torch.float32:
        e_cuda = rel_err(out_cuda, ref)
        assert e_cuda < 1e-6, f"{what}: fp32 error {e_cuda}"
    else:
        assert_within_torch_error(out_cuda, out_torch, ref, what=f"{what} ({dtype})")


def cu(name):
    """Primitive ``name`` on the cuda backend, through the dispatcher (positional, spec order)."""
    return getattr(ops.on("cuda"), name)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_sq_norm(dtype, weighted):
    x = rand(SIZES, dtype)
    w = rand(SIZES, dtype) if weighted else None
    total, per = cu("sq_norm")(x, w, 0.01, True)
    t_total, t_per = T.sq_norm(x, w, 0.01, True)
    r_total, r_per = R.sq_norm(x, w, 0.01, True)
    assert total.shape == () and per.shape == (len(SIZES),) and total.device.type == "cuda"
    assert per[SIZES.index(0)].item() == 0.0
    check(total, t_total, r_total, dtype, "sq_norm total")
    check(per, t_per, r_per, dtype, "sq_norm per tensor")
    again = cu("sq_norm")(x, w, 0.01, False)
    assert torch.equal(again, total), "sq_norm is not deterministic"


@gpu
def test_tensor_eta_is_read_on_the_device():
    x, w = rand(SIZES, torch.float32), rand(SIZES, torch.float32)
    eta = torch.tensor(0.05, device="cuda")
    assert rel_err(cu("sq_norm")(x, w, eta, False), R.sq_norm(x, w, 0.05)) < 1e-6
    g, w0 = rand(SIZES, torch.float32), clone(w)
    cu("perturb_")(w, g, None, 0.3, eta, None)
    assert rel_err(w, R.perturb(w0, g, 0.3, 0.05)) < 1e-6


@gpu
def test_sq_norm_nonfinite():
    x = rand((5, 3000), torch.float32)
    x[1][17] = float("inf")
    assert not torch.isfinite(cu("sq_norm")(x, None, 0.0, False))
    x[1][17] = float("nan")
    assert torch.isnan(cu("sq_norm")(x, None, 0.0, False))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "asam", "mask", "tensor_scale", "no_backup"])
def test_perturb(dtype, case):
    w, g = rand(SIZES, dtype), rand(SIZES, dtype)
    w0 = clone(w)
    eta = 0.01 if case == "asam" else None
    mask = [(torch.rand_like(x.float()) > 0.5).to(dtype) for x in w] if case == "mask" else None
    scale = torch.tensor(0.37, device="cuda") if case == "tensor_scale" else 0.37
    backup = None if case == "no_backup" else [torch.full_like(x, 123.0) for x in w]
    wt = clone(w)
    cu("perturb_")(w, g, backup, scale, eta, mask)
    T.perturb_(wt, g, None, scale, eta, mask)
    check(w, wt, R.perturb(w0, g, 0.37, eta, mask), dtype, f"perturb {case}")
    if backup is not None:
        assert all(torch.equal(b, x) for b, x in zip(backup, w0)), "backup is not the incoming w"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("asam", [False, True])
def test_perturb_byte_mask_gives_the_dtype_mask_bits(dtype, mask_dtype, asam, monkeypatch):
    # SSAM's uint8 mask (and a bool one) go to the kernel as bytes: no torch-backend fallback,
    # and the very bits of the same call with the mask in the parameter dtype
    sizes = SIZES + (8 * CHUNK + 1,)
    w, g = rand(sizes, dtype), rand(sizes, dtype)
    # contiguous views of one flat byte buffer (as SSAM's mask buffer): even tensors at 16-byte
    # aligned offsets (the vector path), odd ones 3 bytes off (the scalar path)
    offs, at = [], 0
    for i, n in enumerate(sizes):
        at = (at + 15) // 16 * 16 + (3 if i % 2 else 0)
        offs.append(at)
        at += n
    flat = (torch.rand(at, device="cuda") > 0.4).to(mask_dtype)
    byte_mask = [flat[o : o + n] for o, n in zip(offs, sizes)]
    dtype_mask = [m.to(dtype) for m in byte_mask]
    eta = 0.01 if asam else None
    w_bytes, w_dtype, w_torch = clone(w), clone(w), clone(w)
    b_bytes, b_dtype = [torch.empty_like(x) for x in w], [torch.empty_like(x) for x in w]
    real = T.perturb_
    before = ops.FALLBACKS.copy()
    cu("perturb_")(w_bytes, g, b_bytes, 0.37, eta, byte_mask)
    cu("perturb_")(w_dtype, g, b_dtype, 0.37, eta, dtype_mask)
    assert ops.FALLBACKS == before, "the byte mask fell back to the torch backend"
    assert _same_bits(w_bytes, w_dtype) and _same_bits(b_bytes, b_dtype) and _same_bits(b_bytes, w)
    real(w_torch, g, None, 0.37, eta, dtype_mask)
    check(w_bytes, w_torch, R.perturb(w, g, 0.37, eta, dtype_mask), dtype, f"perturb {mask_dtype} mask")


@gpu
def test_ssam_on_cuda_calls_no_torch_backend_primitive(monkeypatch):
    before = ops.FALLBACKS.copy()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).cuda()
    opt = sharpfused.SSAM(
        model.parameters(), torch.optim.SGD, rho=0.05, mask_every=2, lr=0.1, momentum=0.9, backend="cuda"
    )
    x = torch.randn(5, 8, device="cuda")

    def closure(perturbation=None):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    fell = ops.FALLBACKS - before
    assert not fell, f"SSAM on the cuda backend fell back to the torch backend for {dict(fell)}"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_bit_exact(dtype):
    w, b = rand(SIZES, dtype), rand(SIZES, dtype)
    b[1][3] = float("nan")
    cu("restore_")(w, b)
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(w, b))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_views_take_the_scalar_path(dtype):
    flat_w, flat_g = torch.randn(20011, dtype=dtype, device="cuda"), torch.randn(20011, dtype=dtype, device="cuda")
    cuts = [(1, 4097), (4099, 9000), (9001, 20011)]  # odd offsets: not 16-byte aligned
    w = [flat_w[a:b] for a, b in cuts]
    g = [flat_g[a:b] for a, b in cuts]
    w0, wt, head = clone(w), clone(w), flat_w[0].clone()
    backup = [torch.empty_like(x) for x in w]
    cu("perturb_")(w, g, backup, 0.5, None, None)
    T.perturb_(wt, g, None, 0.5, None, None)
    check(w, wt, R.perturb(w0, g, 0.5), dtype, "perturb unaligned")
    assert torch.equal(flat_w[0], head), "an element outside the views was written"
    assert torch.equal(torch.cat(backup), torch.cat(w0))
    check(cu("sq_norm")(g, None, 0.0, False), T.sq_norm(g), R.sq_norm(g), dtype, "sq_norm unaligned")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_norms(dtype):
    a, b = rand(SIZES, dtype), rand(SIZES, dtype)
    out = cu("dot_norms")(a, b)
    assert out.shape == (3,)
    check(out, T.dot_norms(a, b), R.dot_norms(a, b), dtype, "dot_norms")
    assert torch.equal(out, cu("dot_norms")(a, b)), "dot_norms is not deterministic"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_coefs", [False, True])
def test_combine(dtype, tensor_coefs):
    g, s = rand(SIZES, dtype), rand(SIZES, dtype)
    c1, c2 = (0.7, -0.3) if not tensor_coefs else (torch.tensor(0.7, device="cuda"), torch.tensor(-0.3, device="cuda"))
    ref = R.combine(g, s, 0.7, -0.3)
    gt = clone(g)
    cu("combine_")(g, s, c1, c2)
    T.combine_(gt, s, c1, c2)
    check(g, gt, ref, dtype, "combine")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_coefs", [False, True])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector-path", "scalar-path"])
def test_combine_zero_coefficient_drops_nonfinite_term(dtype, tensor_coefs, aligned):
    """A zero coefficient drops its term in the kernel: inf/NaN behind it never reaches g (0*inf
    would be NaN), on the 16-byte vector path and on the scalar path of odd-offset views."""

    def lists():
        if aligned:
            return rand(SIZES, dtype), rand(SIZES, dtype)
        cuts = [(1, 4097), (4099, 9000), (9001, 20011)]  # odd offsets: not 16-byte aligned
        fg, fs = torch.randn(20011, dtype=dtype, device="cuda"), torch.randn(20011, dtype=dtype, device="cuda")
        return [fg[a:b] for a, b in cuts], [fs[a:b] for a, b in cuts]

    def coef(v):
        return torch.tensor(v, device="cuda") if tensor_coefs else v

    def poison(xs, value):
        for x in xs:
            if x.numel():
                x[0], x[-1], x[x.numel() // 2] = value, -value, value

    g, s = lists()
    g0 = clone(g)
    poison(s, float("nan"))
    cu("combine_")(g, s, coef(1.0), coef(0.0))  # keep g, drop saved
    assert all(torch.equal(a, b) for a, b in zip(g, g0))
    s = clone(g0)
    poison(g, float("inf"))
    cu("combine_")(g, s, coef(0.0), coef(1.0))  # drop g, take saved
    assert all(torch.equal(a, b) for a, b in zip(g, s))
    poison(g, float("inf"))
    gt = clone(g)
    cu("combine_")(g, s, coef(0.0), coef(-0.5))  # a general coefficient on the kept term
    T.combine_(gt, s, coef(0.0), coef(-0.5))
    assert all(torch.isfinite(a).all() for a in g)
    check(g, gt, R.combine([torch.zeros_like(x) for x in g], s, 0.0, -0.5), dtype, "combine c1=0")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "momentum", "nesterov", "tensor_lr"])
def test_restore_sgd(dtype, case):
    mom = 0.0 if case == "plain" else 0.9
    nesterov, lr = case == "nesterov", (torch.tensor(0.1, device="cuda") if case == "tensor_lr" else 0.1)
    b, g = rand(SIZES, dtype), [rand(SIZES, dtype), rand(SIZES, dtype)]
    ref = R.SGDRef(lr=0.1, momentum=mom, dampening=0.1 if mom else 0.0, weight_decay=0.01, nesterov=nesterov)
    p, pt = rand(SIZES, dtype), rand(SIZES, dtype)
    bufs = [torch.empty_like(x) for x in b] if mom else None
    bufs_t = [torch.empty_like(x) for x in b] if mom else None
    for step in range(2):  # first step initializes the buffers, the second uses them
        kw = dict(lr=lr, momentum=mom, dampening=0.1 if mom else 0.0, weight_decay=0.01, nesterov=nesterov)
        cu("restore_sgd_")(p, b, g[step], bufs, *kw.values(), step == 0)
        T.restore_sgd_(pt, b, g[step], bufs_t, *kw.values(), step == 0)
        expect = ref.step(R.f64(b), R.f64(g[step]))
        check(p, pt, expect, dtype, f"restore_sgd {case} step {step}")
        if mom:
            check(bufs, bufs_t, ref.bufs, dtype, f"momentum buffer {case} step {step}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_restore_adamw(dtype, tensor_lr):
    b = rand(SIZES, dtype)
    lr = torch.tensor(1e-2, device="cuda") if tensor_lr else 1e-2
    ref = R.AdamWRef(lr=1e-2, weight_decay=0.1)
    p, pt = rand(SIZES, dtype), rand(SIZES, dtype)
    m, v = [torch.zeros_like(x) for x in b], [torch.zeros_like(x) for x in b]
    mt, vt = clone(m), clone(v)
    for step in (1, 2, 3):
        g = rand(SIZES, dtype)
        cu("restore_adamw_")(p, b, g, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1)
        T.restore_adamw_(pt, b, g, mt, vt, step, lr, 0.9, 0.999, 1e-8, 0.1)
        expect = ref.step(R.f64(b), R.f64(g))
        check(p, pt, expect, dtype, f"restore_adamw step {step}")
        check(m, mt, ref.m, dtype, f"exp_avg step {step}")
        check(v, vt, ref.v, dtype, f"exp_avg_sq step {step}")


@gpu
def test_more_tensors_than_one_table():
    # 302 non-empty tensors > the 171/82 tensors a 4 KB table holds for 2/5 lists: one large table
    # (CUDA >= 12.1 driver, Volta+) or 2/4 small ones; one tensor of 330 chunks (a table holds any
    # number of chunks; the old block map held 320)
    sizes = [1 + (i * 37) % 1001 for i in range(300)] + [330 * CHUNK + 5, 0, 3]
    x, w = rand(sizes, torch.float32), rand(sizes, torch.float32)
    total, per = cu("sq_norm")(x, w, 0.0, True)
    r_total, r_per = R.sq_norm(x, w, 0.0, True)
    assert rel_err(per, r_per) < 1e-6 and rel_err(total, r_total) < 1e-6
    b = rand(sizes, torch.float32)
    cu("restore_")(x, b)
    assert all(torch.equal(p, q) for p, q in zip(x, b))
    m, v, g = [torch.zeros_like(t) for t in x], [torch.zeros_like(t) for t in x], rand(sizes, torch.float32)
    pt, mt, vt = clone(x), clone(m), clone(v)
    cu("restore_adamw_")(x, b, g, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    T.restore_adamw_(pt, b, g, mt, vt, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    assert rel_err(x, pt) < 1e-6 and rel_err(m, mt) < 1e-6


def _kernel_launches(fn):
    """multi_tensor_kernel launches that fn() makes (torch.profiler), or None when nothing is recorded."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        return None
    return sum("multi_tensor_kernel" in n for n in names)


@gpu
def test_1200_small_tensors_one_launch_per_primitive():
    # views of flat buffers, as a bucket's: the large tables (CUDA >= 12.1, Volta+) hold the 1080
    # non-empty tensors in one table for up to 5 lists (32-bit offsets: 1247 tensors for 5 lists);
    # older drivers: ceil(1080 / 171) tables for 2 lists, / 82 for 5 (csrc/tests/pack_tables_test.cu)
    sizes = [
        0 if i % 10 == 3 else (1 + i % 3) * CHUNK + i % 7 if i % 97 == 5 else 1 + (i * 37) % 3000 for i in range(1200)
    ]

    def views(flat):
        return list(flat.split(sizes))

    flats = [torch.randn(sum(sizes), device="cuda") for _ in range(5)]
    flats[4].abs_()  # exp_avg_sq
    w, b, g, m, v = (views(f) for f in flats)
    large = importlib.import_module("sharpfused._C").large_kernel_params()
    ref_total, ref_per = R.sq_norm(g, None, 0.0, True)
    counts = {
        "sq_norm": _kernel_launches(lambda: cu("sq_norm")(g, None, 0.0, True)),
        "restore_": _kernel_launches(lambda: cu("restore_")(w, b)),
        "perturb_": _kernel_launches(lambda: cu("perturb_")(w, g, b, 0.1, None, None)),
        "restore_adamw_": _kernel_launches(
            lambda: cu("restore_adamw_")(w, b, g, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        ),
    }
    if any(c is None for c in counts.values()):
        pytest.skip("the profiler recorded no CUDA kernels here")
    want = (
        {"sq_norm": 1, "restore_": 1, "perturb_": 1, "restore_adamw_": 1}
        if large
        else {"sq_norm": 7, "restore_": 7, "perturb_": 11, "restore_adamw_": 14}
    )
    assert counts == want
    total, per = cu("sq_norm")(g, None, 0.0, True)
    assert rel_err(per, ref_per) < 1e-6 and rel_err(total, ref_total) < 1e-6
    assert torch.equal(per, cu("sq_norm")(g, None, 0.0, True)[1]), "sq_norm is not deterministic"


@gpu
def test_mixed_dtype_sq_norm_is_graph_capturable():
    # per-tensor results of two kernel groups go back in list order without an index tensor (no
    # host-to-device copy inside the call, which stream capture would refuse)
    x = [
        torch.randn(n, device="cuda", dtype=d)
        for n, d in [
            (100, torch.float32),
            (50, torch.bfloat16),
            (7, torch.bfloat16),
            (3000, torch.float32),
            (9, torch.float16),
        ]
    ]
    ref_total, ref_per = R.sq_norm(x, None, 0.0, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cu("sq_norm")(x, None, 0.0, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, per = cu("sq_norm")(x, None, 0.0, True)
    graph.replay()
    torch.cuda.synchronize()
    assert per.shape == (5,) and rel_err(per, ref_per) < 1e-2 and rel_err(total, ref_total) < 1e-2


@gpu
def test_mixed_dtypes_and_noncontiguous_fall_back_per_group():
    x = [
        torch.randn(100, device="cuda"),
        torch.randn(50, device="cuda", dtype=torch.bfloat16),
        torch.randn(30, 20, device="cuda").t(),
    ]  # the last is not contiguous
    total, per = cu("sq_norm")(x, None, 0.0, True)
    r_total, r_per = R.sq_norm(x, None, 0.0, True)
    assert per.shape == (3,) and rel_err(per, r_per) < 1e-5 and rel_err(total, r_total) < 1e-5


# ====================================================================== GPU: skipped steps, grad_coef, device step
# tests/test_primitives.py checks the skip semantics for every backend on plain lists; these add
# what is particular to the kernels: NaN payloads, unaligned views, several tables, found_inf
# of any dtype, grad_coef/step as device values over several steps, the per-group fallback and
# CUDA-graph capture with per-replay found_inf.
def _bits(xs):
    return [x.contiguous().view(-1).view(torch.uint8) for x in xs]


def _same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def _skip_call(kind, w, b, g, st, found, init=False, step=3, coef=None):
    if kind == "adamw":
        cu("restore_adamw_")(w, b, g, st[0], st[1], step, 1e-2, 0.9, 0.999, 1e-8, 0.1, coef, found)
    else:
        bufs = st[0] if kind == "sgd-m" else None
        mom = 0.9 if kind == "sgd-m" else 0.0
        cu("restore_sgd_")(w, b, g, bufs, 0.1, mom, 0.1, 0.01, False, init, coef, found)


SKIP_KINDS = ["sgd", "sgd-m", "adamw"]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SKIP_KINDS)
@pytest.mark.parametrize("init", [False, True])
def test_skip_copies_bits_and_reads_no_gradient(dtype, kind, init):
    if init and kind != "sgd-m":
        pytest.skip("init_momentum matters with momentum buffers only")
    sizes = [1 + (i * 37) % 1001 for i in range(70)] + [330 * CHUNK + 5, 0, 3]  # several tables
    b = rand(sizes, dtype)
    b[0][0] = -0.0
    nan = torch.tensor([0x7FC0_1234], dtype=torch.int32).view(torch.float32).to(dtype)  # a NaN with a payload
    b[1][0] = nan.to("cuda")[0]
    w = rand(sizes, dtype)
    g = [torch.full_like(x, float("nan")) for x in b]  # a skipped step must not read these
    st = [rand(sizes, dtype, positive=True) for _ in range(2)]
    st0 = [clone(s) for s in st]
    _skip_call(kind, w, b, g, st, torch.tensor(1.0, device="cuda"), init=init)
    assert _same_bits(w, b), "w must be the backup, bit for bit (signed zeros, NaN payloads)"
    if init:
        assert all(
            torch.equal(x.view(-1).view(torch.uint8), torch.zeros_like(x.view(-1).view(torch.uint8))) for x in st[0]
        ), "an init step's buffers become +0"
    else:
        for s, s0 in zip(st, st0):
            assert _same_bits(s, s0), "optimizer state must not change"


@gpu
@pytest.mark.parametrize("kind", SKIP_KINDS)
def test_skip_on_unaligned_views(kind):
    n = 20011
    flats = [torch.randn(n, device="cuda") for _ in range(5)]
    cuts = [(1, 4097), (4099, 9000), (9001, n)]  # odd offsets: the scalar path
    w, b, g, m, v = ([f[a:c] for a, c in cuts] for f in flats)
    for x in g:
        x.fill_(float("inf"))
    heads = [f[0].clone() for f in flats]
    m0, v0 = clone(m), clone(v)
    _skip_call(kind, w, b, g, [m, v], torch.tensor(2.0, device="cuda"))
    assert _same_bits(w, b)
    assert _same_bits(m, m0) and _same_bits(v, v0)
    assert all(torch.equal(f[0], h) for f, h in zip(flats, heads)), "an element outside the views was written"


@gpu
@pytest.mark.parametrize(
    "found",
    [
        (torch.tensor(True), True),
        (torch.tensor(False), False),
        (torch.tensor(3, dtype=torch.int64), True),
        (torch.tensor(0, dtype=torch.int32), False),
        (torch.tensor(float("nan"), dtype=torch.float16), True),
        (torch.tensor(float("inf"), dtype=torch.float64), True),
        (torch.tensor(-0.0, dtype=torch.bfloat16), False),
        (torch.tensor([1.0]), True),  # one element, not 0-d
    ],
    ids=["bool1", "bool0", "int64", "int32-0", "fp16-nan", "fp64-inf", "bf16-negzero", "shape1"],
)
def test_found_inf_of_any_dtype(found):
    flag, skips = found
    b, g = rand(SIZES, torch.float32), rand(SIZES, torch.float32)
    w = rand(SIZES, torch.float32)
    m, v = [torch.zeros_like(x) for x in b], [torch.zeros_like(x) for x in b]
    wt, mt, vt = clone(w), clone(m), clone(v)
    cu("restore_adamw_")(w, b, g, m, v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, None, flag.to("cuda"))
    if skips:
        assert _same_bits(w, b) and all(torch.equal(x, torch.zeros_like(x)) for x in m + v)
    else:
        T.restore_adamw_(wt, b, g, mt, vt, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        assert rel_err(w, wt) < 1e-6 and rel_err(m, mt) < 1e-6 and rel_err(v, vt) < 1e-6


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SKIP_KINDS)
def test_grad_coef_and_device_step_match_torch_backend(dtype, kind):
    """grad_coef as a number and as a device tensor, a float32 device step; several steps, one
    of them skipped with inf gradients: the cuda and torch backends follow the same path."""
    b = rand(SIZES, dtype)
    st = [[torch.zeros_like(x) for x in b] for _ in range(2)]
    st_t = [clone(s) for s in st]
    w, wt = clone(b), clone(b)
    for i, coef in enumerate([0.5, torch.tensor(0.25, device="cuda"), 0.5, torch.tensor(2.0, device="cuda")]):
        g = rand(SIZES, dtype)
        skip = i == 2
        if skip:
            g[-1][5] = float("inf")
        found = torch.tensor(float(skip), device="cuda")
        step = torch.tensor(float(i + 1), device="cuda")
        _skip_call(kind, w, b, g, st, found, init=i == 0, step=step, coef=coef)
        if kind == "adamw":
            T.restore_adamw_(wt, b, g, st_t[0], st_t[1], step, 1e-2, 0.9, 0.999, 1e-8, 0.1, coef, found)
        else:
            mom = 0.9 if kind == "sgd-m" else 0.0
            T.restore_sgd_(wt, b, g, st_t[0] if mom else None, 0.1, mom, 0.1, 0.01, False, i == 0, coef, found)
        if skip:
            assert _same_bits(w, b) and _same_bits(wt, b)
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 2e-2
            assert rel_err(w, wt) < tol, f"step {i}: weights"
            if kind != "sgd":
                assert rel_err(st[0], st_t[0]) < tol, f"step {i}: first state"


@gpu
def test_fallback_group_passes_skip_through():
    # a non-contiguous tensor sends its group to torch_ops: the skip must hold there too
    b = [torch.randn(100, device="cuda"), torch.randn(30, 20, device="cuda").t()]
    w = [torch.randn(100, device="cuda"), torch.randn(30, 20, device="cuda").t()]
    g = [torch.full_like(x, float("nan")) for x in b]
    m, v = [torch.ones_like(x) for x in b], [torch.ones_like(x) for x in b]
    step = torch.tensor(4.0, device="cuda")
    cu("restore_adamw_")(w, b, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.5, torch.tensor(1.0, device="cuda"))
    assert all(torch.equal(x, y) for x, y in zip(w, b))
    assert all(torch.equal(x, torch.ones_like(x)) for x in m + v)
    bufs = [torch.ones_like(x) for x in b]
    cu("restore_sgd_")(w, b, g, bufs, 0.1, 0.9, 0.0, 0.0, True, True, None, torch.tensor(True, device="cuda"))
    assert all(torch.equal(x, y) for x, y in zip(w, b))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in bufs)


@gpu
def test_graph_capture_with_device_found_inf_and_step():
    b, w = rand(SIZES, torch.float32), rand(SIZES, torch.float32)
    g = rand(SIZES, torch.float32)
    m, v = [torch.zeros_like(x) for x in b], [torch.zeros_like(x) for x in b]
    found = torch.zeros((), device="cuda")
    step = torch.ones((), device="cuda")
    coef = torch.full((), 0.5, device="cuda")
    lr = torch.full((), 1e-2, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph
        cu("restore_adamw_")(w, b, g, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1, coef, found)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cu("restore_adamw_")(w, b, g, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1, coef, found)
    wt, mt, vt = clone(w), clone(m), clone(v)
    step.fill_(2.0)
    graph.replay()
    T.restore_adamw_(wt, b, g, mt, vt, 2, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.5, None)
    assert rel_err(w, wt) < 1e-6 and rel_err(m, mt) < 1e-6 and rel_err(v, vt) < 1e-6
    m1, v1 = clone(m), clone(v)
    found.fill_(1.0)
    step.fill_(3.0)
    for x in g:
        x.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert _same_bits(w, b) and _same_bits(m, m1) and _same_bits(v, v1)


# ====================================================================== GPU: optimizers
def _train(backend, base, adaptive, dtype, steps=7):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(13, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).to("cuda", dtype)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3) if base is torch.optim.SGD else dict(lr=1e-2, weight_decay=0.1)
    opt = sharpfused.SAM(model.parameters(), base, rho=0.05, adaptive=adaptive, backend=backend, **kw)
    data = torch.randn(64, 13, device="cuda", dtype=dtype)
    target = torch.randint(0, 3, (64,), device="cuda")

    def closure():
        loss = torch.nn.functional.cross_entropy(model(data).float(), target)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)
    return [p.detach().double() for p in model.parameters()]


@gpu
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_cuda_matches_torch_backend(base, adaptive):
    a = _train("cuda", base, adaptive, torch.float32)
    b = _train("torch", base, adaptive, torch.float32)
    assert rel_err(a, b) < 1e-4


@gpu
def test_exact_restore_through_the_optimizer():
    torch.manual_seed(2)
    model = torch.nn.Linear(17, 5).to("cuda")
    opt = sharpfused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 17, device="cuda")).square().sum().backward()
    opt.first_step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.restore(opt._buckets)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
