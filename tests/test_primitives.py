"""Each primitive of sharpfused.ops on the torch backend against the float64 reference."""

import pytest
import torch

from sharpfused import ops
from sharpfused.backends import torch_ops

from . import reference as ref
from .helpers import ODD_SIZES, assert_within_torch_error, first_mismatch, rand_list, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# fp32 within ~1e-6; low precision: a few units of the dtype's rounding
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
MANY = [(i % 13 + 1, 3) if i % 5 else (i % 7,) for i in range(211)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [ODD_SIZES, MANY], ids=["odd", "211-tensors"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sq_norm(dtype, shapes, adaptive):
    xs = rand_list(shapes, dtype)
    ws = rand_list(shapes, dtype) if adaptive else None
    total, per = ops.sq_norm(xs, ws, 0.01, per_tensor=True)
    rt, rp = ref.sq_norm(xs, ws, 0.01, per_tensor=True)
    assert total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(total, rt) < TOL[dtype]
    assert rel_err(per, rp) < TOL[dtype]
    assert torch.equal(ops.sq_norm(xs, ws, 0.01), total)  # deterministic, same value without per_tensor


def test_sq_norm_mixed_dtypes_keeps_list_order():
    shapes = [(5,), (3, 2), (8,), (1,)]
    xs = [x.to(d) for x, d in zip(rand_list(shapes), [torch.float32, torch.bfloat16, torch.float64, torch.float16])]
    total, per = ops.sq_norm(xs, per_tensor=True)
    rt, rp = ref.sq_norm(xs, per_tensor=True)
    assert per.shape == (4,)
    assert rel_err(per, rp) < 8e-3 and rel_err(total, rt) < 8e-3
    for i in range(len(xs)):
        assert abs(per[i].item() - rp[i].item()) <= 8e-3 * rp[i].item()


def test_sq_norm_nonfinite_propagates():
    xs = rand_list([(4,), (6,)])
    xs[1][3] = float("inf")
    assert not torch.isfinite(ops.sq_norm(xs))
    xs[1][3] = float("nan")
    assert torch.isnan(ops.sq_norm(xs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_perturb_and_exact_restore(dtype, eta, use_mask, tensor_scale):
    shapes = ODD_SIZES + MANY[:40]
    w = rand_list(shapes, dtype)
    g = rand_list(shapes, dtype)
    mask = [torch.rand(s) > 0.5 for s in shapes] if use_mask else None
    w0 = [x.clone() for x in w]
    backup = [torch.full_like(x, float("nan")) for x in w]  # poisoned
    scale = 0.37
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    ops.perturb_(w, g, backup, torch.tensor(scale, dtype=opm) if tensor_scale else scale, eta, mask)
    assert all(torch.equal(b, x) for b, x in zip(backup, w0))
    want = ref.perturb(w0, g, scale, eta, mask)
    # one rounding to the dtype at the end: error within the dtype's half-ulp of the result
    err = rel_err(w, want)
    assert err < TOL[dtype], err
    ops.restore_(w, backup)
    assert all(torch.equal(a, b) for a, b in zip(w, w0))  # bit-exact, every dtype


def test_perturb_without_backup_and_low_precision_rounds_once():
    # bf16: w + s*g computed in fp32 then rounded once equals the correctly rounded float64 result
    w = rand_list([(1001,)], torch.bfloat16)
    g = rand_list([(1001,)], torch.bfloat16)
    want = (w[0].double() + 0.01 * g[0].double()).float().to(torch.bfloat16)
    ops.perturb_(w, g, None, 0.01)
    mismatch = (w[0] != want).float().mean().item()
    assert mismatch < 0.01  # double rounding through fp32 may flip a rare tie


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_norms(dtype):
    shapes = ODD_SIZES + MANY[:60]
    a, b = rand_list(shapes, dtype), rand_list(shapes, dtype)
    out = ops.dot_norms(a, b)
    want = ref.dot_norms(a, b)
    assert out.shape == (3,)
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_coef", [False, True])
def test_combine(dtype, tensor_coef):
    shapes = ODD_SIZES + MANY[:30]
    g, s = rand_list(shapes, dtype), rand_list(shapes, dtype)
    want = ref.combine(g, s, 0.7, -1.3)
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    c1, c2 = (torch.tensor(0.7, dtype=opm), torch.tensor(-1.3, dtype=opm)) if tensor_coef else (0.7, -1.3)
    ops.combine_(g, s, c1, c2)
    assert rel_err(g, want) < TOL[dtype]


def _grads(shapes, dtype):
    # magnitudes in [0.5, 1.5]: keeps Adam's second moment out of fp16's subnormal range
    gs = rand_list(shapes, torch.float64)
    return [(x.sign() * (0.5 + torch.rand_like(x))).to(dtype) for x in gs]


def _run(kind, dtype, shapes, steps=7, tensor_lr=False, **hp):
    """Our fused restore+step, torch.optim's own step in the same dtype, and the float64 reference:
    the three final weight lists."""
    torch.manual_seed(3)
    w = rand_list(shapes, dtype)
    wt = [torch.nn.Parameter(x.clone()) for x in w]
    wref = ref.f64(w)
    if kind == "sgd":
        base, refopt = torch.optim.SGD(wt, **hp), ref.SGDRef(**hp)
        bufs = [torch.zeros_like(x) for x in w] if hp["momentum"] else None
    else:
        base, refopt = torch.optim.AdamW(wt, **hp), ref.AdamWRef(**hp)
        m, v = [torch.zeros_like(x) for x in w], [torch.zeros_like(x) for x in w]
    backup = [torch.empty_like(x) for x in w]
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    lr = torch.tensor(hp["lr"], dtype=opm) if tensor_lr else hp["lr"]
    for step in range(1, steps + 1):
        g = _grads(shapes, dtype)
        torch._foreach_copy_(backup, w)
        ops.perturb_(w, g, None, 0.5)  # w differs from backup: the update must start at backup
        if kind == "sgd":
            ops.restore_sgd_(w, backup, g, bufs, lr=lr, momentum=hp["momentum"], dampening=hp["dampening"],
                             weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], init_momentum=step == 1)
        else:
            b1, b2 = hp["betas"]
            ops.restore_adamw_(w, backup, g, m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=hp["eps"],
                               weight_decay=hp["weight_decay"])
        for p, gi in zip(wt, g):
            p.grad = gi.clone()
        base.step()
        wref = refopt.step(wref, ref.f64(g))
    return w, [p.detach() for p in wt], wref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.0, False, 0.0), (0.9, False, 0.1), (0.9, True, 0.0)])
def test_restore_sgd_matches_reference_over_steps(dtype, momentum, nesterov, dampening):
    hp = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=0.01, nesterov=nesterov)
    assert_within_torch_error(*_run("sgd", dtype, ODD_SIZES + MANY[:20], **hp))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_restore_adamw_matches_reference_over_steps(dtype, tensor_lr):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert_within_torch_error(*_run("adamw", dtype, ODD_SIZES + MANY[:20], tensor_lr=tensor_lr, **hp))


def test_workspace_is_reused_not_reallocated():
    shapes = [(100,), (3, 7)]
    w, g = rand_list(shapes, torch.bfloat16), rand_list(shapes, torch.bfloat16)
    ops.perturb_(w, g, None, 0.1)
    ws1 = torch_ops._workspace(w, torch.float32)
    ops.perturb_(w, g, None, 0.1)
    ws2 = torch_ops._workspace(w, torch.float32)
    assert ws1[0].data_ptr() == ws2[0].data_ptr()


def test_empty_list_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        ops.sq_norm([])


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert ops.resolve("auto", cpu) == "torch"
    assert ops.resolve("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        ops.resolve("fast", cpu)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.resolve("cuda", cpu)


# ------------------------------------------------------------------ skipped steps, grad_coef, device step
def _backends():
    out = [("torch", "cpu"), ("torch-device-path", "cpu")]
    if ops.unavailable_reason("triton", torch.device("cpu")) is None:
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        for b in ops.BACKENDS:
            if ops.unavailable_reason(b, torch.device("cuda")) is None:
                out.append((b, "cuda"))
    return out


LOW_AND_FP32 = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def real_backend(monkeypatch):
    """'torch-device-path': the torch backend with the host read of the skip flag switched off,
    so the on-device path (what runs on a GPU) is checked on CPU too."""

    def resolve(name):
        if name == "torch-device-path":
            monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
            return "torch"
        return name

    return resolve
SKIP_SHAPES = [(1,), (7,), (0,), (33, 5), (4099,)]


def _base_call(kind, backend, p, b, g, st, *, init=False, step=3, grad_coef=None, found_inf=None, **hp):
    if kind == "sgd":
        ops.restore_sgd_(p, b, g, st[0] if hp["momentum"] else None, lr=hp["lr"], momentum=hp["momentum"],
                         dampening=0.1, weight_decay=0.01, nesterov=hp["nesterov"], init_momentum=init,
                         grad_coef=grad_coef, found_inf=found_inf, backend=backend)
    else:
        ops.restore_adamw_(p, b, g, st[0], st[1], step=step, lr=hp["lr"], beta1=0.9, beta2=0.99, eps=1e-8,
                           weight_decay=0.05, grad_coef=grad_coef, found_inf=found_inf, backend=backend)


KINDS = [("sgd", dict(lr=0.1, momentum=0.9, nesterov=False)), ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
         ("sgd", dict(lr=0.1, momentum=0.0, nesterov=False)), ("adamw", dict(lr=1e-2))]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", LOW_AND_FP32 + [torch.float64])
@pytest.mark.parametrize("kind,hp", KINDS, ids=["sgd-m", "sgd-nesterov", "sgd-plain", "adamw"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_skipped_step_restores_exactly_and_keeps_state(backend, device, dtype, kind, hp, init, bad, real_backend):
    backend = real_backend(backend)
    if init and kind == "adamw":
        pytest.skip("init_momentum is an SGD flag")
    w0 = rand_list(SKIP_SHAPES, dtype, device)
    w0[1][0] = -0.0  # signed zeros must survive the skip too
    w0[3][0, 0] = 0.0
    p = [x.clone() for x in w0]
    ops.perturb_(p, rand_list(SKIP_SHAPES, dtype, device), None, 0.5, backend=backend)
    g = rand_list(SKIP_SHAPES, dtype, device)
    g[4][17] = float(bad)
    st = [[x.abs() for x in rand_list(SKIP_SHAPES, dtype, device)] for _ in range(2)]
    st0 = [[x.clone() for x in s] for s in st]
    _base_call(kind, backend, p, w0, g, st, init=init, found_inf=torch.tensor(1.0, device=device), **hp)
    assert all(torch.equal(a, c) for a, c in zip(p, w0)), "weights must be the backup, bit for bit"
    assert all(torch.equal(a.view(-1).view(torch.int8) if a.numel() else a, c.view(-1).view(torch.int8) if c.numel() else c)
               for a, c in zip(p, w0)), "signed zeros must be kept"
    if kind == "sgd" and hp["momentum"] and init:
        assert all(torch.equal(a, torch.zeros_like(a)) for a in st[0])
    else:
        for s, s0 in zip(st, st0):
            assert all(torch.equal(a, c) for a, c in zip(s, s0)), "optimizer state must not change"


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", LOW_AND_FP32)
@pytest.mark.parametrize("kind,hp", KINDS, ids=["sgd-m", "sgd-nesterov", "sgd-plain", "adamw"])
def test_found_inf_zero_grad_coef_and_device_step(backend, device, dtype, kind, hp, real_backend):
    """found_inf=0 changes nothing, grad_coef equals pre-scaled gradients, a device step equals the int."""
    backend = real_backend(backend)
    w0 = rand_list(SKIP_SHAPES, dtype, device)
    g = rand_list(SKIP_SHAPES, torch.float32, device)
    st = [[x.abs().to(dtype) for x in rand_list(SKIP_SHAPES, torch.float32, device)] for _ in range(2)]
    outs = []
    for variant in ("plain", "found0", "coef", "devstep"):
        p = [x.clone() for x in w0]
        s = [[x.clone() for x in si] for si in st]
        coef = torch.tensor(0.25, device=device) if variant == "coef" else None
        gg = [(x * 4 if variant == "coef" else x).to(dtype) for x in g]  # 4 * 0.25 == 1 exactly
        step = torch.tensor(3.0, device=device) if variant == "devstep" else 3
        found = torch.tensor(0.0, device=device) if variant == "found0" else None
        _base_call(kind, backend, p, w0, gg, s, step=step, grad_coef=coef, found_inf=found, **hp)
        outs.append(p + s[0] + (s[1] if kind == "adamw" else []))
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 2e-7, rel_err(o, outs[0])


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", LOW_AND_FP32 + [torch.float64])
@pytest.mark.parametrize("tensor_coef", [False, True])
def test_combine_zero_coefficient_drops_nonfinite_term(backend, device, dtype, tensor_coef, real_backend):
    backend = real_backend(backend)
    g = rand_list(SKIP_SHAPES, dtype, device)
    s = rand_list(SKIP_SHAPES, dtype, device)
    g0, s0 = [x.clone() for x in g], [x.clone() for x in s]

    def coef(v):
        return torch.tensor(v, device=device) if tensor_coef else v

    s[4][3] = float("nan")
    ops.combine_(g, s, coef(1.0), coef(0.0), backend=backend)  # keep g, drop saved
    assert all(torch.equal(a, b) for a, b in zip(g, g0))
    g[4][5] = float("inf")
    ops.combine_(g, s0, coef(0.0), coef(1.0), backend=backend)  # drop g, take saved
    assert all(torch.equal(a, b) for a, b in zip(g, s0))


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", LOW_AND_FP32 + [torch.float64])
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_perturb_zero_scale_keeps_weights_whatever_the_gradient(backend, device, dtype, eta, tensor_scale, real_backend):
    backend = real_backend(backend)
    w = rand_list(SKIP_SHAPES, dtype, device)
    w[1][0] = -0.0
    g = rand_list(SKIP_SHAPES, dtype, device)
    g[4][7], g[1][0] = float("inf"), float("nan")
    w0 = [x.clone() for x in w]
    scale = torch.tensor(0.0, device=device) if tensor_scale else 0.0
    ops.perturb_(w, g, None, scale, eta, backend=backend)
    for a, b in zip(w, w0):
        assert torch.equal(a.view(-1).view(torch.int8) if a.numel() else a, b.view(-1).view(torch.int8) if b.numel() else b)


# ------------------------------------------------------------------ CPU tiles and out= ops
# Lists big enough to be cut: one tensor spans many tiles, small ones share a tile.
TILE_SHAPES = ODD_SIZES + [(70001,), (129, 257)] + MANY[:30]


@pytest.fixture(params=[37, 4096], ids=["tile37", "tile4096"])
def small_tiles(request, monkeypatch):
    """CPU tiles cut small and most tensors on restore_sgd_'s per-tensor out= path."""
    monkeypatch.setattr(torch_ops, "CPU_TILE", request.param)
    monkeypatch.setattr(torch_ops, "CPU_OUT_MIN", 64)
    return request.param


def _all_primitives(dtype, shapes, seed=5):
    """Runs every primitive once on fresh data; returns every output and updated tensor."""
    torch.manual_seed(seed)
    x, y, w = rand_list(shapes, dtype), rand_list(shapes, dtype), rand_list(shapes, dtype)
    mask = [torch.rand(s) > 0.5 for s in shapes]
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    out = {"x": x, "y": y, "w": w, "mask": mask}
    out["sq"] = ops.sq_norm(x, per_tensor=True)
    out["sq_w"] = ops.sq_norm(x, w, 0.01, per_tensor=True)
    out["sq_w0"] = ops.sq_norm(x, w, 0.0, per_tensor=True)
    out["dot"] = ops.dot_norms(x, y)
    pert = {}
    for eta in (None, 0.0, 0.01):
        for m in (None, mask):
            for scale in (0.37, torch.tensor(0.37, dtype=opm)):
                p, b = [t.clone() for t in w], [torch.empty_like(t) for t in w]
                ops.perturb_(p, x, b, scale, eta, m)
                key = (eta, m is not None, isinstance(scale, torch.Tensor))
                pert[key] = (p, b)
    out["perturb"] = pert
    comb = {}
    for c1, c2 in ((0.7, -1.3), (torch.tensor(0.7, dtype=opm), torch.tensor(-1.3, dtype=opm))):
        g = [t.clone() for t in x]
        ops.combine_(g, y, c1, c2)
        comb[isinstance(c1, torch.Tensor)] = g
    out["combine"] = comb
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tiles_every_primitive_matches_reference(small_tiles, dtype):
    tiles = torch_ops._tiles([rand_list(TILE_SHAPES, dtype)])
    assert tiles is not None and len(tiles) > 1  # really cut
    out = _all_primitives(dtype, TILE_SHAPES)
    x, y, w = out["x"], out["y"], out["w"]
    for key, (ws, eta) in {"sq": (None, 0.0), "sq_w": (w, 0.01), "sq_w0": (w, 0.0)}.items():
        rt, rp = ref.sq_norm(x, ws, eta, per_tensor=True)
        assert rel_err(out[key][0], rt) < TOL[dtype] and rel_err(out[key][1], rp) < TOL[dtype], key
    assert rel_err(out["dot"], ref.dot_norms(x, y)) < TOL[dtype]
    for (eta, masked, _), (p, b) in out["perturb"].items():
        assert all(torch.equal(bb, ww) for bb, ww in zip(b, w))  # backup exact
        want = ref.perturb(w, x, 0.37, eta, out["mask"] if masked else None)
        assert rel_err(p, want) < TOL[dtype], (eta, masked)
    for _, g in out["combine"].items():
        assert rel_err(g, ref.combine(x, y, 0.7, -1.3)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tiles_change_no_elementwise_result(monkeypatch, dtype):
    """Elementwise results with small tiles are the bits of the untiled run in fp32/fp64 (reductions
    only change their summation order). In bf16/fp16, torch's own add-with-alpha rounds alpha to
    the dtype in its scalar tail loop but not in its vector loop, so elements that a tile boundary
    moves from one loop to the other may change: there the two runs agree within the dtype's
    tolerance against float64 (the reference test above bounds each)."""
    untiled = _all_primitives(dtype, TILE_SHAPES)
    monkeypatch.setattr(torch_ops, "CPU_TILE", 37)
    tiled = _all_primitives(dtype, TILE_SHAPES)

    def same(a, b, key):
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(a, b), key
        else:
            assert rel_err(b, a) < TOL[dtype], key

    for key in untiled["perturb"]:
        for a, b in zip(untiled["perturb"][key][0], tiled["perturb"][key][0]):
            same(a, b, key)
    for key in untiled["combine"]:
        for a, b in zip(untiled["combine"][key], tiled["combine"][key]):
            same(a, b, key)
    for key in ("sq", "sq_w", "sq_w0", "dot"):
        a, b = untiled[key], tiled[key]
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        # bf16 norms use torch's bf16 kernel: each piece's norm is rounded to bf16
        tol = {torch.float64: 1e-12, torch.bfloat16: TOL[torch.bfloat16]}.get(dtype, 1e-5)
        assert rel_err(b, a) < tol, key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hp",
    [
        dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
        dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
        dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True),
        dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False),
    ],
    ids=["momentum", "dampening+wd", "nesterov+wd", "plain+wd"],
)
def test_cpu_tiles_and_out_ops_base_steps_match_reference(small_tiles, dtype, hp):
    assert_within_torch_error(*_run("sgd", dtype, TILE_SHAPES, **hp))
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert_within_torch_error(*_run("adamw", dtype, TILE_SHAPES, **hp))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sq_norm_of_a_large_low_precision_gradient_stays_finite(dtype):
    """A norm past fp16's 65504 (every element finite) must not read as inf: that would skip
    every step as non-finite."""
    xs = [torch.full((5000,), 1000.0, dtype=dtype), torch.full((7,), -3.0, dtype=dtype)]
    total = ops.sq_norm(xs)
    assert torch.isfinite(total)
    assert rel_err(total, ref.sq_norm(xs)) < TOL[dtype]


# ------------------------------------------------------------------ non-contiguous tensors in tiles
def _noncontig(shapes_and_kinds, dtype, seed):
    """Non-contiguous tensors (channels_last, transposed, a strided slice) and contiguous copies
    of the same values."""
    torch.manual_seed(seed)
    out, dense = [], []
    for shape, kind in shapes_and_kinds:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        if kind == "cl":
            y = x.contiguous(memory_format=torch.channels_last)
        elif kind == "t":
            y = x.t().contiguous().t()  # same values, transposed strides
        elif kind == "slice":
            y = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)[:, ::2]
            y.copy_(x)
        else:
            y = x.clone()
        out.append(y)
        dense.append(x.contiguous())
    return out, dense


NONCONTIG = [((9, 5, 3, 3), "cl"), ((40, 300), "t"), ((7,), "c"), ((6, 70), "slice"), ((2, 3, 50, 3), "cl"), ((0, 4), "t")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [37, 4096, 1 << 18])
def test_noncontiguous_tensors_are_tiled_along_their_dims(monkeypatch, dtype, tile):
    """A non-contiguous tensor larger than a tile is cut along its leading dims (a row larger than
    the tile along the next dims): every elementwise result equals the run on contiguous copies of
    the same values bit for bit, and reductions match the float64 reference."""
    monkeypatch.setattr(torch_ops, "CPU_TILE", tile)
    monkeypatch.setattr(torch_ops, "CPU_OUT_MIN", 64)
    x, xd = _noncontig(NONCONTIG, dtype, 1)
    y, yd = _noncontig(NONCONTIG, dtype, 2)
    w, wd = _noncontig(NONCONTIG, dtype, 3)
    assert not all(t.is_contiguous() for t in x)
    opm = torch.float64 if dtype == torch.float64 else torch.float32
    for args in [(None, 0.0), (w, 0.01)]:
        total, per = ops.sq_norm(x, args[0], args[1], per_tensor=True)
        rt, rp = ref.sq_norm(x, args[0], args[1], per_tensor=True)
        assert rel_err(total, rt) < TOL[dtype] and rel_err(per, rp) < TOL[dtype]
    assert rel_err(ops.dot_norms(x, y), ref.dot_norms(x, y)) < TOL[dtype]

    def same(a, b):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), first_mismatch([u.contiguous() for u in a], b)

    for eta in (None, 0.0, 0.01):
        for scale in (0.37, torch.tensor(0.37, dtype=opm)):
            p, pd = [t.clone() for t in w], [t.clone() for t in wd]
            b, bd = [torch.empty_like(t) for t in w], [torch.empty_like(t) for t in wd]
            ops.perturb_(p, x, b, scale, eta)
            ops.perturb_(pd, xd, bd, scale, eta)
            same(p, pd)
            same(b, w)
    for c1, c2 in ((0.7, -1.3), (torch.tensor(0.7, dtype=opm), torch.tensor(-1.3, dtype=opm))):
        g, gd = [t.clone() for t in x], [t.clone() for t in xd]
        ops.combine_(g, y, c1, c2)
        ops.combine_(gd, yd, c1, c2)
        same(g, gd)
    for nesterov in (False, True):
        p, pd = [t.clone() for t in w], [t.clone() for t in wd]
        buf, bufd = [t.clone() for t in y], [t.clone() for t in yd]
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=nesterov, init_momentum=False)
        ops.restore_sgd_(p, w, x, buf, **kw)
        ops.restore_sgd_(pd, wd, xd, bufd, **kw)
        same(p, pd)
        same(buf, bufd)
    p, pd = [t.clone() for t in w], [t.clone() for t in wd]
    m, md = [t.clone() for t in y], [t.clone() for t in yd]
    v, vd = [t.abs() for t in x], [t.abs() for t in xd]
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    ops.restore_adamw_(p, w, y, m, v, **kw)
    ops.restore_adamw_(pd, wd, yd, md, vd, **kw)
    same(p, pd)
    same(m, md)
    same(v, vd)


# ------------------------------------------------------------------ bf16/fp16: scalars stay in float32
def _bounded(n, norm, seed):
    """n elements of magnitude within 3x of each other with the given L2 norm (no fp16 overflow)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).sign() * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    return x / x.norm() * norm


LOW_TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}  # a few units of the dtype's rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gnorm", [3.2e5, 1e7])
@pytest.mark.parametrize("algo", ["SAM", "ASAM", "SSAM"])
def test_low_precision_perturbation_radius_at_large_gradient_norms(dtype, gnorm, algo):
    """rho/||g|| is far below fp16's smallest normal (6e-5) here: the perturbation must still have
    radius rho (the scale taken in float32, w + scale*g rounded once). Weights are tiny, so the
    rounding of w + e is that of e: the radius is right to the dtype's relative rounding."""
    import sharpfused as sf

    n, rho, eta = 65536, 0.05, 1.0  # ASAM: T = |w| + eta ~ 1, so that e_i ~ 2e-4 is an fp16 normal
    g64 = _bounded(n, gnorm, 0)
    w0 = (torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-5).to(dtype)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g64.to(dtype)
    assert torch.isfinite(p.grad).all()
    if algo == "SSAM":
        opt = sf.SSAM([p], torch.optim.SGD, lr=0.1, rho=rho, sparsity=0.5, backend="torch")
    else:
        opt = sf.SAM([p], torch.optim.SGD, lr=0.1, rho=rho, adaptive=algo == "ASAM", eta=eta, backend="torch")
    opt.first_step()
    e = p.detach().double() - w0.double()
    g = p.grad.double()
    w = w0.double()
    if algo == "ASAM":
        t = w.abs() + eta
        want = rho * t * t * g / ((t * g).norm() + 1e-12)
        radius, want_radius = (e / t).norm(), rho
    elif algo == "SSAM":
        mask = opt.state[p]["mask"].double()
        assert 0 < mask.sum() < n
        want = rho * mask * g / (g.norm() + 1e-12)
        radius, want_radius = e.norm(), want.norm()
    else:
        want = rho * g / (g.norm() + 1e-12)
        radius, want_radius = e.norm(), rho
    assert abs(float(radius) / float(want_radius) - 1) < LOW_TOL[dtype], (float(radius), float(want_radius))
    assert rel_err(e, want) < LOW_TOL[dtype]
    opt.second_step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tensor_scale", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_low_precision_tiny_perturb_scale(dtype, tensor_scale, masked):
    """perturb_ with a scale fp16 cannot hold (1e-8 is below its smallest subnormal, 6e-8): w + s*g
    is computed with s in float32 and rounded once (w = 0 here, so w + e is e rounded once)."""
    shapes = [(4099,), (33, 5), (70001,)]
    g = [((torch.rand(s, dtype=torch.float64) + 0.2) * 5e4 * torch.randn(s).sign()).to(dtype) for s in shapes]
    w = [torch.zeros(s, dtype=dtype) for s in shapes]
    mask = [torch.rand(s) > 0.5 for s in shapes] if masked else None
    scale = 1e-8
    p = [x.clone() for x in w]
    ops.perturb_(p, g, None, torch.tensor(scale) if tensor_scale else scale, None, mask)
    assert rel_err(p, ref.perturb(w, g, scale, None, mask)) < LOW_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tensor_coef", [False, True])
@pytest.mark.parametrize(
    "c1,c2,gs,ss", [(1e-8, 1e-4, 1e4, 1.0), (7e4, -1e-8, 1e-4, 1e4), (1e-8, 1e-8, 1e4, 1e4)],
    ids=["tiny-c1", "huge-c1", "tiny-both"],
)
def test_low_precision_combine_tiny_and_huge_coefficients(dtype, tensor_coef, c1, c2, gs, ss):
    """c1*g + c2*saved with coefficients bf16/fp16 cannot hold (1e-8; 7e4 > fp16's 65504), in float32."""
    shapes = [(4099,), (70001,)]
    g = [((torch.rand(s, dtype=torch.float64) + 0.5) * gs).to(dtype) for s in shapes]
    sv = [((torch.rand(s, dtype=torch.float64) + 0.5) * ss).to(dtype) for s in shapes]
    want = ref.combine(g, sv, c1, c2)
    a, b = (torch.tensor(c1), torch.tensor(c2)) if tensor_coef else (c1, c2)
    ops.combine_(g, sv, a, b)
    assert rel_err(g, want) < LOW_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_low_precision_sgd_tiny_lr(monkeypatch, dtype, device_path, nesterov, dampening):
    """lr = 1e-7 is not an fp16 number (it would round to 1.19e-7): the step must use it unrounded,
    on the CPU per-tensor path (large and small tensors) and on the device path."""
    if device_path:
        monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
    shapes = [(70001,), (33, 5), (300, 1000)]
    b = [((torch.rand(s, dtype=torch.float64) - 0.5) * 1e-5).to(dtype) for s in shapes]
    g = [((torch.rand(s, dtype=torch.float64) + 0.5) * 1e3).to(dtype) for s in shapes]
    buf = [(x.double() * 0.5).to(dtype) for x in g]
    buf0 = [x.double() for x in buf]
    hp = dict(lr=1e-7, momentum=0.9, dampening=dampening, weight_decay=1e-4, nesterov=nesterov)
    p = [x.clone() for x in b]
    ops.restore_sgd_(p, b, g, buf, init_momentum=False, found_inf=torch.tensor(0.0) if device_path else None, **hp)
    # float64: d = g + wd*b; buf = 0.9 buf + (1-damp) d; step = d + 0.9 buf (nesterov) or buf
    d = [x.double() + 1e-4 * y.double() for x, y in zip(g, b)]
    bf = [0.9 * x + (1 - dampening) * y for x, y in zip(buf0, d)]
    step = [y + 0.9 * z for y, z in zip(d, bf)] if nesterov else bf
    w = [y.double() - 1e-7 * z for y, z in zip(b, step)]
    assert rel_err(buf, bf) < LOW_TOL[dtype]
    assert rel_err(p, w) < LOW_TOL[dtype]


# ------------------------------------------------------------------ bf16/fp16 AdamW: math in fp32, one rounding
def _adamw_run(backend, dtype, w0, grads, hp):
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    out = []
    for t, g in enumerate(grads, 1):
        b = w.clone()
        ops.perturb_([w], [g], None, 0.5, backend=backend)  # the update must start at the backup
        ops.restore_adamw_([w], [b], [g], [m], [v], step=t, backend=backend, **hp)
        out.append((w.clone(), m.clone(), v.clone()))
    return out


def _spacing(x: torch.Tensor) -> torch.Tensor:
    """The dtype's spacing at each element of x (x in bf16/fp16), as float64."""
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    return (up.double() - x.double()).abs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_adamw_small_gradients(dtype):
    """g ~ 1e-4: g^2 (1e-8) times 1-beta2 underflows fp16, so the stored exp_avg_sq is 0; the update
    must use this step's float32 v (as the kernels do), not v rounded: w then moves by about lr,
    matching torch.optim.AdamW on float32 copies to the dtype's rounding (it moved by ~60 with
    the rounded v: m/eps)."""
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4099, generator=gen).to(dtype)
    # each element's gradient keeps its sign over the steps: m does not cancel, where the torch
    # backend's b1*m + (1-b1)*g and the kernels' lerp could round a near-zero m apart, which
    # fp16's tiny denominators (v stored as 0) would magnify into visible steps
    sign = torch.randn(4099, generator=gen).sign()
    grads = [(sign * (0.5 + torch.rand(4099, generator=gen)) * 1e-4).to(dtype) for _ in range(3)]
    ours = _adamw_run("torch", dtype, w0, grads, hp)
    p32 = torch.nn.Parameter(w0.float())
    opt = torch.optim.AdamW([p32], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    p32.grad = grads[0].float()
    opt.step()
    w1, m1, v1 = ours[0]
    assert (w1.double() - w0.double()).abs().median() < 2 * hp["lr"]
    # one rounding of the float32 result: within one spacing of the dtype
    assert ((w1.double() - p32.detach().double()).abs() <= _spacing(w1)).all()
    st = opt.state[p32]  # the state as torch.optim keeps it: the float32 values rounded to the dtype
    for ours_st, theirs in ((m1, st["exp_avg"]), (v1, st["exp_avg_sq"])):
        assert ours_st.dtype == dtype
        assert ((ours_st.double() - theirs.double()).abs() <= _spacing(ours_st)).all()
    if dtype == torch.float16:
        assert (v1 == 0).all()  # the case of the issue: every stored v underflowed
    if ops.unavailable_reason("triton", torch.device("cpu")) is None:
        theirs = _adamw_run("triton", dtype, w0, grads, hp)
        for (a, am, av), (b, bm, bv) in zip(ours, theirs):
            assert ((a.double() - b.double()).abs() <= 2 * _spacing(a)).all()
            assert ((am.double() - bm.double()).abs() <= 2 * _spacing(am)).all()
            assert ((av.double() - bv.double()).abs() <= 2 * _spacing(av)).all()
