"""GSAM, BiSAM, XSAM, SAMPa, BSAM, SSAM, LookSAM, FriendlySAM: float64 references, identities, resume, errors."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sharpfused
from sharpfused import BSAM, ESAM, GSAM, SAM, SSAM, XSAM, BiSAM, FriendlySAM, LookSAM, SAMPa
from sharpfused.losses import bisam_lower_bound

from . import reference as ref
from .helpers import TRITON_DEVICES, rel_err

STEPS = 8


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 13), nn.Tanh(), nn.Linear(13, 5)).to(dtype)


def batches(n=STEPS, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 10, generator=g).to(dtype), torch.randint(0, 5, (24,), generator=g)) for _ in range(n)]


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


def lower_bound(model, x, y):
    return bisam_lower_bound(model(x), y, backend="torch")


def grad_fn_for(model, x, y, loss=ce):
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]

    def grad_fn(params):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        out = functional_call(model, dict(zip(names, ps)), (x,))
        value = F.cross_entropy(out, y) if loss is ce else bisam_lower_bound(out, y, backend="torch")
        return list(torch.autograd.grad(value, ps))

    return grad_fn


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), ref.SGDRef),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), ref.AdamWRef),
}


def lr_at(t, lr0):
    return lr0 * (1.0 - t / 10)  # the LambdaLR schedule the GSAM case runs


# name -> (constructor kwargs, reference step(params, x, y, model, refbase, state, t))
CASES = {
    "gsam": (
        dict(rho_max=0.08, rho_min=0.02, alpha=0.3),
        lambda p, x, y, m, rb, st, t: ref.gsam_step(
            p, grad_fn_for(m, x, y), rb, rho=ref.gsam_rho(rb.lr, 0.08, 0.02, st["lr0"], 0.0), alpha=0.3
        ),
    ),
    "gsam-adaptive": (
        dict(rho_max=0.5, rho_min=0.2, alpha=0.3, adaptive=True),
        lambda p, x, y, m, rb, st, t: ref.gsam_step(
            p, grad_fn_for(m, x, y), rb, rho=ref.gsam_rho(rb.lr, 0.5, 0.2, st["lr0"], 0.0), alpha=0.3, adaptive=True
        ),
    ),
    "bisam": (
        dict(rho=0.05),
        lambda p, x, y, m, rb, st, t: ref.bisam_step(
            p, grad_fn_for(m, x, y, lower_bound), grad_fn_for(m, x, y), rb, rho=0.05
        ),
    ),
    "xsam": (
        dict(rho=0.15, alpha=0.6),
        lambda p, x, y, m, rb, st, t: ref.xsam_step(p, grad_fn_for(m, x, y), rb, rho=0.15, alpha=0.6),
    ),
    "xsam-k3": (
        dict(rho=0.15, alpha=1.4, steps=3),
        lambda p, x, y, m, rb, st, t: ref.xsam_step(p, grad_fn_for(m, x, y), rb, rho=0.15, alpha=1.4, steps=3),
    ),
    "sampa": (
        dict(rho=0.1, lam=0.2),
        lambda p, x, y, m, rb, st, t: ref.sampa_step(p, grad_fn_for(m, x, y), rb, st, rho=0.1, lam=0.2, lr=rb.lr),
    ),
    "bsam": (
        dict(rho_max=0.05, rho_min=0.03),
        lambda p, x, y, m, rb, st, t: ref.bsam_step(p, grad_fn_for(m, x, y), rb, 0.05, 0.03),
    ),
    "ssam": (
        dict(rho=0.05, sparsity=0.6, mask_every=3),
        lambda p, x, y, m, rb, st, t: ref.ssam_step(p, grad_fn_for(m, x, y), rb, st, 0.05, 0.6, 3),
    ),
    "looksam": (
        dict(rho=0.05, k=3, beta=0.7),
        lambda p, x, y, m, rb, st, t: ref.looksam_step(p, grad_fn_for(m, x, y), rb, st, 0.05, 0.7, 3),
    ),
    "friendly": (
        dict(rho=0.05, sigma=1.0, lam=0.9),
        lambda p, x, y, m, rb, st, t: ref.friendly_sam_step(p, grad_fn_for(m, x, y), rb, st, 0.05, 1.0, 0.9),
    ),
    "esam": (  # SWP only (step(closure) runs the full batch); SDS: tests/test_esam_mesa.py
        dict(rho=0.05, beta=0.6, seed=7),
        lambda p, x, y, m, rb, st, t: ref.esam_step(
            p, grad_fn_for(m, x, y), rb, 0.05, 0.6, ref.esam_masks([q.shape for q in p], 0.6, 7, t)
        ),
    ),
}
CLASSES = {"gsam": GSAM, "gsam-adaptive": GSAM, "bisam": BiSAM, "xsam": XSAM, "xsam-k3": XSAM, "sampa": SAMPa, "bsam": BSAM,
           "ssam": SSAM, "looksam": LookSAM, "friendly": FriendlySAM}
CLASSES["esam"] = ESAM

# the cheap-sharpness variants (tests/test_cheap_sharpness.py has their own tests too)
CASES["rst"] = (
    dict(rho=0.05, p=0.5, seed=3),  # a plain 3rd and 8th step
    lambda p, x, y, m, rb, st, t: ref.rst_step(p, grad_fn_for(m, x, y), rb, t, seed=3, rho=0.05, p=0.5)[0],
)
CASES["aesam"] = (
    dict(rho=0.05, delta=0.5, c=-0.5),  # SAM steps but the 6th and 8th
    lambda p, x, y, m, rb, st, t: ref.aesam_step(p, grad_fn_for(m, x, y), rb, st, rho=0.05, delta=0.5, c=-0.5),
)
CLASSES.update(rst=sharpfused.RST, aesam=sharpfused.AESAM)


def closure_for(name, model, x, y):
    if name == "bisam":

        def closure(perturbation):
            loss = (lower_bound if perturbation else ce)(model, x, y)
            loss.backward()
            return loss

        return closure

    def closure():
        loss = ce(model, x, y)
        loss.backward()
        return loss

    return closure


def build(name, model, base, backend="torch", **over):
    cls, kw, _ = BASES[base]
    return CLASSES[name](model.parameters(), cls, backend=backend, **{**CASES[name][0], **over}, **kw)


def run(name, model, opt, data, sched=None):
    for x, y in data:
        opt.step(closure_for(name, model, x, y))
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, base):
    model, data = mlp(), batches()
    params = [p.detach().clone() for p in model.parameters()]
    ref_model = copy.deepcopy(model)
    opt = build(name, model, base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 10) if name.startswith("gsam") else None
    run(name, model, opt, data, sched)
    cls, kw, refcls = BASES[base]
    refbase, state = refcls(**kw), {"lr0": kw["lr"]}
    for t, (x, y) in enumerate(data):
        refbase.lr = lr_at(t, kw["lr"]) if name.startswith("gsam") else kw["lr"]
        params = CASES[name][1](params, x, y, ref_model, refbase, state, t)
    err = rel_err(list(model.parameters()), params)
    assert err < 1e-9, f"{name}/{base}: relative error {err:.3g} vs the float64 reference"


def test_float32_close_to_float64_reference():
    """The float32 path (the common case) agrees with the float64 reference to float32 accuracy."""
    model, data = mlp(torch.float32), batches(dtype=torch.float32)
    ref_model = mlp(torch.float64)
    params = [p.detach().clone() for p in ref_model.parameters()]
    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.5, lr=0.1, momentum=0.9, backend="torch")
    run("gsam", model, opt, data)
    refbase = ref.SGDRef(lr=0.1, momentum=0.9)
    for x, y in data:
        params = ref.gsam_step(params, grad_fn_for(ref_model, x.double(), y), refbase, rho=0.05, alpha=0.5)
    assert rel_err(list(model.parameters()), params) < 1e-5


# ------------------------------------------------------------------ identities
def sam_run(model, data, base, rho=0.05, **kw):
    cls, bkw, _ = BASES[base]
    opt = SAM(model.parameters(), cls, rho=rho, backend="torch", **bkw)
    run("sam", model, opt, data)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize(
    "name,kw,exact",
    [
        ("gsam", dict(rho_max=0.05, alpha=0.0), True),
        ("xsam", dict(rho=0.05, alpha=1.0, steps=1), True),
        ("ssam", dict(rho=0.05, sparsity=0.0), False),
        ("looksam", dict(rho=0.05, k=1), True),
        ("bisam-ce", dict(rho=0.05), True),
    ],
)
def test_reduces_to_sam(name, kw, exact, base):
    data = batches()
    want = sam_run(mlp(), data, base)
    model = mlp()
    cls, bkw, _ = BASES[base]
    if name == "bisam-ce":  # the training loss as the perturbation loss
        opt = BiSAM(model.parameters(), cls, backend="torch", **kw, **bkw)
        for x, y in data:

            def closure(perturbation, x=x, y=y):
                loss = ce(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
    else:
        opt = CLASSES[name](model.parameters(), cls, backend="torch", **kw, **bkw)
        run(name, model, opt, data)
    got = [p.detach() for p in model.parameters()]
    if exact:
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{name} differs from SAM"
    else:
        assert rel_err(got, want) < 1e-13


# ------------------------------------------------------------------ protocols
@pytest.mark.parametrize("name", ["gsam", "ssam", "friendly", "xsam", "looksam", "bsam", "bisam"])
def test_manual_protocol_equals_closure(name):
    """first_step / (extra passes) / second_step by hand gives the same weights as step(closure)."""
    data = batches(5)
    a, b = mlp(), mlp()
    extra = dict(steps=2) if name == "xsam" else {}
    opt_a, opt_b = build(name, a, "sgd", **extra), build(name, b, "sgd", **extra)
    run(name, a, opt_a, data)
    for x, y in data:
        (lower_bound if name == "bisam" else ce)(b, x, y).backward()
        done = opt_b.first_step(zero_grad=True) is False
        if done:
            continue
        if name == "xsam":
            ce(b, x, y).backward()
            opt_b.ascent_step(zero_grad=True)
        if name == "bsam":
            ce(b, x, y).backward()
            opt_b.bilateral_step(zero_grad=True)
        ce(b, x, y).backward()
        opt_b.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_gsam_surrogate_gap_and_rho_schedule():
    model, (x, y) = mlp(), batches(1)[0]
    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.02, lr=0.4, backend="torch")
    assert opt.param_groups[0]["lr_max"] == 0.4
    assert GSAM.rho_t(opt.param_groups[0]) == pytest.approx(0.1)
    opt.param_groups[0]["lr"] = 0.2
    assert GSAM.rho_t(opt.param_groups[0]) == pytest.approx(0.06)
    with torch.no_grad():
        l0 = ce(model, x, y)
    opt.step(closure_for("gsam", model, x, y))
    gap = opt.surrogate_gap
    assert isinstance(gap, torch.Tensor) and gap.dim() == 0
    assert gap.item() == pytest.approx(opt.last_perturbed_loss.item() - l0.item(), abs=1e-12)
    assert gap.item() > 0  # ascent along the gradient raises the loss


def test_looksam_reuse_steps_take_one_pass():
    model, data = mlp(), batches(6)
    opt = build("looksam", model, "sgd")
    calls = []
    for x, y in data:
        base = closure_for("looksam", model, x, y)
        opt.step(lambda base=base: (calls.append(1), base())[1])
    assert len(calls) == 2 + 1 + 1 + 2 + 1 + 1  # k=3: full, reuse, reuse, full, reuse, reuse


# ------------------------------------------------------------------ XSAM alpha search
def test_xsam_search_alpha_finds_the_known_maximum():
    """2-D quadratic: L(w0 + r d) over the unit circle has a known best angle; the search lands on it."""
    a_mat = torch.tensor([[3.0, 1.2], [1.2, -1.0]], dtype=torch.float64)
    b_vec = torch.tensor([0.7, -0.4], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.3, 0.8], dtype=torch.float64))

    def loss_fn():
        return 0.5 * w @ a_mat @ w + b_vec @ w

    rho, rho_max = 0.15, 0.3
    opt = XSAM([w], torch.optim.SGD, rho=rho, rho_max=rho_max, lr=0.0, backend="torch")
    w0 = w.detach().clone()
    loss_fn().backward()
    opt.first_step(zero_grad=True)
    loss_fn().backward()
    grid = [i / 100 for i in range(201)]
    best = opt.search_alpha(loss_fn, grid=grid)
    assert torch.equal(w.detach(), w0)  # the search leaves w0 in place
    assert opt.param_groups[0]["alpha"] == best
    # the known answer: brute force over the same slerp curve in float64
    with torch.no_grad():
        g0 = a_mat @ w0 + b_vec
        wk = w0 + rho * g0 / g0.norm()
        gk = a_mat @ wk + b_vec
    v0, v1 = [g0 / g0.norm()], [gk / gk.norm()]
    vals = []
    for a in grid:
        d = ref.slerp(v0, v1, a)[0]
        p = w0 + rho_max * d
        vals.append(float(0.5 * p @ a_mat @ p + b_vec @ p))
    assert best == grid[max(range(len(grid)), key=vals.__getitem__)]
    # and it is the maximum over the whole circle up to the grid resolution
    angles = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    circle = w0[:, None] + rho_max * torch.stack([angles.cos(), angles.sin()])
    top = (0.5 * (circle * (a_mat @ circle)).sum(0) + b_vec @ circle).max()
    assert max(vals) == pytest.approx(float(top), abs=1e-3)
    opt.second_step()


def test_xsam_alpha_is_saved():
    model, data = mlp(), batches(1)
    opt = build("xsam", model, "sgd")
    opt.param_groups[0]["alpha"] = 0.7
    sd = opt.state_dict()
    other = build("xsam", mlp(), "sgd")
    other.load_state_dict(sd)
    assert other.param_groups[0]["alpha"] == 0.7
    run("xsam", model, opt, data)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_mid_run(name):
    data = batches()
    a = mlp()
    opt_a = build(name, a, "sgd")
    run(name, a, opt_a, data)

    b = mlp()
    opt_b = build(name, b, "sgd")
    run(name, b, opt_b, data[:4])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = mlp(seed=5)
    c.load_state_dict(saved["model"])
    opt_c = build(name, c, "sgd", **({"rho_max": 0.5} if name in ("gsam", "bsam") else {}))
    opt_c.load_state_dict(saved["opt"])
    run(name, c, opt_c, data[4:])
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q), f"{name}: resumed run differs"


# ------------------------------------------------------------------ triton backend (when available)
@pytest.mark.parametrize("device", TRITON_DEVICES)  # cpu under the interpreter, cuda with a GPU
@pytest.mark.parametrize("name", ["gsam", "xsam", "ssam", "friendly"])
def test_triton_backend_matches_torch(name, device):
    why = sharpfused.ops.unavailable_reason("triton", torch.device(device))
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    data = [(x.to(device), y.to(device)) for x, y in batches(3, dtype=torch.float32)]
    a, b = mlp(torch.float32).to(device), mlp(torch.float32).to(device)
    run(name, a, build(name, a, "sgd", backend="torch"), data)
    run(name, b, build(name, b, "sgd", backend="triton"), data)
    assert rel_err(list(b.parameters()), list(a.parameters())) < 1e-5


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (GSAM, dict(rho_max=-0.1), "rho_max"),
        (GSAM, dict(alpha=float("nan")), "alpha"),
        (GSAM, dict(rho_max=0.05, rho_min=0.1), "rho_min"),
        (GSAM, dict(rho_min=0.01, lr_max=0.001, lr_min=0.01), "lr_max"),
        (BiSAM, dict(rho=-1.0), "rho"),
        (XSAM, dict(steps=0), "steps"),
        (XSAM, dict(rho_max=-1.0), "rho_max"),
        (SAMPa, dict(lam=1.5), "lam"),
        (BSAM, dict(rho_min=-0.1), "rho_min"),
        (SSAM, dict(sparsity=1.2), "sparsity"),
        (SSAM, dict(mask="magnitude"), "mask"),
        (SSAM, dict(mask_every=0), "mask_every"),
        (LookSAM, dict(k=0), "k"),
        (LookSAM, dict(beta=-0.5), "beta"),
        (FriendlySAM, dict(lam=2.0), "lam"),
        (FriendlySAM, dict(sigma=-1.0), "sigma"),
    ],
)
def test_bad_inputs_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_protocol_misuse_raises():
    model, (x, y) = mlp(), batches(1)[0]
    opt = build("xsam", model, "sgd", steps=2)
    ce(model, x, y).backward()
    opt.first_step(zero_grad=True)
    ce(model, x, y).backward()
    with pytest.raises(RuntimeError, match="ascent_step"):
        opt.second_step()
    bsam = build("bsam", mlp(), "sgd")
    with pytest.raises(RuntimeError, match="bilateral_step"):
        bsam.bilateral_step()
    sampa = build("sampa", mlp(), "sgd")
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        sampa.first_step()
    with pytest.raises(RuntimeError, match="perturbation"):
        build("bisam", mlp(), "sgd").step()
