"""ESAM (SWP + SDS) and MESA: float64 references, identities, resume, skipped steps, bad inputs."""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sharpfused
from sharpfused import ESAM, MESA, SAM, sharpness_selection, trajectory_kl

from . import reference as ref
from .helpers import TRITON_DEVICES, rel_err
from .test_algorithms import BASES, batches, grad_fn_for, mlp

STEPS = 6
SEED = 1234


def shapes(model):
    return [p.shape for p in model.parameters()]


def esam(model, base="sgd", backend="torch", **kw):
    cls, bkw, _ = BASES[base]
    return ESAM(model.parameters(), cls, backend=backend, **{"rho": 0.05, "beta": 0.6, "seed": SEED, **kw}, **bkw)


def mesa(model, base="sgd", backend="torch", **kw):
    cls, bkw, _ = BASES[base]
    return MESA(model.parameters(), cls, backend=backend, **{"decay": 0.8, "lam": 0.5, **kw}, **bkw)


def ce_closure(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def sds_step(model, opt, x, y):
    """One ESAM step with SDS, by hand (the protocol the docstring gives)."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y, reduction="none")
    idx = opt.select(losses, after)
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.second_step(zero_grad=True)


def per_sample_losses(model, params, x, y):
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y, reduction="none")


def mesa_closure(model, opt, x, y):
    def closure():
        logits = model(x)
        loss = F.cross_entropy(logits, y) + opt.trajectory_loss(logits, model, x)
        loss.backward()
        return loss

    return closure


def mesa_grad_fn(model, x, y, lam, tau):
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]

    def grad_fn(params, ema):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        out = functional_call(model, dict(zip(names, ps)), (x,))
        with torch.no_grad():
            ema_out = functional_call(model, dict(zip(names, [e.clone() for e in ema])), (x,))
        value = F.cross_entropy(out, y) + lam * ref.kl_trajectory(out, ema_out, tau)
        return list(torch.autograd.grad(value, ps))

    return grad_fn


# ------------------------------------------------------------------ ESAM against its float64 reference
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("sds", [False, True], ids=["swp", "swp+sds"])
def test_esam_matches_float64_reference(base, sds):
    model, data = mlp(), batches(STEPS)
    ref_model = copy.deepcopy(model)
    params = [p.detach().clone() for p in model.parameters()]
    opt = esam(model, base, gamma=0.5)
    for x, y in data:
        sds_step(model, opt, x, y) if sds else opt.step(ce_closure(model, x, y))
    cls, kw, refcls = BASES[base]
    rb = refcls(**kw)
    for t, (x, y) in enumerate(data):
        masks = ref.esam_masks(shapes(ref_model), 0.6, SEED, t)
        second = None
        if sds:
            g = grad_fn_for(ref_model, x, y)(params)
            scale = 0.05 / 0.6 / (ref._norm(g) + ref.EPS)
            at = [w + scale * m * gi for w, m, gi in zip(params, masks, g)]
            idx = ref.sds_indices(
                per_sample_losses(ref_model, params, x, y), per_sample_losses(ref_model, at, x, y), 0.5
            )
            assert len(idx) == 12
            second = grad_fn_for(ref_model, x[idx], y[idx])
        params = ref.esam_step(params, grad_fn_for(ref_model, x, y), rb, 0.05, 0.6, masks, second)
    err = rel_err(list(model.parameters()), params)
    assert err < 1e-9, f"ESAM/{base}: relative error {err:.3g} vs the float64 reference"


def test_swp_perturbs_a_beta_fraction_by_rho_over_beta():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20000, dtype=torch.float64))
    g = torch.randn(20000, dtype=torch.float64)
    opt = ESAM([w], torch.optim.SGD, rho=0.1, beta=0.3, seed=5, lr=0.1, backend="torch")
    w0 = w.detach().clone()
    w.grad = g.clone()
    opt.first_step(zero_grad=True)
    moved = w.detach() != w0
    frac = moved.double().mean().item()
    assert abs(frac - 0.3) < 0.015, frac  # 20000 Bernoulli(0.3) draws: sd 0.0032
    want = w0 + (0.1 / 0.3) * g / g.norm()
    assert torch.allclose(w.detach()[moved], want[moved], rtol=0, atol=1e-15)
    opt.abort_step()
    assert torch.equal(w.detach(), w0)


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize("base", list(BASES))
def test_esam_full_weights_and_full_data_is_sam(base):
    data = batches(STEPS)
    cls, bkw, refcls = BASES[base]
    a, b, c = mlp(), mlp(), mlp()
    sam = SAM(a.parameters(), cls, rho=0.05, backend="torch", **bkw)
    for x, y in data:
        sam.step(ce_closure(a, x, y))
    opt_b = esam(b, base, beta=1.0, gamma=1.0)
    for x, y in data:
        sds_step(b, opt_b, x, y)
    opt_c = esam(c, base, beta=1.0)
    for x, y in data:
        opt_c.step(ce_closure(c, x, y))
    for m in (b, c):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), m.parameters())), "ESAM(1, 1) differs from SAM"
    params, rb, rm = [p.detach().clone() for p in mlp().parameters()], refcls(**bkw), mlp()
    for x, y in data:
        params = ref.sam_step(params, grad_fn_for(rm, x, y), rb, rho=0.05)
    assert rel_err(list(b.parameters()), params) < 1e-9


def test_sharpness_selection_rule():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    after = before + torch.tensor([0.5, -1.0, 3.0, 0.1, 2.0, 0.0, 1.0])
    assert sharpness_selection(before, after, 0.5).tolist() == [2, 4, 6]  # floor(3.5) = 3 largest rises
    assert sharpness_selection(before, after, 1.0).tolist() == list(range(7))
    assert sharpness_selection(before, after, 0.01).tolist() == [2]  # at least one sample
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(101, generator=g), torch.randn(101, generator=g)
    for gamma in (0.29, 0.5, 0.77):
        assert sharpness_selection(b, a, gamma).tolist() == ref.sds_indices(b, a, gamma)


# ------------------------------------------------------------------ MESA against its float64 reference
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("start", [0, 2])
def test_mesa_matches_float64_reference(base, start):
    model, data = mlp(), batches(STEPS)
    ref_model = copy.deepcopy(model)
    params = [p.detach().clone() for p in model.parameters()]
    opt = mesa(model, base, start_step=start, temperature=2.0)
    for x, y in data:
        opt.step(mesa_closure(model, opt, x, y))
    cls, kw, refcls = BASES[base]
    rb, state = refcls(**kw), {}
    for t, (x, y) in enumerate(data):
        lam = 0.5 if t >= start else 0.0
        params = ref.mesa_step(params, mesa_grad_fn(ref_model, x, y, lam, 2.0), rb, state, decay=0.8)
    assert rel_err(list(model.parameters()), params) < 1e-9
    ema = [opt.state[p]["ema"] for p in model.parameters()]
    assert rel_err(ema, state["ema"]) < 1e-9
    assert opt.steps_taken == STEPS


def test_mesa_trajectory_kl_and_ema_forward():
    g = torch.Generator().manual_seed(0)
    z, ze = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    assert trajectory_kl(z, ze, 3.0).item() == pytest.approx(ref.kl_trajectory(z, ze, 3.0).item(), rel=1e-12)
    assert trajectory_kl(z, z, 3.0).item() == pytest.approx(0.0, abs=1e-15)
    model = nn.Sequential(nn.Linear(10, 8), nn.Dropout(0.5), nn.Linear(8, 5)).double()
    opt = mesa(model, decay=0.5)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.step(mesa_closure(model, opt, x, y))
    w = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(opt.state[q]["ema"])
    model.train()
    got = opt.ema_forward(model, x)
    assert model.training and model[1].training  # the modes come back
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))  # no weight touched
    assert not got.requires_grad
    twin.eval()
    assert torch.equal(got, twin(x))  # eval mode (no dropout) at the EMA weights
    assert not torch.equal(got, model.eval()(x))  # and they are not the current weights


def test_mesa_trajectory_loss_is_zero_and_free_before_start_step():
    model = mlp()
    opt = mesa(model, start_step=2)
    x, y = batches(1)[0]
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    opt.step(mesa_closure(model, opt, x, y))
    assert len(calls) == 1  # no EMA forward before start_step
    opt.step(mesa_closure(model, opt, x, y))
    opt.step(mesa_closure(model, opt, x, y))
    assert len(calls) == 4  # from step 2: the model's forward and the EMA's


@pytest.mark.parametrize("base", list(BASES))
def test_mesa_without_trajectory_loss_and_decay_one_is_the_base_optimizer(base):
    data = batches(STEPS)
    cls, bkw, _ = BASES[base]
    a, b = mlp(), mlp()
    opt_a = mesa(a, base, lam=0.0, decay=1.0)
    plain = cls(b.parameters(), **bkw)
    ema0 = [p.detach().clone() for p in a.parameters()]
    for x, y in data:
        opt_a.step(mesa_closure(a, opt_a, x, y))
        plain.zero_grad()
        F.cross_entropy(b(x), y).backward()
        plain.step()
    assert rel_err(list(a.parameters()), list(b.parameters())) < 1e-13
    assert all(torch.equal(opt_a.state[p]["ema"], e) for p, e in zip(a.parameters(), ema0))  # decay 1: kept


def test_mesa_backward_then_step_without_closure():
    a, b = mlp(), mlp()
    opt_a, opt_b = mesa(a), mesa(b)
    for x, y in batches(3):
        opt_a.step(mesa_closure(a, opt_a, x, y))
        mesa_closure(b, opt_b, x, y)()
        opt_b.step()
        opt_b.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ triton backend (interpreted on CPU)
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["esam", "mesa"])
def test_triton_matches_float64_reference(name, device):
    why = sharpfused.ops.unavailable_reason("triton", torch.device(device))
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    data = batches(3)
    model64 = mlp()
    params = [p.detach().clone() for p in model64.parameters()]
    model = mlp(torch.float32).to(device)
    fdata = [(x.float().to(device), y.to(device)) for x, y in data]
    rb = ref.SGDRef(**BASES["sgd"][1])
    if name == "esam":
        opt = esam(model, backend="triton")
        for x, y in fdata:
            opt.step(ce_closure(model, x, y))
        for t, (x, y) in enumerate(data):
            masks = ref.esam_masks(shapes(model64), 0.6, SEED, t)
            params = ref.esam_step(params, grad_fn_for(model64, x, y), rb, 0.05, 0.6, masks)
    else:
        opt = mesa(model, backend="triton", temperature=2.0)
        for x, y in fdata:
            opt.step(mesa_closure(model, opt, x, y))
        state = {}
        for x, y in data:
            params = ref.mesa_step(params, mesa_grad_fn(model64, x, y, 0.5, 2.0), rb, state, decay=0.8)
        assert rel_err([opt.state[p]["ema"] for p in model.parameters()], state["ema"]) < 1e-5
    assert rel_err(list(model.parameters()), params) < 1e-5


# ------------------------------------------------------------------ resume
def _round_trip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["esam", "esam-sds", "mesa"])
def test_state_dict_round_trip_mid_run(name):
    data = batches(STEPS)
    make = mesa if name == "mesa" else esam

    def one(model, opt, x, y):
        if name == "mesa":
            opt.step(mesa_closure(model, opt, x, y))
        elif name == "esam-sds":
            sds_step(model, opt, x, y)
        else:
            opt.step(ce_closure(model, x, y))

    a = mlp()
    opt_a = make(a)
    for x, y in data:
        one(a, opt_a, x, y)
    b = mlp()
    opt_b = make(b)
    for x, y in data[:3]:
        one(b, opt_b, x, y)
    saved, weights = _round_trip(opt_b), copy.deepcopy(b.state_dict())
    c = mlp(seed=5)
    c.load_state_dict(weights)
    opt_c = make(c, **({"seed": 99} if name != "mesa" else {"decay": 0.1}))  # the state dict's values win
    opt_c.load_state_dict(saved)
    for x, y in data[3:]:
        one(c, opt_c, x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters())), f"{name}: resumed run differs"
    if name == "mesa":
        assert all(
            torch.equal(opt_a.state[p]["ema"], opt_c.state[q]["ema"]) for p, q in zip(a.parameters(), c.parameters())
        )
    else:
        assert opt_c.seed == SEED and opt_c.state["esam"]["draws"] == STEPS


@pytest.mark.parametrize("name", ["esam", "mesa"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_continues_bit_identically(name, how):
    import pickle

    data = batches(5)
    a = mlp()
    opt_a = (mesa if name == "mesa" else esam)(a)
    step = (
        (lambda m, o, x, y: o.step(mesa_closure(m, o, x, y)))
        if name == "mesa"
        else (lambda m, o, x, y: o.step(ce_closure(m, x, y)))
    )
    for x, y in data[:2]:
        step(a, opt_a, x, y)
    if how == "deepcopy":
        b, opt_b = copy.deepcopy((a, opt_a))
    else:
        b, opt_b = pickle.loads(pickle.dumps((a, opt_a)))
    for x, y in data[2:]:
        step(a, opt_a, x, y)
        step(b, opt_b, x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ skipped steps
def _poisoned(closure, model):
    def wrapped():
        loss = closure()
        next(iter(model.parameters())).grad.view(-1)[0] = float("nan")
        return loss

    return wrapped


@pytest.mark.parametrize("base", list(BASES))
def test_mesa_nonfinite_step_changes_no_state(base):
    model = mlp(torch.float32)
    opt = mesa(model, base)
    data = batches(5, torch.float32)
    for x, y in data[:3]:
        opt.step(mesa_closure(model, opt, x, y))
    w = [p.detach().clone() for p in model.parameters()]
    ema = [opt.state[p]["ema"].clone() for p in model.parameters()]
    base_state = copy.deepcopy(opt.base_optimizer.state_dict())
    x, y = data[3]
    opt.step(_poisoned(mesa_closure(model, opt, x, y), model))
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(torch.equal(opt.state[p]["ema"], e) for p, e in zip(model.parameters(), ema)), "the EMA moved"
    after = opt.base_optimizer.state_dict()["state"]
    for k, st in base_state["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[k][key])), key
    opt.step(mesa_closure(model, opt, *data[4]))
    assert not bool(opt.last_step_skipped)


@pytest.mark.parametrize("name", ["esam", "mesa"])
def test_a_skipped_first_step_creates_no_state(name):
    model, twin = mlp(torch.float32), mlp(torch.float32)
    make = mesa if name == "mesa" else esam
    opt, ref_opt = make(model), make(twin)
    x, y = batches(1, torch.float32)[0]
    closure = mesa_closure(model, opt, x, y) if name == "mesa" else ce_closure(model, x, y)
    opt.step(_poisoned(closure, model))
    assert bool(opt.last_step_skipped)
    assert not opt.state and not opt.base_optimizer.state
    for x, y in batches(3, torch.float32, seed=4):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.step(mesa_closure(m, o, x, y) if name == "mesa" else ce_closure(m, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_esam_nonfinite_step_restores_weights_and_base_state():
    model = mlp(torch.float32)
    opt = esam(model)
    data = batches(4, torch.float32)
    for x, y in data[:2]:
        opt.step(ce_closure(model, x, y))
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.step(_poisoned(ce_closure(model, *data[2]), model))
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (ESAM, dict(beta=0.0), "beta"),
        (ESAM, dict(beta=1.5), "beta"),
        (ESAM, dict(gamma=0.0), "gamma"),
        (ESAM, dict(gamma=1.01), "gamma"),
        (ESAM, dict(rho=-0.1), "rho"),
        (ESAM, dict(seed=-1), "seed"),
        (ESAM, dict(seed=2.5), "seed"),
        (MESA, dict(decay=1.5), "decay"),
        (MESA, dict(lam=-1.0), "lam"),
        (MESA, dict(temperature=0.0), "temperature"),
        (MESA, dict(start_step=-1), "start_step"),
    ],
)
def test_bad_inputs_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_bad_calls_raise():
    with pytest.raises(TypeError, match=r"beta must be a number or a CPU tensor in \(0, 1\].*on meta"):
        ESAM(mlp().parameters(), torch.optim.SGD, lr=0.1, beta=torch.tensor(0.5, device="meta"))
    with pytest.raises(ValueError, match="1-d"):
        sharpness_selection(torch.zeros(3, 2), torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError, match="same samples"):
        sharpness_selection(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        sharpness_selection(torch.zeros(3), torch.zeros(3), 2.0)
    with pytest.raises(ValueError, match="same shape"):
        trajectory_kl(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        trajectory_kl(torch.zeros(3, 2), torch.zeros(3, 2), temperature=-1.0)
    with pytest.raises(RuntimeError, match="second_step"):
        mesa(mlp()).second_step()


# ------------------------------------------------------------------ GradScaler (MESA: scaler.step(opt) is the step)
def test_mesa_under_gradscaler_equals_unscaled_training():
    outs = []
    data = batches(5, torch.float32)
    for use_scaler in (False, True):
        model = mlp(torch.float32)
        opt = mesa(model, decay=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1, enabled=use_scaler)
        for x, y in data:
            logits = model(x)
            scaler.scale(F.cross_entropy(logits, y) + opt.trajectory_loss(logits, model, x)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        if use_scaler:
            assert scaler.get_scale() == 2.0**13  # the scale changed at every step
        outs.append(
            (
                [p.detach().clone() for p in model.parameters()],
                [opt.state[p]["ema"].clone() for p in model.parameters()],
            )
        )
    (w0, e0), (w1, e1) = outs
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(a, b) for a, b in zip(e0, e1))


def test_mesa_gradscaler_overflow_skips_and_keeps_the_ema():
    model = mlp(torch.float32)
    opt = mesa(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    (x, y), (x2, y2) = batches(2, torch.float32)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    w = [p.detach().clone() for p in model.parameters()]
    ema = [opt.state[p]["ema"].clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x2), y2)).backward()
    next(iter(model.parameters())).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert bool(opt.last_step_skipped) and scaler.get_scale() == 2.0**7  # the scaler saw it and backed off
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(torch.equal(opt.state[p]["ema"], e) for p, e in zip(model.parameters(), ema))


# ------------------------------------------------------------------ ESAM.step_sds
def sds_loss_fn(model, x, y, fail_at=None):
    calls = []

    def loss_fn(idx):
        calls.append(idx)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return loss_fn, calls


def test_step_sds_equals_the_hand_written_protocol():
    a, b = mlp(), mlp()
    opt_a, opt_b = esam(a, gamma=0.5), esam(b, gamma=0.5)
    for x, y in batches(4):
        sds_step(a, opt_a, x, y)
        fn, calls = sds_loss_fn(b, x, y)
        loss = opt_b.step_sds(fn)
        assert [c is None for c in calls] == [True, True, False] and len(calls[2]) == 12
        assert loss.dim() == 0 and not loss.requires_grad
        assert opt_b.last_perturbed_loss.dim() == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.grad is None for p in b.parameters())


@pytest.mark.parametrize("fail_at", [2, 3])
def test_step_sds_aborted_by_an_exception_moves_nothing(fail_at):
    model = mlp()
    opt = esam(model)
    x, y = batches(1)[0]
    opt.step_sds(sds_loss_fn(model, x, y)[0])
    w, sd = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    with pytest.raises(KeyboardInterrupt):
        opt.step_sds(sds_loss_fn(model, x, y, fail_at=fail_at)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert not opt.perturbed and opt.state["esam"] == sd["state"]["esam"]
    with pytest.raises(ValueError, match="per-sample"):
        opt.step_sds(lambda idx: F.cross_entropy(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


# ------------------------------------------------------------------ checkpoints before the first step
def test_esam_state_dict_before_the_first_step_holds_the_seed():
    model = mlp()
    torch.manual_seed(1)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, beta=0.5)  # seed=None: drawn here
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["state"]["esam"] == {"seed": opt.seed, "draws": 0}
    twin = mlp()
    torch.manual_seed(2)
    resumed = ESAM(twin.parameters(), torch.optim.SGD, lr=0.1, beta=0.5)
    assert resumed.seed != opt.seed
    resumed.load_state_dict(sd)
    assert resumed.seed == opt.seed and not resumed.state  # as fresh: a skipped first step still leaves nothing
    for x, y in batches(3):
        opt.step(ce_closure(model, x, y))
        resumed.step(ce_closure(twin, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert opt.state_dict()["state"]["esam"] == resumed.state_dict()["state"]["esam"] == {"seed": opt.seed, "draws": 3}


# ------------------------------------------------------------------ hyperparameter types
@pytest.mark.parametrize("kind", ["numpy", "cpu tensor", "float64 tensor"])
def test_hyperparameters_may_be_numpy_scalars_and_cpu_tensors(kind):
    as_kind = {
        "numpy": np.float32,
        "cpu tensor": torch.tensor,
        "float64 tensor": lambda v: torch.tensor(v, dtype=torch.float64),
    }[kind]
    data = batches(3)
    runs = []
    for conv in (float, as_kind):  # values exact in float32: the runs must be bit-identical
        model = mlp()
        opt = esam(model, beta=conv(0.5), gamma=conv(0.5), rho=conv(0.25))
        for x, y in data:
            sds_step(model, opt, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
        model = mlp()
        opt = mesa(model, decay=conv(0.5), lam=conv(0.5), temperature=conv(4.0))
        for x, y in data:
            opt.step(mesa_closure(model, opt, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2])), "ESAM"
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[3])), "MESA"


@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (ESAM, dict(beta=torch.tensor(1.5)), r"beta must be a finite number in \(0, 1\].*got 1.5"),
        (ESAM, dict(beta=np.float32(0.0)), r"beta must be a finite number in \(0, 1\]"),
        (ESAM, dict(gamma=torch.tensor(0.0)), r"gamma must be a finite number in \(0, 1\]"),
        (ESAM, dict(gamma=np.float64(1.5)), r"gamma must be a finite number in \(0, 1\]"),
        (MESA, dict(decay=torch.tensor(-0.1)), r"decay must be a finite number in \[0, 1\]"),
        (MESA, dict(decay=np.float32(1.5)), r"decay must be a finite number in \[0, 1\]"),
        (MESA, dict(lam=torch.tensor(-1.0)), r"lam must be a finite number in \[0, inf\)"),
        (MESA, dict(lam=float("inf")), r"lam must be a finite number in \[0, inf\)"),
        (MESA, dict(temperature=torch.tensor(0.0)), r"temperature must be a finite number in \(0, inf\)"),
        (MESA, dict(temperature=float("nan")), r"temperature must be a finite number in \(0, inf\)"),
    ],
)
def test_tensor_and_numpy_hyperparameters_are_validated(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_host_settings_refuse_device_tensors_and_groups_validate_tensors():
    meta = torch.tensor(0.5, device="meta")  # not on the CPU: reading it back would be a host sync
    for cls, kw in ((ESAM, dict(gamma=meta)), (MESA, dict(lam=meta)), (MESA, dict(temperature=meta))):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be a number or a CPU tensor.*on meta"):
            cls(mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)
    m = mlp()
    with pytest.raises(ValueError, match=r"beta \(param group 1\) must be a finite number in \(0, 1\]"):
        ESAM([{"params": m[0].parameters()}, {"params": m[2].parameters(), "beta": torch.tensor(2.0)}], lr=0.1)
    with pytest.raises(ValueError, match="temperature"):
        trajectory_kl(torch.zeros(3, 2), torch.zeros(3, 2), temperature=torch.tensor(-1.0))
    assert torch.equal(
        trajectory_kl(torch.eye(3), torch.ones(3, 3), temperature=torch.tensor(2.0)),
        trajectory_kl(torch.eye(3), torch.ones(3, 3), temperature=2.0),
    )


@pytest.mark.parametrize(
    "cls,key,value",
    [
        (ESAM, "gamma", 5.0),  # out of range too: refused as global, not silently kept
        (ESAM, "gamma", 0.5),
        (ESAM, "seed", 3),
        (MESA, "lam", 0.0),
        (MESA, "temperature", 2.0),
        (MESA, "start_step", 4),
    ],
)
def test_global_settings_in_a_param_group_are_refused(cls, key, value):
    m = mlp()
    match = rf"{key} was given in param group 1, but it is a global setting of {cls.__name__}"
    with pytest.raises(ValueError, match=match):
        cls([{"params": m[0].parameters()}, {"params": m[2].parameters(), key: value}], torch.optim.SGD, lr=0.1)
    opt = cls([{"params": m[0].parameters()}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=rf"{key} was given in param group new, but it is a global setting"):
        opt.add_param_group({"params": m[2].parameters(), key: value})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1


# ------------------------------------------------------------------ MESA on complex parameters
class _ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.c = nn.Parameter(torch.randn(4, 5, dtype=torch.complex128, generator=g))
        self.lin = nn.Linear(5, 5).double()

    def forward(self, x):
        return self.lin((x.to(torch.complex128) @ self.c).abs())


def test_mesa_ema_forward_with_a_complex_parameter():
    torch.manual_seed(0)
    model = _ComplexNet()
    opt = MESA(model.parameters(), torch.optim.SGD, lr=0.1, decay=0.5, lam=0.5, backend="torch")
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)
    ]
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}  # complex arithmetic, by hand
    for x, y in data:
        opt.step(mesa_closure(model, opt, x, y))  # from the second step on, trajectory_loss runs the EMA forward
        ema = {n: 0.5 * ema[n] + 0.5 * p.detach() for n, p in model.named_parameters()}
    weights = opt.ema_weights(model)
    assert weights["c"].dtype == torch.complex128 and weights["c"].shape == model.c.shape
    x = data[0][0]
    expected = functional_call(model, ema, (x,))
    assert torch.allclose(opt.ema_forward(model, x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, model(x))  # the EMA is not the weights
    loss = opt.trajectory_loss(model(x), model, x)
    assert torch.allclose(loss, 0.5 * trajectory_kl(model(x), expected, 5.0), rtol=1e-12)


def test_trajectory_kl_refuses_an_empty_batch():
    for shape in ((0, 5), (2, 0, 5)):
        with pytest.raises(ValueError, match="at least one sample"):
            trajectory_kl(torch.zeros(shape, requires_grad=True), torch.zeros(shape))
    model = mlp()
    opt = mesa(model)
    x, y = batches(1)[0]
    opt.step(mesa_closure(model, opt, x, y))
    with pytest.raises(ValueError, match="at least one sample"):
        opt.trajectory_loss(model(x[:0]), model, x[:0])
