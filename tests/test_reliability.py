"""Nothing silently wrong: skipped and aborted steps, state that moves only on completed steps,
mid-step checkpoints, copies, parameter groups, schedules, complex parameters, bad input."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpfused
from sharpfused import GSAM, SAM, LookSAM

from .helpers import MLP, data
from .test_algorithms import CASES, CLASSES, closure_for

ALL = ["sam", "asam", *CASES]
#: algorithms with the first_step / backward / second_step protocol and no extra call
TWO_PASS = ["sam", "asam", "gsam", "bisam", "xsam", "ssam", "friendly", "esam"]
BASES = {
    "sgd-damp": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),  # not fused: restore + base.step()
}


def make(name, params, base="sgd-damp", **over):
    cls, kw = BASES[base]
    if name in ("sam", "asam"):
        extra = dict(rho=0.5, adaptive=True, eta=0.01) if name == "asam" else dict(rho=0.05)
        return SAM(params, cls, **{**extra, **over}, **kw)
    return CLASSES[name](params, cls, **{**CASES[name][0], **over}, **kw)


def closure(name, model, x, y, fault=None, at=None):
    """``closure_for``, with ``fault`` applied after its ``at``-th call: a value written into one
    gradient entry (inf/NaN), or an exception raised."""
    inner = closure_for(name, model, x, y)
    calls = []

    def wrapped(*args, **kwargs):
        loss = inner(*args, **kwargs)
        if len(calls) == at:
            if isinstance(fault, BaseException):
                calls.append(1)
                raise fault
            next(iter(model.parameters())).grad.view(-1)[0] = fault
        calls.append(1)
        return loss

    return wrapped


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def flat_state(opt):
    """Every tensor and value of the optimizer's and the base optimizer's state, for bit comparison."""
    return copy.deepcopy(opt.state_dict())


def same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def steps(name, model, opt, batches):
    for x, y in batches:
        opt.step(closure(name, model, x, y))


def trained(name, n=3):
    """A seeded MLP and ``make(name)``'s optimizer after ``n`` steps (SSAM: step 3 refreshes its mask)."""
    torch.manual_seed(0)
    model = MLP()
    opt = make(name, model.parameters())
    steps(name, model, opt, batches(n))
    return model, opt


def batches(n, seed=1):
    return [data("mlp", n=16, seed=seed + i) for i in range(n)]


# ------------------------------------------------------------------ a skipped very first step
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("at", [0, 1], ids=["pass1", "pass2"])
def test_a_skipped_first_step_creates_no_state(name, base, at):
    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    opt, ref = make(name, model.parameters(), base), make(name, twin.parameters(), base)
    fresh = flat_state(ref)
    w = weights(model)
    x, y = data("mlp", n=16)
    opt.step(closure(name, model, x, y, float("inf"), at))
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    same(flat_state(opt), fresh)  # no state at all: neither the algorithm's nor the base optimizer's
    assert not opt.base_optimizer.state and not opt.state
    # and training goes on as from a fresh optimizer (the skipped step counted for nothing)
    data_ = batches(3)
    steps(name, model, opt, data_)
    steps(name, twin, ref, data_)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    same(flat_state(opt), flat_state(ref))
    assert int(opt.skipped_steps) == 1 and int(ref.skipped_steps) == 0


def test_ssam_builds_its_mask_on_the_first_finite_step():
    """fp16 GradScaler training overflows in its first steps: the mask must not stay all-zero."""
    torch.manual_seed(0)
    model = MLP()
    opt = make("ssam", model.parameters(), mask_every=1000)
    x, y = data("mlp", n=16)
    for _ in range(2):
        opt.step(closure("ssam", model, x, y, float("inf"), 0))
        assert bool(opt.last_step_skipped)
    assert not opt.state
    loss_fn = closure("ssam", model, x, y)
    loss_fn()
    w = weights(model)
    opt.first_step(zero_grad=True)
    moved = sum(int((p.detach() != a).sum()) for p, a in zip(model.parameters(), w))
    n = sum(p.numel() for p in model.parameters())
    masks = [opt.state[p]["mask"] for p in model.parameters()]
    kept = sum(int(m.sum()) for m in masks)
    assert kept == round(0.4 * n)  # sparsity 0.6: the first finite step built the mask
    assert moved > 0.3 * n  # and the perturbation reaches the masked weights
    loss_fn()
    opt.second_step(zero_grad=True)
    assert opt.state["ssam"]["since_refresh"] == 1


# ------------------------------------------------------------------ exceptions: state moves only on completed steps
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("at", [0, 1], ids=["pass1", "pass2"])
def test_an_exception_in_a_pass_leaves_every_state_as_it_was(name, at):
    model, opt = trained(name)  # SSAM: mask_every=3, so step 3 refreshes the mask
    twin, ref = copy.deepcopy(model), None
    ref = make(name, twin.parameters())
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    before, w = flat_state(opt), weights(model)
    x, y = data("mlp", n=16, seed=99)
    # pass 1 of a step whose gradients are already there is not a closure call: count from the closure's calls
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure(name, model, x, y, KeyboardInterrupt(), at))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    same(flat_state(opt), before)
    more = batches(3, seed=50)
    steps(name, model, opt, more)
    steps(name, twin, ref, more)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name", ["friendly", "ssam", "looksam"])
def test_abort_step_after_first_step_restores_the_algorithm_state(name):
    model, opt = trained(name)
    before, w = flat_state(opt), weights(model)
    x, y = data("mlp", n=16, seed=7)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.abort_step()
    opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    same(flat_state(opt), before)


@pytest.mark.parametrize("name", ["friendly", "looksam", "ssam"])
def test_a_step_whose_second_pass_overflows_keeps_the_algorithm_state(name):
    model, opt = trained(name)  # SSAM: the next step refreshes its mask
    before, w = flat_state(opt), weights(model)
    x, y = data("mlp", n=16, seed=7)
    opt.step(closure(name, model, x, y, float("nan"), 1))
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    got = flat_state(opt)
    if name == "looksam":  # the host step counter counts attempts; everything else is as it was
        assert got["state"]["looksam"]["step"] == before["state"]["looksam"]["step"] + 1
        got["state"]["looksam"] = before["state"]["looksam"]
    same(got, before)


def test_friendlysam_momentum_of_a_parameter_that_appears_later_does_not_reset_the_others():
    """LayerDrop-style: a parameter without a gradient in step 1 gets m_0 = g when it first has one;
    the others keep their running average."""
    torch.manual_seed(0)
    model = MLP()
    opt = make("friendly", model.parameters())
    a, b = model.net[0].weight, model.net[2].bias
    x, y = data("mlp", n=16)
    for t in range(3):
        F.cross_entropy(model(x), y).backward()
        if t == 0:
            b.grad = None  # b has no gradient in the first step
        ga, gb = a.grad.clone(), None if b.grad is None else b.grad.clone()
        ma = opt.state[a]["momentum"].clone() if t else None
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if t == 0:
            assert b not in opt.state or "momentum" not in opt.state[b]
            torch.testing.assert_close(opt.state[a]["momentum"], ga, rtol=0, atol=0)
        elif t == 1:  # b is new: m_b = g_b; a keeps lam m + (1 - lam) g
            torch.testing.assert_close(opt.state[b]["momentum"], gb, rtol=0, atol=0)
            torch.testing.assert_close(opt.state[a]["momentum"], 0.9 * ma + 0.1 * ga, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ checkpoints mid-step
def test_state_dict_between_the_passes_is_refused():
    model = MLP()
    opt = make("sam", model.parameters())
    x, y = data("mlp", n=16)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.state_dict()
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    opt.state_dict()  # fine after the step


@pytest.mark.parametrize("name", TWO_PASS)
def test_load_state_dict_while_perturbed_restores_first(name):
    model, opt = trained(name, 2)
    sd, w = copy.deepcopy(opt.state_dict()), weights(model)
    twin = copy.deepcopy(model)
    ref = make(name, twin.parameters())
    ref.load_state_dict(copy.deepcopy(sd))
    x, y = data("mlp", n=16, seed=5)
    closure(name, model, x, y)(*([True] if name == "bisam" else []))
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), w))  # perturbed
    opt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))  # back at w
    assert all(p.grad is None for p in model.parameters())  # the half-done step's gradients are gone
    more = batches(2, seed=30)
    steps(name, model, opt, more)
    steps(name, twin, ref, more)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_plain_torch_state_dict_is_refused_at_load():
    model = MLP()
    opt = make("sam", model.parameters())
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="plain torch.optim state dict"):
        opt.load_state_dict(plain.state_dict())
    other = make("gsam", model.parameters())
    with pytest.raises(ValueError, match="lacks rho"):
        opt.load_state_dict(other.state_dict())


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_continues_bit_identically(name, how):
    torch.manual_seed(0)
    model = MLP()
    opt = make(name, model.parameters(), "adamw" if name == "sam" else "sgd-damp")
    steps(name, model, opt, batches(3))
    both = {"model": model, "opt": opt}
    if how == "deepcopy":
        other = copy.deepcopy(both)
    else:
        buf = io.BytesIO()
        torch.save(both, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    m2, o2 = other["model"], other["opt"]
    assert o2.base_optimizer is not opt.base_optimizer and o2.param_groups is o2.base_optimizer.param_groups
    more = batches(3, seed=20)
    steps(name, model, opt, more)
    steps(name, m2, o2, more)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    same(flat_state(o2), flat_state(opt))


@pytest.mark.parametrize("name", TWO_PASS)
def test_a_copy_taken_between_the_passes_finishes_the_step(name):
    model, opt = trained(name, 2)
    x, y = data("mlp", n=16, seed=9)
    closure(name, model, x, y)(*([True] if name == "bisam" else []))
    opt.first_step(zero_grad=True)
    other = copy.deepcopy({"model": model, "opt": opt})
    m2, o2 = other["model"], other["opt"]
    # the copy finishes first: its pending commits must land in the copy, not in the original
    for m, o in ((m2, o2), (model, opt)):
        F.cross_entropy(m(x), y).backward()
        o.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    same(flat_state(o2), flat_state(opt))
    pickle.dumps(o2)  # picklable too


@pytest.mark.parametrize("name", ["ssam", "looksam", "friendly"])
def test_a_mid_step_copy_that_alone_finishes_leaves_the_original_untouched(name):
    model, opt = trained(name)  # SSAM: the next step refreshes its mask
    x, y = data("mlp", n=16, seed=9)
    F.cross_entropy(model(x), y).backward()
    before = flat_state(opt)
    opt.first_step(zero_grad=True)
    m2, o2 = (lambda d: (d["m"], d["o"]))(copy.deepcopy({"m": model, "o": opt}))
    F.cross_entropy(m2(x), y).backward()
    o2.second_step(zero_grad=True)
    opt.abort_step()
    same(flat_state(opt), before)


# ------------------------------------------------------------------ param groups
def test_add_param_group_with_a_bad_value_adds_nothing():
    model = MLP()
    opt = make("sam", list(model.net[0].parameters()))
    n, nb = len(opt.param_groups), len(opt.base_optimizer.param_groups)
    with pytest.raises(ValueError, match="rho \\(param group new\\) must be a finite number >= 0.0, got -1.0"):
        opt.add_param_group({"params": list(model.net[2].parameters()), "rho": -1.0})
    assert len(opt.param_groups) == n and len(opt.base_optimizer.param_groups) == nb
    with pytest.raises(TypeError):
        opt.add_param_group({"params": list(model.net[2].parameters()), "rho": "big"})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": model.net[2].parameters(), "rho": 0.1})  # a generator is fine
    assert len(opt.param_groups) == n + 1 and opt.param_groups[-1]["rho"] == 0.1
    w = weights(model)
    steps("sam", model, opt, batches(1))
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), w))  # every group trains


@pytest.mark.parametrize("cls, base", [(GSAM, torch.optim.RMSprop), (sharpfused.XSAM, torch.optim.RMSprop),
                                       (SAM, torch.optim.Adadelta)])
def test_a_hyperparameter_named_like_the_base_optimizers_is_refused(cls, base):
    """Param groups are shared: GSAM's alpha would replace RMSprop's, SAM's rho Adadelta's."""
    with pytest.raises(ValueError, match="has the same name as"):
        cls(MLP().parameters(), base, lr=1e-3)


@pytest.mark.parametrize("name", ["xsam-k3", "bsam", "sampa"])
def test_a_parameter_losing_its_gradient_in_a_later_pass_is_stepped_with_zero(name):
    torch.manual_seed(0)
    model = MLP()
    opt = make(name, model.parameters())
    b = model.net[2].bias
    x, y = data("mlp", n=16)
    inner = closure_for(name, model, x, y)
    calls = []

    def cl(*args):
        loss = inner(*args)
        if calls:
            b.grad = None  # b has a gradient in the first pass only
        calls.append(1)
        return loss

    w = weights(model)
    opt.step(cl)
    assert not bool(opt.last_step_skipped)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_sampa_parameter_that_first_gets_a_gradient_later_is_checked_and_joins():
    torch.manual_seed(0)
    model = MLP()
    opt = make("sampa", model.parameters())
    b = model.net[2].bias
    x, y = data("mlp", n=16)
    for t in range(3):
        inner = closure_for("sampa", model, x, y)
        calls = []

        def cl(inner=inner, t=t, calls=calls):
            loss = inner()
            if t == 0:
                b.grad = None  # no gradient for b in step 0
            if t == 1 and len(calls) == 0:
                b.grad.view(-1)[0] = float("inf")  # b's first x~-pass gradient is not finite
            calls.append(1)
            return loss

        wb = b.detach().clone()
        opt.step(cl)
        if t == 1:
            assert bool(opt.last_step_skipped)  # seen although b is outside the step's buckets
            assert torch.equal(b.detach(), wb)
    assert "grad_y" in opt.state[b]  # it joined after a completed step


def test_ssam_masks_stay_uint8_through_a_checkpoint():
    torch.manual_seed(0)
    model = MLP()
    opt = make("ssam", model.parameters())
    steps("ssam", model, opt, batches(2))
    other = make("ssam", copy.deepcopy(model).parameters())
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(other.state[p]["mask"].dtype == torch.uint8 for p in other.param_groups[0]["params"])


# ------------------------------------------------------------------ hyperparameters
def test_numpy_scalars_are_numbers():
    torch.manual_seed(0)
    outs = []
    for rho in (0.05, np.float32(0.05), np.float64(0.05)):
        torch.manual_seed(0)
        model = MLP()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=np.float64(0.1), momentum=0.9)
        assert type(opt.param_groups[0]["rho"]) is float
        steps("sam", model, opt, batches(2))
        outs.append(weights(model))
    # np.float32(0.05) is a different number than 0.05: it trains, within float32 rounding of rho
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[2]))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(outs[0], outs[1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=torch.tensor(-1.0)), "rho must be a finite number >= 0.0, got -1.0"),
        (dict(rho=torch.tensor(float("nan"))), "rho must be a finite number"),
        (dict(rho=torch.tensor([0.1, 0.2])), "1-element tensor"),
        (dict(rho=torch.tensor(True)), "real number"),
        (dict(eta=np.float64(-0.5)), "eta must be a finite number >= 0.0"),
    ],
)
def test_cpu_tensor_and_numpy_hyperparameters_are_validated(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SAM(MLP().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_friendly_lam_cpu_tensor_out_of_range():
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\], got 1.5"):
        sharpfused.FriendlySAM(MLP().parameters(), torch.optim.SGD, lam=torch.tensor(1.5), lr=0.1)


def test_looksam_second_step_after_a_reuse_step_says_so():
    torch.manual_seed(0)
    model = MLP()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    x, y = data("mlp", n=16)
    F.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    assert not opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="first_step\\(\\) returned False"):
        opt.second_step()


# ------------------------------------------------------------------ GSAM's rho schedule
@pytest.mark.parametrize("sched", ["onecycle", "warmup"])
def test_gsam_rho_stays_within_its_range_under_any_schedule(sched):
    torch.manual_seed(0)
    model = MLP()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.05, rho_min=0.01, lr=0.1, momentum=0.9)
    if sched == "onecycle":  # peak 0.5 > the construction lr: the scheduler's max_lr is lr_max
        s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12)
        peak = 0.5
    else:  # warm up to 3x the construction lr: clamped at rho_max
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(3.0, 0.2 + t / 2))
        peak = 0.1
    seen = []
    for x, y in batches(12):
        g = opt.param_groups[0]
        rho = GSAM.rho_t(g)
        frac = min(max(g["lr"] / peak, 0.0), 1.0)
        assert 0.01 <= rho <= 0.05 + 1e-12
        assert rho == pytest.approx(0.01 + 0.04 * frac)
        seen.append(rho)
        opt.step(closure("gsam", model, x, y))
        s.step()
    assert max(seen) > 0.049 and min(seen) < 0.02  # the schedule spans the range


# ------------------------------------------------------------------ complex parameters
class ComplexModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, dtype=torch.complex64))
        self.b = nn.Parameter(torch.randn(4, dtype=torch.complex64))

    def forward(self, x):
        return (x.to(torch.complex64) @ self.w + self.b).abs()


class RealView(nn.Module):
    """The same model with the complex parameters held as real (..., 2) tensors."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.view_as_real(c.w.detach()).clone())
        self.b = nn.Parameter(torch.view_as_real(c.b.detach()).clone())

    def forward(self, x):
        return (x.to(torch.complex64) @ torch.view_as_complex(self.w) + torch.view_as_complex(self.b)).abs()


@pytest.mark.parametrize("name", ["sam", "gsam", "ssam", "friendly"])
@pytest.mark.parametrize("base", ["sgd-damp", "adamw", "adam"])
def test_complex_parameters_step_as_their_real_views(name, base):
    torch.manual_seed(0)
    c = ComplexModel()
    r = RealView(c)
    oc, orr = make(name, c.parameters(), base), make(name, r.parameters(), base)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
        for m, o in ((c, oc), (r, orr)):
            torch.manual_seed(1)  # SSAM with a random mask draws the same numbers

            def cl(m=m, x=x, y=y):
                loss = F.mse_loss(m(x), y)
                loss.backward()
                return loss

            o.step(cl)
    for pc, pr in zip(c.parameters(), r.parameters()):
        assert torch.equal(torch.view_as_real(pc.detach()), pr.detach())


def test_asam_refuses_complex_parameters():
    with pytest.raises(ValueError, match="not defined for complex parameters"):
        SAM(ComplexModel().parameters(), torch.optim.SGD, adaptive=True, lr=0.1)


# ------------------------------------------------------------------ huge finite gradients
def test_a_float32_gradient_norm_past_float32s_range_is_a_visible_skip():
    """||g||^2 past 3.4e38 (||g|| > 1.8e19) overflows float32 accumulation: the step is skipped, as
    torch's own float32 norms overflow; ``last_step_skipped`` and ``skipped_steps`` say so."""
    model = MLP()
    opt = make("sam", model.parameters())
    x, y = data("mlp", n=16)
    w = weights(model)

    def huge():
        loss = F.cross_entropy(model(x), y) * 1e21
        loss.backward()
        return loss

    opt.step(huge)
    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w))
    # float64 parameters accumulate in float64: the same gradient steps
    m64 = MLP().double()
    o64 = make("sam", m64.parameters())

    def huge64():
        loss = F.cross_entropy(m64(x.double()), y) * 1e21
        loss.backward()
        return loss

    o64.step(huge64)
    assert not bool(o64.last_step_skipped) and int(o64.skipped_steps) == 0
