"""Every primitive on every registered backend available here, in every dtype, against a float64
reference: the tests are by primitive, the backends come from ``ops.REGISTRY``, so a new backend
is tested by registering it. A primitive added to the spec without a case here fails
``test_every_primitive_has_a_case``.

References: tests/reference.py's float64 primitives; for the fused base steps, torch.optim's own
optimizer run in float64 from the same state (the strongest statement of "equal to the unfused
path"). Tolerance (the design's rule, tests/helpers.py): float64 and float32 results within a few
roundings of the reference; bf16/fp16 at most 2x the torch backend's own error.
"""

from __future__ import annotations

import math

import pytest
import torch

from sharpfused import ops
from sharpfused.backends.torch_ops import inverse_norm_scale
from sharpfused.spec import NORM_EPS, SPECS

from . import reference as R
from .helpers import ODD_SIZES, assert_within_torch_error, rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # "cuda" cases are marked gpu (conftest)
HERE = [(d, b) for d in DEVICES for b in ops.BACKENDS if ops.unavailable_reason(b, torch.device(d)) is None]
DEVICE = "cpu"  # set per test (_on)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def lists(k, dtype, positive=()):
    out = []
    for i in range(k):
        xs = [torch.randn(s, dtype=torch.float64) for s in ODD_SIZES]
        if i in positive:
            xs = [x.abs() + 0.1 for x in xs]
        out.append([x.to(dtype).to(DEVICE) for x in xs])
    return out


def clone(x):
    if isinstance(x, list):
        return [t.clone() for t in x]
    return x


# ------------------------------------------------------------------ the fused steps' references
def torch_optim_step(cls, hyper, w0, g, state, coef=1.0):
    """One step of torch.optim ``cls`` in float64 from backup ``w0`` with gradient ``coef*g`` and the
    given per-parameter state; returns (new weights, new state)."""
    ps = [torch.nn.Parameter(w.double().cpu().clone()) for w in w0]
    opt = cls(ps, **hyper)
    for p, gi, st in zip(ps, g, state):
        p.grad = gi.double().cpu() * coef
        if st:
            opt.state[p] = {k: (v.double().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    opt.step()
    return [p.detach() for p in ps], [opt.state[p] for p in ps]


def case_restore_sgd(dtype):
    w, b, g, buf = lists(4, dtype)
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    args = (w, b, g, buf, 0.1, 0.9, 0.1, 0.01, False, False, 0.5, None)
    want_w, st = torch_optim_step(torch.optim.SGD, hyper, b, g, [{"momentum_buffer": x} for x in buf], 0.5)
    return args, {0: want_w, 3: [s["momentum_buffer"] for s in st]}


def case_restore_adam(dtype, decoupled):
    w, b, g, m = lists(4, dtype)
    (v,) = lists(1, dtype, positive=(0,))
    step = 3
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    state = [{"step": torch.tensor(float(step - 1)), "exp_avg": mi, "exp_avg_sq": vi} for mi, vi in zip(m, v)]
    want_w, st = torch_optim_step(cls, hyper, b, g, state)
    args = [w, b, g, m, v, step, 1e-2, 0.9, 0.99, 1e-8, 0.1, None, None]
    names = SPECS["restore_adamw_"].names
    if "decoupled" in names:
        args.insert(names.index("decoupled"), decoupled)
    elif not decoupled:
        pytest.skip("restore_adamw_ has no decoupled argument in this tree")
    return tuple(args), {0: want_w, 3: [s["exp_avg"] for s in st], 4: [s["exp_avg_sq"] for s in st]}


def case_restore_rmsprop(dtype):
    w, b, g, buf = lists(4, dtype)
    (v,) = lists(1, dtype, positive=(0,))
    hyper = dict(lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.01, momentum=0.8)
    state = [{"step": torch.tensor(2.0), "square_avg": vi, "momentum_buffer": bi} for vi, bi in zip(v, buf)]
    want_w, st = torch_optim_step(torch.optim.RMSprop, hyper, b, g, state)
    args = (w, b, g, v, buf, 1e-2, 0.9, 1e-8, 0.01, 0.8, None, None)
    return args, {0: want_w, 3: [s["square_avg"] for s in st], 4: [s["momentum_buffer"] for s in st]}


# ------------------------------------------------------------------ the cases: args (spec order), expected
def case(name, dtype):
    """(args in the spec's order, {position of a written list or "out": float64 reference})."""
    if name == "sq_norm":
        x, wt = lists(2, dtype)
        return (x, wt, 0.1, True), {"out": R.sq_norm(x, wt, 0.1, True)}
    if name == "perturb_":
        w, g, b = lists(3, dtype)
        scale = torch.tensor(0.3, device=DEVICE)  # a float32 device scalar, as the optimizers pass
        return (w, g, b, scale, 0.01, None), {0: R.perturb(w, g, scale, 0.01), 2: R.f64(w)}
    if name == "restore_":
        w, b = lists(2, dtype)
        return (w, b), {0: R.f64(b)}
    if name == "dot_norms":
        a, b = lists(2, dtype)
        return (a, b), {"out": R.dot_norms(a, b)}
    if name == "combine_":
        g, s = lists(2, dtype)
        c2 = torch.tensor(-0.2, device=DEVICE)
        return (g, s, 0.7, c2), {0: R.combine(g, s, 0.7, c2)}
    if name == "restore_sgd_":
        return case_restore_sgd(dtype)
    if name == "restore_adamw_":
        return case_restore_adam(dtype, decoupled=True)
    if name == "restore_rmsprop_":
        return case_restore_rmsprop(dtype)
    raise KeyError(name)


def case_perturb_norm_sq(dtype):
    """perturb_ scaled by rho / (sqrt(norm_sq) + eps), the inverse norm computed by the kernel."""
    w, g, b = lists(3, dtype)
    sq = torch.tensor(2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    scale = 0.3 / (2.5**0.5 + NORM_EPS)
    return (w, g, b, 0.3, 0.01, None, sq), {0: R.perturb(w, g, scale, 0.01), 2: R.f64(w)}


EXTRA = {
    "restore_adam_l2": ("restore_adamw_", lambda dtype: case_restore_adam(dtype, decoupled=False)),
    "perturb_norm_sq": ("perturb_", case_perturb_norm_sq),
}


def test_every_primitive_has_a_case():
    for name in SPECS:
        case(name, torch.float32)  # KeyError for a primitive without one


def _outputs(result, args, want):
    out = []
    for k in want:
        if k == "out":
            out += list(result) if isinstance(result, tuple) else [result]
        else:
            out += list(args[k])
    return out


@pytest.fixture
def _on(device, monkeypatch):
    monkeypatch.setattr(__import__(__name__, fromlist=["DEVICE"]), "DEVICE", device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*SPECS, *EXTRA])
@pytest.mark.parametrize("device,backend", HERE)
def test_primitive_against_float64(device, backend, name, dtype, _on):
    torch.manual_seed(sum(map(ord, name)) + DTYPES.index(dtype))
    prim, make = EXTRA.get(name, (name, lambda d: case(name, d)))
    args, want = make(dtype)
    ref = []
    for v in want.values():
        ref += list(v) if isinstance(v, (list, tuple)) else [v]
    torch_args = tuple(clone(a) for a in args)
    got = _outputs(getattr(ops.on(backend), prim)(*args), args, want)
    torch_got = _outputs(getattr(ops.on("torch"), prim)(*torch_args), torch_args, want)
    what = f"{prim} on {backend} ({dtype})"
    if dtype in TOL:
        assert rel_err(got, ref) < TOL[dtype], what
    else:
        assert_within_torch_error(got, torch_got, ref, what=what)


@pytest.mark.parametrize("device,backend", HERE)
@pytest.mark.parametrize("name", ["restore_sgd_", "restore_adamw_", "restore_rmsprop_"])
def test_fused_step_skipped_on_the_device(device, backend, name, _on):
    """found_inf nonzero: w = backup bit for bit, the state lists keep their bits (inf gradients)."""
    if name not in SPECS:
        pytest.skip(f"{name} is not in this tree's spec")
    args, want = case(name, torch.float32)
    args = list(args)
    p = SPECS[name]
    for t in args[p.names.index("grads")]:
        t.fill_(float("inf"))
    args[p.names.index("found_inf")] = torch.tensor(1.0, device=DEVICE)
    states = [k for k in want if k not in ("out", 0)]
    before = {k: clone(args[k]) for k in states}
    getattr(ops.on(backend), name)(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[0], args[1]))
    for k in states:
        assert all(torch.equal(a, b) for a, b in zip(args[k], before[k])), f"{name}: state list {k} moved"


@pytest.mark.parametrize("device,backend", HERE)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("sq", [2.5, 1e-30, 0.0, float("inf"), float("nan")])
def test_perturb_norm_sq_is_the_torch_scale_bit_for_bit(device, backend, dtype, sq, _on):
    """The kernel's rho / (sqrt(norm_sq) + eps) (0 when not finite) gives the very bits of the
    scale computed by torch ops and passed as a device tensor; a non-finite norm leaves w's bits
    whatever the gradients hold (the step will be skipped)."""
    torch.manual_seed(7)
    w, g, b = lists(3, dtype)
    if sq != sq or sq == float("inf"):
        g[0].view(-1)[0] = float("inf")
        g[-1].view(-1)[-1] = float("nan")
    nsq = torch.tensor(sq, dtype=torch.float32, device=DEVICE)
    w2, b2 = clone(w), clone(b)
    K = ops.on(backend)
    K.perturb_(w, g, b, 0.05, None, None, nsq)
    K.perturb_(w2, g, b2, inverse_norm_scale(0.05, nsq), None, None)
    assert all(torch.equal(x, y) for x, y in zip(w, w2)), f"{backend} {dtype} sq={sq}"
    assert all(torch.equal(x, y) for x, y in zip(b, b2))
    if not sq < float("inf"):
        assert all(torch.equal(x, y) for x, y in zip(w, b)), "a non-finite norm must leave w as it was"


@pytest.mark.parametrize("device,backend", HERE)
def test_perturb_norm_sq_rounding_and_dtypes(device, backend, _on):
    """The inverse norm is correctly rounded in opmath on every backend (torch's own CPU sqrt is
    not: the case an outside trial found, and 300 random norms, give the same bits on torch and
    here); a float16, float64 or integer norm_sq is read in the parameters' opmath (float32)."""
    torch.manual_seed(3)
    norms = [0.0997066572, 0.0, 40.0] + (torch.rand(300, dtype=torch.float64) * 10).tolist()
    for v in norms:
        for dt in (torch.float32, torch.float16, torch.float64, torch.int64):
            if dt == torch.int64 and v != int(v):
                continue
            nsq = torch.tensor(v, dtype=dt, device=DEVICE)
            n32 = nsq.to(torch.float32).double()  # what the kernels read: the value in float32
            root = float(torch.tensor(math.sqrt(float(n32))).float())  # sqrt rounded once to float32
            want = torch.tensor(1.0 / (root + float(torch.tensor(NORM_EPS).float())), dtype=torch.float64).float()
            w, g = [torch.zeros(3, device=DEVICE)], [torch.ones(3, device=DEVICE)]
            ops.on(backend).perturb_(w, g, None, 1.0, None, None, nsq)
            assert torch.equal(w[0], want.expand(3).to(DEVICE)), (backend, v, dt, w[0][0].item(), want.item())
        if v > 1.0:
            break  # the dtype loop once on a large value; the random norms below in float32 only
    for v in norms[3:]:
        nsq = torch.tensor(v, dtype=torch.float32, device=DEVICE)
        got = [torch.zeros(2, device=DEVICE)]
        ref = [torch.zeros(2, device=DEVICE)]
        ops.on(backend).perturb_(got, [torch.ones(2, device=DEVICE)], None, 0.05, None, None, nsq)
        ops.on("torch").perturb_(ref, [torch.ones(2, device=DEVICE)], None, 0.05, None, None, nsq)
        assert torch.equal(got[0], ref[0]), (backend, v)
