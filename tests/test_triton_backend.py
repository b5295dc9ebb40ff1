"""The Triton backend (``sharpfused.kernels``) against the float64 reference and the torch backend.

Where no GPU is visible the kernels run on CPU tensors under ``TRITON_INTERPRET=1``; where one is,
the same tests run compiled on CUDA tensors with the interpreter off (conftest.py decides,
helpers.TRITON_DEVICES). Error rule: fp32 within 1e-6 relative of float64; bf16/fp16
at most twice the torch backend's error in the same dtype (helpers.assert_within_torch_error:
plus 4 fp32 eps where the result is an fp32 reduction, where both errors can be ~0).
"""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import sharpfused.kernels as KM
import torch
from sharpfused.kernels import combine as k_combine
from sharpfused.kernels import perturb as k_perturb
from sharpfused.kernels import restore as k_restore
from sharpfused.kernels import restore_step as k_step
from sharpfused.kernels import table as tb
from torch import Tensor

import sharpfused
from sharpfused import ops

from . import reference as R
from .helpers import TRITON_DEVICES, assert_within_torch_error, needs_interpreter, rel_err

# the package exports functions named like these two modules
k_sq = importlib.import_module("sharpfused.kernels.sq_norm")
k_dot = importlib.import_module("sharpfused.kernels.dot_norms")

# the primitives through the dispatcher (grouping by (device, dtype) and the torch fallback
# included), positional arguments in the spec's order
K, T = ops.on("triton"), ops.on("torch")
DEVICES = TRITON_DEVICES  # ["cpu"] under the interpreter (no GPU visible), ["cuda"] with a GPU
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (1, 7, 0, 1000, 4099)  # odd sizes, an empty tensor inside the list
DEFAULTS = {k: getattr(tb, k) for k in ("CHUNK", "BLOCK", "TABLE_TENSORS", "TABLE_CHUNKS")}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Small chunks so that a 4099-element tensor spans several programs (and the interpreter is quick)."""
    monkeypatch.setattr(tb, "CHUNK", 512)
    monkeypatch.setattr(tb, "BLOCK", 128)


# ------------------------------------------------------------------------------------ helpers
def rand(sizes, dtype, device, positive=False) -> list[Tensor]:
    xs = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    return [x.abs() + 0.01 for x in xs] if positive else xs


def clone(xs):
    return None if xs is None else [x.clone() for x in xs]


def check(out_triton, out_torch, ref, dtype, what: str) -> tuple[float, float]:
    """The error rule of the design: fp32 within 1e-6 relative; bf16/fp16 inputs: the 2x rule
    (helpers.assert_within_torch_error, its floor by the result's dtype)."""
    if dtype == torch.float32:
        e_tri, e_torch = rel_err(out_triton, ref), rel_err(out_torch, ref)
        assert e_tri <= 1e-6, f"{what}: fp32 error {e_tri:.3g} (torch backend {e_torch:.3g})"
        return e_tri, e_torch
    return assert_within_torch_error(out_triton, out_torch, ref, what=f"{what} ({dtype})")


def assert_close_backends(a, b, what: str) -> None:
    """Triton vs torch backend directly: fp32 elementwise; bf16/fp16 norm-wise within one epsilon.

    (Low precision is not compared elementwise: the torch backend rounds intermediates such as the
    momentum buffer to the parameter dtype before using them, the kernels do not, and an output
    that cancels to near zero can then differ by a large relative amount in one element.)
    """
    a = [a] if isinstance(a, Tensor) else a
    b = [b] if isinstance(b, Tensor) else b
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, what
    if a[0].dtype in (torch.float32, torch.float64):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    else:
        diff = rel_err(a, b)
        assert diff <= torch.finfo(a[0].dtype).eps, f"{what}: backends differ by {diff:.3g} (norm-wise)"


def f64(xs):
    return [x.detach().cpu().double() for x in xs]


# ------------------------------------------------------------------------------------ sq_norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_sq_norm(device, dtype, weighted):
    x = rand(SIZES, dtype, device)
    w = rand(SIZES, dtype, device) if weighted else None
    eta = 0.01 if weighted else 0.0
    total, per = K.sq_norm(x, w, eta, True)
    t_total, t_per = T.sq_norm(x, w, eta, True)
    r_total, r_per = R.sq_norm(f64(x), None if w is None else f64(w), eta, True)
    assert total.dim() == 0 and total.dtype == torch.float32 and total.device.type == device
    assert per.shape == (len(SIZES),) and per.dtype == torch.float32
    assert per[SIZES.index(0)].item() == 0.0
    check(total, t_total, r_total, dtype, "sq_norm total")
    check(per, t_per, r_per, dtype, "sq_norm per-tensor")
    # every dtype converts exactly and accumulates in fp32: each sum is fp32-accurate (the torch
    # backend's CPU bf16 path rounds each tensor's norm to bf16, so it is not the yardstick here)
    torch.testing.assert_close(per.double().cpu(), r_per.double().cpu(), rtol=1e-5, atol=0)
    only = K.sq_norm(x, w, eta)
    assert isinstance(only, Tensor) and torch.equal(only, total)


@pytest.mark.parametrize("device", DEVICES)
def test_sq_norm_deterministic_and_nonfinite(device):
    x = rand((4099, 1000, 3), torch.float32, device)
    a, b = K.sq_norm(x, None, 0.0, True), K.sq_norm(x, None, 0.0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    y = [t.flip(0) for t in x]
    a, b = K.dot_norms(x, y), K.dot_norms(x, y)
    assert torch.equal(a, b)
    x[1][17] = float("inf")
    assert not torch.isfinite(K.sq_norm(x))
    x[1][17] = float("nan")
    assert not torch.isfinite(K.sq_norm(x))


@pytest.mark.parametrize("device", DEVICES)
def test_sq_norm_tensor_eta(device):
    x, w = rand(SIZES, torch.float32, device), rand(SIZES, torch.float32, device)
    eta = torch.tensor(0.05, device=device)
    got = K.sq_norm(x, w, eta)
    ref = R.sq_norm(f64(x), f64(w), 0.05)
    assert rel_err(got, ref) <= 1e-6


# ------------------------------------------------------------------------------------ perturb_
PERTURB_CASES = {
    "sam_tensor_scale": dict(eta=None, mask=False, backup=True, tensor_scale=True),
    "asam_float_scale": dict(eta=0.01, mask=False, backup=True, tensor_scale=False),
    "asam_masked": dict(eta=0.0, mask=True, backup=True, tensor_scale=True),
    "masked_no_backup": dict(eta=None, mask=True, backup=False, tensor_scale=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PERTURB_CASES))
def test_perturb(device, dtype, case):
    c = PERTURB_CASES[case]
    w = rand(SIZES, dtype, device)
    g = rand(SIZES, dtype, device)
    mask = [torch.rand(n, device=device) > 0.5 for n in SIZES] if c["mask"] else None
    scale_f = 0.37
    scale = torch.tensor(scale_f, device=device) if c["tensor_scale"] else scale_f
    w_tri, w_torch = clone(w), clone(w)
    b_tri = [torch.full_like(x, float("nan")) for x in w] if c["backup"] else None  # poisoned
    b_torch = [torch.empty_like(x) for x in w] if c["backup"] else None
    K.perturb_(w_tri, g, b_tri, scale, c["eta"], mask)
    T.perturb_(w_torch, g, b_torch, scale, c["eta"], mask)
    ref = R.perturb(f64(w), f64(g), scale_f, c["eta"], None if mask is None else f64(mask))
    check(w_tri, w_torch, ref, dtype, f"perturb_ {case}")
    assert_close_backends(w_tri, w_torch, f"perturb_ {case}")
    if c["backup"]:
        assert all(torch.equal(b, x) for b, x in zip(b_tri, w)), "backup is not bit-exact"
    if mask is not None:  # masked-out entries keep their bits
        assert all(torch.equal(a[~m], x[~m]) for a, x, m in zip(w_tri, w, mask))


# ------------------------------------------------------------------------------------ restore_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_bit_exact(device, dtype):
    backup = rand(SIZES, dtype, device)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40], dtype=dtype)
    backup[-1][:5] = specials.to(device)
    params = [torch.full_like(b, 7.0) for b in backup]  # poisoned
    K.restore_(params, backup)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    for p, b in zip(params, backup):
        assert torch.equal(p.view(bits), b.view(bits))


# ------------------------------------------------------------------------------------ dot_norms
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_norms(device, dtype):
    a = rand(SIZES, dtype, device)
    b = [x + 0.3 * y for x, y in zip(a, rand(SIZES, dtype, device))]  # correlated: a sizeable dot
    got, want = K.dot_norms(a, b), T.dot_norms(a, b)
    assert got.shape == (3,) and got.dtype == torch.float32 and got.device.type == device
    ref = R.dot_norms(a, b)
    for i, name in enumerate(("dot", "|a|^2", "|b|^2")):
        check(got[i], want[i], ref[i], dtype, f"dot_norms {name}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------ combine_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_coefs", [False, True])
def test_combine(device, dtype, tensor_coefs):
    g, saved = rand(SIZES, dtype, device), rand(SIZES, dtype, device)
    c1f, c2f = 0.8125, -1.37
    c1, c2 = (torch.tensor(c1f, device=device), torch.tensor(c2f, device=device)) if tensor_coefs else (c1f, c2f)
    g_tri, g_torch = clone(g), clone(g)
    K.combine_(g_tri, saved, c1, c2)
    T.combine_(g_torch, saved, c1, c2)
    check(g_tri, g_torch, R.combine(f64(g), f64(saved), c1f, c2f), dtype, "combine_")
    assert_close_backends(g_tri, g_torch, "combine_")


# ------------------------------------------------------------------------------------ restore_sgd_
SGD_CASES = {
    "plain_wd": dict(momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False, init=False),
    "momentum_first_step": dict(momentum=0.9, dampening=0.1, weight_decay=0.0, nesterov=False, init=True),
    "momentum_dampening": dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, init=False),
    "nesterov_wd": dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, init=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_restore_sgd(device, dtype, case):
    c = SGD_CASES[case]
    backup, g = rand(SIZES, dtype, device), rand(SIZES, dtype, device)
    has_m = bool(c["momentum"])
    if has_m and c["init"]:
        bufs = [torch.full_like(x, float("nan")) for x in backup]  # must be overwritten, never read
    else:
        bufs = rand(SIZES, dtype, device) if has_m else None
    lr_f = 0.1
    lr = torch.tensor(lr_f, device=device) if case == "nesterov_wd" else lr_f  # both scalar kinds
    p_tri = [torch.full_like(x, float("nan")) for x in backup]  # poisoned: every element is written
    p_torch = [torch.empty_like(x) for x in backup]
    buf_tri, buf_torch = clone(bufs), clone(bufs)
    args = (lr, c["momentum"], c["dampening"], c["weight_decay"], c["nesterov"], c["init"])
    K.restore_sgd_(p_tri, backup, g, buf_tri, *args)
    T.restore_sgd_(p_torch, backup, g, buf_torch, *args)
    ref = R.SGDRef(lr_f, c["momentum"], c["dampening"], c["weight_decay"], c["nesterov"])
    if has_m and not c["init"]:
        ref.bufs = f64(bufs)
    want = ref.step(f64(backup), f64(g))
    check(p_tri, p_torch, want, dtype, f"restore_sgd_ {case} w")
    assert_close_backends(p_tri, p_torch, f"restore_sgd_ {case} w")
    if has_m:
        check(buf_tri, buf_torch, ref.bufs, dtype, f"restore_sgd_ {case} momentum buffer")
        assert_close_backends(buf_tri, buf_torch, f"restore_sgd_ {case} momentum buffer")


# ------------------------------------------------------------------------------------ restore_adamw_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_restore_adamw(device, dtype, tensor_lr):
    backup, g = rand(SIZES, dtype, device), rand(SIZES, dtype, device)
    m, v = rand(SIZES, dtype, device), rand(SIZES, dtype, device, positive=True)
    step, lr_f, b1, b2, eps, wd = 3, 1e-2, 0.9, 0.999, 1e-8, 0.05
    lr = torch.tensor(lr_f, device=device) if tensor_lr else lr_f
    p_tri = [torch.full_like(x, float("nan")) for x in backup]
    p_torch = [torch.empty_like(x) for x in backup]
    m_tri, v_tri, m_torch, v_torch = clone(m), clone(v), clone(m), clone(v)
    K.restore_adamw_(p_tri, backup, g, m_tri, v_tri, step, lr, b1, b2, eps, wd)
    T.restore_adamw_(p_torch, backup, g, m_torch, v_torch, step, lr, b1, b2, eps, wd)
    ref = R.AdamWRef(lr_f, (b1, b2), eps, wd)
    ref.m, ref.v, ref.t = f64(m), f64(v), step - 1
    want = ref.step(f64(backup), f64(g))
    check(p_tri, p_torch, want, dtype, "restore_adamw_ w")
    check(m_tri, m_torch, ref.m, dtype, "restore_adamw_ exp_avg")
    check(v_tri, v_torch, ref.v, dtype, "restore_adamw_ exp_avg_sq")
    for a, b, what in ((p_tri, p_torch, "w"), (m_tri, m_torch, "exp_avg"), (v_tri, v_torch, "exp_avg_sq")):
        assert_close_backends(a, b, f"restore_adamw_ {what}")


# ------------------------------------------------------------------------------------ tables
def _count_launches(monkeypatch, kernels) -> dict:
    counts = {k: 0 for k in kernels}

    def wrap(k):
        run = k.run

        def counted(*args, **kwargs):
            counts[k] += 1
            return run(*args, **kwargs)

        return counted

    for k in counts:  # each kernel once (several primitives may share one)
        monkeypatch.setattr(k, "run", wrap(k))
    return counts


ELEMENTWISE = {
    "perturb_": k_perturb._perturb_kernel,
    "restore_": k_restore._restore_kernel,
    "combine_": k_combine._combine_kernel,
    "restore_sgd_": k_step._restore_step_kernel,  # one kernel for every fused base step (UPDATE)
    "restore_adamw_": k_step._restore_step_kernel,
    "restore_rmsprop_": k_step._restore_step_kernel,
    "sq_norm": k_sq._sq_norm_kernel,
    "dot_norms": k_dot._dot_norms_kernel,
}


def _run_all(backend, w, g, b, m, v, bufs):
    """Every primitive once on the given lists (mutating them); returns the reductions."""
    out = [backend.sq_norm(g, w, 0.01, True), backend.dot_norms(w, g)]
    backend.perturb_(w, g, b, torch.tensor(0.5, device=w[0].device), 0.01, None)
    backend.combine_(g, b, 0.5, -0.25)
    backend.restore_sgd_(w, b, g, bufs, 0.1, 0.9, 0.0, 0.01, True, False)
    backend.restore_adamw_(w, b, g, m, v, 2, 1e-2, 0.9, 0.999, 1e-8, 0.01)
    backend.perturb_(w, g, None, 0.3, None, None)
    backend.restore_(w, b)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_group(device, monkeypatch):
    """Default constants: 12 tensors, each primitive is a single launch (plus sq_norm's second stage)."""
    for k, v in DEFAULTS.items():
        monkeypatch.setattr(tb, k, v)
    sizes = [(i * 37) % 300 for i in range(12)]
    w, g, b, m = (rand(sizes, torch.float32, device) for _ in range(4))
    v, bufs = rand(sizes, torch.float32, device, positive=True), rand(sizes, torch.float32, device)
    counts = _count_launches(monkeypatch, ELEMENTWISE.values())
    _run_all(K, w, g, b, m, v, bufs)
    assert counts[k_perturb._perturb_kernel] == 2
    assert counts[k_step._restore_step_kernel] == 2  # restore_sgd_ and restore_adamw_, one launch each
    for name in ("restore_", "combine_", "sq_norm", "dot_norms"):
        assert counts[ELEMENTWISE[name]] == 1, name


@pytest.mark.parametrize("device", DEVICES)
def test_more_tensors_than_one_table(device, monkeypatch):
    """A table of 3 tensors / 4 chunks: the list takes several launches and still matches torch."""
    monkeypatch.setattr(tb, "TABLE_TENSORS", 3)
    monkeypatch.setattr(tb, "TABLE_CHUNKS", 4)
    sizes = [5, 0, 700, 1, 3000, 129, 0, 513, 64, 2, 1100]  # 3000 elements = 6 chunks > 4
    w, g, b, m = (rand(sizes, torch.float32, device) for _ in range(4))
    v, bufs = rand(sizes, torch.float32, device, positive=True), rand(sizes, torch.float32, device)
    tab = tb.table([w])
    assert len(tab.pieces) >= 4 and tab.n_chunks == sum(-(-n // tb.CHUNK) for n in sizes)
    assert all(p.n_tensors <= 3 and p.n_chunks <= 4 for p in tab.pieces)
    state = [clone(x) for x in (w, g, b, m, v, bufs)]
    counts = _count_launches(monkeypatch, ELEMENTWISE.values())
    got = _run_all(K, w, g, b, m, v, bufs)
    assert counts[k_restore._restore_kernel] == len(tb.table([w, b]).pieces) >= 4
    ref_sq = R.sq_norm(f64(state[1]), f64(state[0]), 0.01, True)
    ref_dot = R.dot_norms(state[0], state[1])
    want = _run_all(T, *state)
    for tri, tor, ref in (
        (got[0][0], want[0][0], ref_sq[0]),
        (got[0][1], want[0][1], ref_sq[1]),
        (got[1], want[1], ref_dot),
    ):
        assert rel_err(tri, ref) <= 1e-6 and rel_err(tri, tor) <= 1e-6
    for a, b_, name in zip((w, g, b, m, v, bufs), state, ("w", "g", "backup", "m", "v", "bufs")):
        for x, y in zip(a, b_):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda s, name=name: f"{name}: {s}")


def test_table_cache_rebuilt_on_address_change():
    xs = rand((10, 20, 0), torch.float32, (DEVICES or ["cpu"])[0])
    t1 = tb.table([xs])
    assert tb.table([list(xs)]) is t1  # same addresses and numels: cached
    ys = [xs[0], xs[1].clone(), xs[2]]
    t2 = tb.table([ys])
    assert t2 is not t1 and tb.table([ys]) is t2
    addrs = t2.pieces[0].addrs.cpu().tolist()
    assert addrs == [ys[0].data_ptr(), ys[1].data_ptr()]  # the empty tensor has no chunk, no entry


@needs_interpreter
def test_fresh_gradients_rebuild_only_the_addresses(monkeypatch):
    """zero_grad(set_to_none=True) gives new gradient tensors every step: a table is rebuilt only when
    an address changed, the layout (numels, chunk map) is built once per list shape, and each
    rebuild is one address upload; results equal a run whose gradients keep their tensors."""
    tb.clear_cache()
    shapes = [(33, 5), (7,), (4099,), (0,), (17, 3, 3)]
    runs = {}
    for fresh in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = sharpfused.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="triton")
        pool = [[torch.randn(s) for s in shapes] for _ in range(3)]
        layouts = []
        for t in range(6):
            for p, g in zip(params, pool[t % 3]):
                p.grad = g.clone() if fresh else g  # fresh: new tensors (new addresses) every pass
            opt.first_step(zero_grad=True)
            for p, g in zip(params, pool[(t + 1) % 3]):
                p.grad = g.clone() if fresh else g
            opt.second_step(zero_grad=True)
            layouts.append(tb.STATS["layouts"])
        runs[fresh] = [p.detach().clone() for p in params]
        if fresh:
            assert layouts[1:] == layouts[:1] * 5, f"layouts rebuilt on new addresses: {layouts}"
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))
    before = dict(tb.STATS)
    xs = [torch.randn(s) for s in shapes]
    tb.table([xs])
    tb.table([[x.clone() for x in xs]])  # same numels, new addresses: an upload, no layout
    assert tb.STATS["uploads"] == before["uploads"] + 2 and tb.STATS["layouts"] == before["layouts"]
    tb.table([xs[:2]])  # other numels: a new layout
    assert tb.STATS["layouts"] == before["layouts"] + 1


def test_scalars_are_not_constexpr():
    """Per-step scalars are runtime args or tensors: only block sizes, dtypes and flags are constexpr."""
    allowed_suffix = ("_DT", "_PTR")
    allowed = {"CHUNK", "BLOCK", "ALIGNED", "MASKED", "HAS_BACKUP", "HAS_MASK", "ADAPTIVE", "WEIGHTED"}
    allowed |= {"HAS_WD", "HAS_MOMENTUM", "NESTEROV", "INIT", "HAS_COEF", "HAS_FOUND_INF", "DECOUPLED", "HAS_NSQ"}
    allowed |= {"NORM_EPS", "UPDATE", "HAS_S1", "HAS_S2"}  # the library epsilon (spec.NORM_EPS); the fused step picked, its state lists
    kernels = [*ELEMENTWISE.values(), k_sq._sq_norm_per_tensor_kernel, k_sq._sq_norm_total_kernel]
    for k in kernels:
        sig = inspect.signature(k.fn)
        const = {n for n, p in sig.parameters.items() if p.annotation is not inspect.Parameter.empty}
        assert const, k.fn.__name__
        bad = {n for n in const if n not in allowed and not n.endswith(allowed_suffix)}
        assert not bad, f"{k.fn.__name__}: constexpr {bad}"
        runtime = set(sig.parameters) - const
        assert not any(n.isupper() for n in runtime)
        assert k.fn.__doc__ is None or "ytes" in k.fn.__doc__  # byte model in every kernel docstring


# ------------------------------------------------------------------------------------ skipped steps
def _record_specializations(monkeypatch, kernels) -> dict:
    """Per kernel, the compile key of every launch: constexpr values and the type of each runtime
    argument (tensor dtype or Python type). Equal keys mean no recompilation under a real GPU."""
    keys = {k: [] for k in kernels}

    def wrap(k):
        run = k.run

        def recorded(*args, **kwargs):
            const = tuple(sorted((n, str(v)) for n, v in kwargs.items() if n.isupper()))
            types = tuple(str(a.dtype) if isinstance(a, Tensor) else type(a).__name__ for a in args)
            keys[k].append((const, types))
            return run(*args, **kwargs)

        return recorded

    for k in kernels:
        monkeypatch.setattr(k, "run", wrap(k))
    return keys


def _base_steps(w, b, g, bufs, m, v, *, found_inf, coef, step, init=False):
    K.restore_sgd_(w, b, g, bufs, 0.1, 0.9, 0.1, 0.01, True, init, coef, found_inf)
    K.restore_adamw_(w, b, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.01, coef, found_inf)


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_one_launch_and_runtime_scalars(device, monkeypatch):
    """A skipped step is still one launch per group; found_inf, grad_coef and a device step are
    runtime values: changing them never changes a kernel's compile key."""
    for k, v in DEFAULTS.items():
        monkeypatch.setattr(tb, k, v)
    sizes = [(i * 37) % 300 for i in range(12)]
    b, g, bufs, m = (rand(sizes, torch.float32, device) for _ in range(4))
    v = rand(sizes, torch.float32, device, positive=True)
    g[3][0] = float("nan")
    kernels = (k_step._restore_step_kernel,)  # SGD's and AdamW's launches in turn: keys[k][0::2], [1::2]
    keys = _record_specializations(monkeypatch, kernels)
    state = clone(bufs), clone(m), clone(v)
    w = clone(g)
    one = torch.tensor(1.0, device=device)
    _base_steps(w, b, g, bufs, m, v, found_inf=one, coef=torch.tensor(0.5, device=device), step=one * 3)
    assert all(len(keys[k]) == 2 for k in kernels), "a skipped step is one launch per group"
    assert all(torch.equal(x, y) for x, y in zip(w, b))
    for now, before in zip((bufs, m, v), state):
        assert all(torch.equal(x, y) for x, y in zip(now, before))
    g[3][0] = 1.0
    _base_steps(w, b, g, bufs, m, v, found_inf=one * 0, coef=torch.tensor(0.25, device=device), step=one * 4)
    assert not any(torch.equal(x, y) for x, y in zip(w, b) if x.numel()), "found_inf == 0 takes the step"
    for k in kernels:
        assert len(keys[k]) == 4, keys[k]
        sgd, adam = keys[k][0::2], keys[k][1::2]
        assert len(sgd) == len(adam) == 2 and sgd[0] == sgd[1] and adam[0] == adam[1], f"respecialized: {keys[k]}"
        assert sgd[0] != adam[0]  # UPDATE tells the two apart
    # float grad_coef: a runtime fp32 argument, its value is no part of the key either
    for coef in (0.5, 0.125):
        _base_steps(w, b, g, bufs, m, v, found_inf=one * 0, coef=coef, step=one * 5)
    for k in kernels:
        assert keys[k][4] == keys[k][6] and keys[k][5] == keys[k][7], "respecialized on a float grad_coef"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", ["bool", "int32", "fp16", "nan"])
def test_found_inf_any_dtype_and_mixed_backup(device, flag):
    """found_inf of any dtype (NaN counts as nonzero); bf16 params with an fp32 backup: the skipped
    step writes the backup rounded once, an init momentum step zeros the buffer."""
    sizes = (7, 0, 1000)
    b = rand(sizes, torch.float32, device)
    w = [torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device) for n in sizes]
    g = [torch.full((n,), float("inf"), dtype=torch.bfloat16, device=device) for n in sizes]
    bufs = [torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device) for n in sizes]
    found = {
        "bool": torch.tensor(True),
        "int32": torch.tensor(2, dtype=torch.int32),
        "fp16": torch.tensor(1.0, dtype=torch.float16),
        "nan": torch.tensor(float("nan")),
    }[flag].to(device)
    K.restore_sgd_(w, b, g, bufs, 0.1, 0.9, 0.0, 0.0, False, True, None, found)
    assert all(torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(w, b))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in bufs)
    m, v = clone(bufs), clone(bufs)
    w = clone(bufs)
    K.restore_adamw_(w, b, g, m, v, 3, 1e-2, 0.9, 0.999, 1e-8, 0.01, 2.0, found)
    assert all(torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(w, b))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in m + v)


@pytest.mark.parametrize("device", DEVICES)
def test_device_step_bias_corrections_match_host(device):
    """The in-kernel fp64 bias corrections round to the host's double-precision values."""
    b, g, m = (rand((5, 300), torch.float32, device) for _ in range(3))
    v = rand((5, 300), torch.float32, device, positive=True)
    for beta2 in (0.999, 0.9999):
        for t in (1, 2, 10, 777, 10**5):
            outs = []
            for step in (t, torch.tensor(float(t), device=device)):
                w, mm, vv = clone(b), clone(m), clone(v)
                K.restore_adamw_(w, b, g, mm, vv, step, 1e-2, 0.9, beta2, 1e-8, 0.01)
                outs.append(w)
            assert all(torch.equal(x, y) for x, y in zip(*outs)), (beta2, t)


# ------------------------------------------------------------------------------------ mixed dtypes
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes(device):
    dts = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32, torch.bfloat16]
    sizes = [7, 1000, 33, 0, 4099, 5]
    x = [torch.randn(n, dtype=d, device=device) for n, d in zip(sizes, dts)]
    y = [torch.randn(n, dtype=d, device=device) for n, d in zip(sizes, dts)]
    total, per = K.sq_norm(x, y, 0.1, True)
    t_total, t_per = T.sq_norm(x, y, 0.1, True)
    assert per.dtype == t_per.dtype == torch.float64 and total.dtype == torch.float64
    # the kernel's sums are fp32-accurate in every dtype: held to float64, not to the torch
    # backend (whose CPU bf16 norms round to bf16)
    r_total, r_per = R.sq_norm(f64(x), f64(y), 0.1, True)
    torch.testing.assert_close(per.cpu(), r_per.double().cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(total.cpu(), r_total.double().cpu(), rtol=1e-5, atol=0)
    assert rel_err(t_total, r_total) < 8e-3
    got, want = K.dot_norms(x, y), T.dot_norms(x, y)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    w_tri, w_torch = clone(x), clone(x)
    b_tri = [torch.full_like(t, float("nan")) for t in x]
    K.perturb_(w_tri, y, b_tri, torch.tensor(0.2, device=device), 0.0, None)
    T.perturb_(w_torch, y, None, torch.tensor(0.2, device=device), 0.0, None)
    assert_close_backends(w_tri, w_torch, "mixed perturb_")
    assert all(torch.equal(a, b) for a, b in zip(b_tri, x))
    K.combine_(w_tri, y, 0.5, 2.0)
    T.combine_(w_torch, y, 0.5, 2.0)
    assert_close_backends(w_tri, w_torch, "mixed combine_")
    K.restore_(w_tri, x)
    assert all(torch.equal(a, b) for a, b in zip(w_tri, x))


# ------------------------------------------------------------------------------------ optimizer parity
def _mlp(device):
    return torch.nn.Sequential(
        torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)
    ).to(device)


BASES = {
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_dampening": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_optimizer_parity(device, base, adaptive):
    base_cls, kw = BASES[base]
    torch.manual_seed(3)
    model0 = _mlp(device)
    x, y = torch.randn(32, 6, device=device), torch.randn(32, 3, device=device)
    runs = {}
    for backend in ("triton", "torch"):
        model = copy.deepcopy(model0)
        opt = sharpfused.SAM(model.parameters(), base_cls, rho=0.5 if adaptive else 0.05, adaptive=adaptive,
                             eta=0.01, backend=backend, **kw)  # fmt: skip
        for _ in range(7):

            def closure(model=model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        assert all(b.backend == backend for b in opt.buckets())
        runs[backend] = (model, opt)
    (m_tri, o_tri), (m_torch, o_torch) = runs["triton"], runs["torch"]
    moved = max((a - b).abs().max().item() for a, b in zip(m_tri.parameters(), model0.parameters()))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(m_tri.parameters(), m_torch.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(m_tri.parameters(), m_torch.parameters()):
        sa, sb = o_tri.base_optimizer.state[a], o_torch.base_optimizer.state[b]
        assert set(sa) == set(sb) and sa
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=lambda s, key=key: f"{key}: {s}")


@needs_interpreter
def test_resolve_triton_on_cpu_under_interpreter():
    assert ops.resolve("triton", torch.device("cpu")) == "triton"
    assert ops.backend_module("triton") is KM


# ------------------------------------------------------------------------------------ rounding, errors
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stores_round_like_torch(device, dtype):
    """An fp32 result stored to bf16/fp16 is rounded to nearest even, bit for bit as torch's cast."""
    bits = torch.randint(-(2**31), 2**31 - 1, (4099,), dtype=torch.int32)
    x = bits.view(torch.float32).to(device)  # every class: subnormals, huge values, inf, NaN
    x[:4] = torch.tensor([float("nan"), float("inf"), 1e-40, 1.0 + 2.0**-8], device=device)  # not -0: 0 + -0 = +0
    g = [torch.zeros(x.numel(), dtype=dtype, device=device)]
    K.combine_(g, [x], 0.0, 1.0)  # g <- 0*g + 1*x: one fp32 result, one rounding on the store
    want = x.to(dtype)
    same = (g[0].view(torch.int16) == want.view(torch.int16)) | (g[0].isnan() & want.isnan())
    assert same.all(), f"{(~same).sum().item()} elements rounded differently"


def test_bad_lists_raise():
    x = rand((3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match="non-empty"):
        K.restore_([], [])
    with pytest.raises(ValueError, match="differ"):
        K.restore_(x, x[::-1])


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_views_take_the_unhinted_path(device):
    """Views at odd offsets of one flat buffer (as FlatBuffer makes them) are not 16-byte aligned:
    the table says so (no vectorization hint) and the results are the same."""
    sizes = (7, 1000, 0, 4099)
    flat = torch.randn(sum(sizes) + 1, device=device)
    views, off = [], 1  # offset 1: every view is misaligned by 4 bytes
    for n in sizes:
        views.append(flat[off : off + n])
        off += n
    g = rand(sizes, torch.float32, device)
    assert not tb.table([views, g]).aligned and tb.table([g, clone(g)]).aligned
    w_tri, w_torch = clone(views), clone(views)
    b_tri = views  # backup written through the misaligned views
    K.perturb_(w_tri, g, b_tri, 0.25, 0.01, None)
    T.perturb_(w_torch, g, None, 0.25, 0.01, None)
    assert_close_backends(w_tri, w_torch, "perturb_ unaligned")
    assert all(torch.equal(a, b) for a, b in zip(b_tri, clone(views)))


def test_kernels_compile_for_sm90_with_16_byte_accesses(tmp_path):
    """Compile each kernel ahead of time for sm_90 (no GPU needed) in a process without the
    interpreter: the GPU path builds, and with aligned tables full blocks use 16-byte ld/st."""
    import subprocess
    import sys

    script = tmp_path / "aot.py"
    script.write_text(AOT_SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("kernel ")]
    assert len(lines) == 8, out.stdout
    for ln in lines:
        name, v4 = ln.split()[1], int(ln.split()[2])
        assert v4 > 0 or name == "_sq_norm_per_tensor_kernel", f"no 16-byte loads in {name}"


AOT_SCRIPT = r"""
import importlib, re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

m = lambda name: importlib.import_module("sharpfused.kernels." + name)
G = dict(CHUNK=16384, BLOCK=2048, ALIGNED=True)
F = tl.float32
cases = [
    (m("perturb")._perturb_kernel, dict(P_DT=F, G_DT=F, B_DT=F, M_DT=tl.uint8, SCALE_PTR=True, ETA_PTR=False,
                                        HAS_BACKUP=True, HAS_MASK=True, ADAPTIVE=True, **G)),
    (m("restore")._restore_kernel, dict(P_DT=tl.int16, B_DT=tl.int16, **G)),
    (m("combine")._combine_kernel, dict(G_DT=tl.bfloat16, S_DT=tl.bfloat16, C1_PTR=True, C2_PTR=False, **G)),
    (m("sq_norm")._sq_norm_kernel, dict(X_DT=tl.float16, W_DT=tl.float16, ETA_PTR=False, WEIGHTED=True, **G)),
    (m("dot_norms")._dot_norms_kernel, dict(A_DT=F, B_DT=F, **G)),
    (m("restore_step")._restore_step_kernel, dict(UPDATE=0, P_DT=tl.bfloat16, B_DT=tl.bfloat16,
        G_DT=tl.bfloat16, S1_DT=tl.bfloat16, S2_DT=F, PB_DT=tl.int16, BB_DT=tl.int16, LR_PTR=False,
        COEF_PTR=True, STEP_PTR=False, HAS_COEF=True, HAS_FOUND_INF=True, HAS_S1=True, HAS_S2=False,
        HAS_WD=True, HAS_MOMENTUM=True, NESTEROV=True, INIT=False, DECOUPLED=False, **G)),
    (m("restore_step")._restore_step_kernel, dict(UPDATE=1, P_DT=F, B_DT=F, G_DT=F, S1_DT=F, S2_DT=F,
        PB_DT=tl.int32, BB_DT=tl.int32, LR_PTR=True, STEP_PTR=True, COEF_PTR=False, HAS_COEF=True,
        HAS_FOUND_INF=True, HAS_S1=True, HAS_S2=True, HAS_WD=False, HAS_MOMENTUM=False, NESTEROV=False,
        INIT=False, DECOUPLED=True, **G)),
    (m("sq_norm")._sq_norm_per_tensor_kernel, dict(BLOCK=1024)),
]
FLOATS = {"h0", "h1", "h2", "h3", "h4", "h5", "h6", "beta1_hi", "beta1_lo", "beta2_hi", "beta2_lo"}
for fn, consts in cases:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in ("addrs_ptr", "numels_ptr", "chunk_tensor_ptr", "chunk_start_ptr",
                                           "chunk_begin_ptr") else "*fp32"
        elif name.endswith("_val") or name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8})
    if consts.get("UPDATE") == 1:  # Adam's device-step bias corrections: IEEE fp64 div and sqrt
        ptx = k.asm["ptx"]
        assert "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx and "approx.f64" not in ptx, "fp64 not IEEE"
    print("kernel", fn.__name__, len(re.findall(r"ld\.global(?:\.\w+)*\.v4", k.asm["ptx"])))
"""


# ------------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.parametrize("device", DEVICES)
def test_sam_adamw_step_captured_in_a_cuda_graph(device):
    """sq_norm -> device scale -> perturb_, then restore_adamw_ with a device step, lr, grad_coef
    and found_inf: captured once in a CUDA graph and replayed with new device values (on CPU, where
    there are no graphs, the same calls run eagerly). Replays match the torch backend; a replay
    with found_inf set restores w bit-exactly and leaves m and v as they were."""
    sizes = (1, 7, 0, 1000, 4099)
    w, g = rand(sizes, torch.float32, device), rand(sizes, torch.float32, device)
    backup = [torch.empty_like(x) for x in w]
    m, v = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    found, step = torch.zeros((), device=device), torch.ones((), device=device)
    coef, lr = torch.full((), 0.5, device=device), torch.full((), 1e-2, device=device)
    w0 = clone(w)

    def sam_step():
        scale = 0.05 / (K.sq_norm(g).sqrt() + 1e-12)
        K.perturb_(w, g, backup, scale, 0.0, None)
        K.restore_adamw_(w, backup, g, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1, coef, found)

    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: compiles, builds the tables
            sam_step()
        torch.cuda.current_stream().wait_stream(side)
        for x, x0, a, b in zip(w, w0, m, v):  # back to the start
            x.copy_(x0), a.zero_(), b.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sam_step()
        replay = graph.replay
    else:
        replay = sam_step
    for x, x0, a, b in zip(w, w0, m, v):  # capture may have run the kernels: start again
        x.copy_(x0), a.zero_(), b.zero_()
    step.fill_(2.0)
    replay()
    wt, mt, vt = clone(w0), [torch.zeros_like(x) for x in w0], [torch.zeros_like(x) for x in w0]
    T.restore_adamw_(wt, w0, g, mt, vt, 2, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.5, None)
    assert rel_err(w, wt) < 1e-6 and rel_err(m, mt) < 1e-6 and rel_err(v, vt) < 1e-6
    assert all(torch.equal(b, x0) for b, x0 in zip(backup, w0))  # the backup is the unperturbed w
    w1, m1, v1 = clone(w), clone(m), clone(v)
    found.fill_(1.0)
    step.fill_(3.0)
    for x in g:
        x.fill_(float("nan"))
    replay()
    if device == "cuda":
        torch.cuda.synchronize()
    same = lambda a, b: all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))  # noqa: E731
    assert same(w, w1) and same(m, m1) and same(v, v1)
