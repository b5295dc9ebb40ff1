"""torch.optim's conventions and what frameworks need from the optimizer itself: the pass indicator,
BatchNorm statistics once per step, step(closure) after first_step(), gradient accumulation as an
API, step hooks, schedulers on either object, zero_grad(set_to_none=False), hyperparameters changed
mid-run, functools.partial / numeric adaptive, nesting refused, repr."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import sharpfused
from sharpfused import SAM

from .helpers import ConvBN, data
from .test_algorithms import BASES, CASES, batches, build, closure_for, lower_bound, mlp
from .test_training import ALL, make

ONE_PASS_SECOND = ["sam", "asam", "gsam", "ssam", "friendly"]  # first_step / one backward / second_step


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ the pass indicator
@pytest.mark.parametrize("name", ALL)
def test_closure_sees_which_pass(name):
    model = mlp()
    opt = make(name, model)
    (x, y), seen = batches(1)[0], []
    inner = closure_for(name, model, x, y)

    def closure(*a, **k):
        seen.append(opt.perturbed)
        return inner(*a, **k)

    for _ in range(3):
        seen.clear()
        opt.step(closure)
        assert not opt.perturbed
        if name == "sampa":  # its two points: x~ = x + rho g_y / ||g_y|| (perturbed), then y
            assert seen[-2:] == [True, False]
            continue
        assert seen and seen[0] is False and (len(seen) == 1 or all(seen[1:]))
    if name == "sampa":
        return
    x0 = params_of(model)
    inner(**({"perturbation": True} if name == "bisam" else {}))
    opt.first_step(zero_grad=True)
    assert opt.perturbed and any(not torch.equal(a, b) for a, b in zip(x0, model.parameters()))
    opt.abort_step()
    assert not opt.perturbed and all(torch.equal(a, b) for a, b in zip(x0, model.parameters()))


# ------------------------------------------------------------------ BatchNorm once per step
def _bn_run(mode, name="sam", steps=3):
    torch.manual_seed(0)
    model = ConvBN().double()
    opt = make(name, model, bn_model=model)
    x, y = data("conv", n=8)
    x = x.double()

    def closure(**kw):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if mode == "closure":
            opt.step(closure)
        else:
            closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step(zero_grad=True)
    return model


@pytest.mark.parametrize("name", ["sam", "gsam", "xsam", "bsam", "looksam", "friendly", "sampa", "ssam"])
@pytest.mark.parametrize("mode", ["closure", "manual"])
def test_bn_statistics_advance_once_per_step(name, mode):
    if mode == "manual" and name in ("xsam", "bsam", "looksam", "sampa"):
        pytest.skip("their manual protocol has more calls (tested with the closure)")
    model = _bn_run(mode, name)
    assert int(model.bn.num_batches_tracked) == 3  # one update per step, not one per pass
    assert model.bn.track_running_stats  # turned back on after each step


def test_without_bn_model_every_pass_updates_the_statistics():
    torch.manual_seed(0)
    model = ConvBN().double()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data("conv", n=8)
    opt.step(lambda: F.cross_entropy(model(x.double()), y).backward())
    assert int(model.bn.num_batches_tracked) == 2


def test_bn_stats_restored_when_a_step_aborts():
    model = ConvBN().double()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, bn_model=model)
    x, y = data("conv", n=8)

    def closure():
        F.cross_entropy(model(x.double()), y).backward()
        raise RuntimeError("out of memory (simulated)")

    F.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure)
    assert model.bn.track_running_stats and not opt.perturbed


# ------------------------------------------------------------------ step(closure) after first_step
@pytest.mark.parametrize("name", ONE_PASS_SECOND + ["bisam", "looksam"])
def test_step_closure_after_first_step_finishes_the_step(name):
    """A framework's pattern: pass 1 and first_step() by hand, then optimizer.step(closure) with the
    second pass as the closure (Lightning's optimizer_step, GradScaler.step): same as step(closure)."""
    runs = []
    for split in (False, True):
        model = mlp()
        opt = make(name, model)
        for x, y in batches(3):
            closure = closure_for(name, model, x, y)
            if not split:
                opt.step(closure)
                continue
            if name == "bisam":
                closure(perturbation=True)
            else:
                closure()
            full = opt.first_step(zero_grad=True)
            if full is False:  # LookSAM's reuse step: done after one pass
                continue
            loss = opt.step(closure)
            assert loss is not None and not opt.perturbed
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------ accumulation as an API
@pytest.mark.parametrize("name", ALL)
def test_step_accumulated_equals_the_large_batch_step(name):
    """step_accumulated(loss_fn, micro_batches): every pass over every micro-batch; float64."""
    big, micro = mlp(), mlp()
    opt_big, opt_micro = make(name, big), make(name, micro)
    for x, y in batches(3):
        opt_big.step(closure_for(name, big, x, y))
        parts = [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]
        assert len(parts) > 1

        def loss_fn(mb, perturbation=False):
            xm, ym = mb
            return (lower_bound if (name == "bisam" and perturbation) else _ce)(micro, xm, ym)

        opt_micro.step_accumulated(loss_fn, parts)
    for a, b in zip(big.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def test_step_accumulated_needs_micro_batches():
    model = mlp()
    with pytest.raises(ValueError, match="at least one micro-batch"):
        make("sam", model).step_accumulated(lambda mb: None, [])


# ------------------------------------------------------------------ zero_grad(set_to_none=False)
@pytest.mark.parametrize("name", ["sam", "gsam", "xsam", "bsam", "looksam", "bisam"])
def test_zero_grad_in_place_then_step_closure_runs_both_passes(name):
    runs = []
    for set_to_none in (True, False):
        model = mlp()
        opt = make(name, model)
        for x, y in batches(3):
            opt.zero_grad(set_to_none=set_to_none)
            opt.step(closure_for(name, model, x, y))
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # a backward after the in-place zeroing counts as the first pass again
    model = mlp()
    opt = make("sam", model)
    (x, y), calls = batches(1)[0], []
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()

    def closure():
        calls.append(1)
        return F.cross_entropy(model(x), y).backward()

    assert opt.step(closure) is None and len(calls) == 1


# ------------------------------------------------------------------ hooks
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("mode", ["closure", "manual", "scaler-like", "grad-scaler"])
def test_step_hooks_fire_once_per_step(base, mode):
    model = mlp()
    cls, kw = (torch.optim.RMSprop, dict(lr=1e-3)) if base == "rmsprop" else BASES[base][:2]
    opt = SAM(model.parameters(), cls, rho=0.05, **kw)
    events = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o.perturbed)))
    h2 = opt.register_step_post_hook(lambda o, a, k: events.append(("post", o.perturbed)))
    h3 = opt.base_optimizer.register_step_pre_hook(lambda o, a, k: events.append(("base-pre", None)))
    h4 = opt.base_optimizer.register_step_post_hook(lambda o, a, k: events.append(("base-post", None)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for x, y in batches(2):
        closure = closure_for("sam", model, x, y)
        if mode == "closure":
            opt.step(closure)
        elif mode == "grad-scaler":
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            opt.first_step(zero_grad=True)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        else:
            closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.step() if mode == "scaler-like" else opt.second_step(zero_grad=True)
    one = [("pre", False), ("base-pre", None), ("base-post", None), ("post", False)]
    assert events == one * 2, events
    for h in (h1, h2, h3, h4):
        h.remove()
    events.clear()
    opt.step(closure_for("sam", model, *batches(1)[0]))
    assert events == []


def test_pre_hook_returning_arguments_is_refused_at_first_step():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.register_step_pre_hook(lambda o, a, k: (a, k))
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="return None"):
        opt.first_step()


@pytest.mark.parametrize("on", ["sam", "base"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_scheduler_on_either_object_warns_nothing_and_agrees(on, base):
    runs = []
    for target in ("sam", on):
        model = mlp()
        opt = make("sam", model, base)
        sched = torch.optim.lr_scheduler.StepLR(opt if target == "sam" else opt.base_optimizer, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for x, y in batches(3):
                opt.step(closure_for("sam", model, x, y))
                sched.step()
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------ hyperparameters changed mid-run
class _SGD(torch.optim.SGD):  # not torch.optim.SGD itself: takes the unfused path (torch's own step)
    pass


class _AdamW(torch.optim.AdamW):
    pass


CHANGES = {
    "sgd": [dict(momentum=0.0), dict(momentum=0.9), dict(nesterov=True), dict(weight_decay=1e-2),
            dict(momentum=0.0, nesterov=False), dict(momentum=0.5, dampening=0.3), dict(momentum=0.9, dampening=0.0)],
    "adamw": [dict(betas=(0.8, 0.99)), dict(weight_decay=0.0), dict(eps=1e-6), dict(betas=(0.9, 0.999))],
}


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_mid_run_hyperparameter_changes_equal_torch_optim(base):
    """The fused base step against torch's own step (a subclass is not fused) while the group's
    hyperparameters change between steps (momentum 0 -> 0.9 creates the buffer, as torch does)."""
    runs = []
    for fused in (True, False):
        model = mlp()
        cls = (torch.optim.SGD if fused else _SGD) if base == "sgd" else (torch.optim.AdamW if fused else _AdamW)
        kw = dict(lr=0.1, momentum=0.0) if base == "sgd" else dict(lr=1e-2)
        opt = SAM(model.parameters(), cls, rho=0.05, **kw)
        for t, (x, y) in enumerate(batches(len(CHANGES[base]) + 1)):
            if t:
                opt.param_groups[0].update(CHANGES[base][t - 1])
            opt.step(closure_for("sam", model, x, y))
        runs.append(params_of(model) + [v.clone() for s in opt.base_optimizer.state.values() for k, v in sorted(s.items())
                                        if torch.is_tensor(v)])
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ construction
def test_partial_base_and_numeric_adaptive_are_accepted():
    model = mlp()
    ref_model = copy.deepcopy(model)
    a = SAM(model.parameters(), functools.partial(torch.optim.SGD, momentum=0.9), lr=0.1, adaptive=1, rho=0.5)
    b = SAM(ref_model.parameters(), torch.optim.SGD, momentum=0.9, lr=0.1, adaptive=True, rho=0.5)
    assert isinstance(a.base_optimizer, torch.optim.SGD)
    for x, y in batches(2):
        a.step(closure_for("sam", model, x, y))
        b.step(closure_for("sam", ref_model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, adaptive=0)


@pytest.mark.parametrize("nested", ["class", "instance", "partial"])
def test_a_sharpfused_optimizer_as_base_is_refused(nested):
    model = mlp()
    inner = {"class": SAM, "instance": None, "partial": functools.partial(SAM, base_optimizer=torch.optim.SGD)}[nested]
    if nested == "instance":
        inner = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="cannot be the base of another"):
        sharpfused.GSAM(model.parameters(), inner, lr=0.1) if nested != "instance" else sharpfused.GSAM(
            model.parameters(), inner
        )


def test_repr_names_the_algorithm_backend_and_base():
    opt = make("gsam", mlp())
    text = repr(opt)
    assert text.startswith("GSAM(") and "backend='torch'" in text and "rho_max=0.08" in text
    assert "base_optimizer=SGD (" in text and "momentum: 0.9" in text


def test_every_case_is_covered():
    assert set(ALL) == {"sam", "asam", *CASES}
    assert callable(build)


def test_bisam_finishes_with_a_closure_that_takes_no_keyword():
    """A framework's closure wrapper (Lightning's) takes no ``perturbation`` keyword: after first_step()
    BiSAM calls it without one, and perturbation_pass says which loss the pass computes."""
    runs = []
    for plain in (True, False):
        model = mlp()
        opt = make("bisam", model)
        for x, y in batches(2):
            closure = closure_for("bisam", model, x, y)
            closure(perturbation=True)
            opt.first_step(zero_grad=True)
            if plain:
                opt.step(closure)
            else:
                def bare(closure=closure, opt=opt):
                    return closure(perturbation=opt.perturbation_pass)

                opt.step(bare)
            assert opt.perturbation_pass is None
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", ALL)
def test_step_attributes_read_before_the_first_step(name):
    """What a step leaves on the optimizer (kept on ``opt._run``) reads as None before any step, as
    it did when these were attributes set in ``__init__``; ``perturbed`` is False."""
    opt = make(name, mlp())
    assert opt.perturbed is False
    for attr in ("last_step_skipped", "skipped_steps", "last_perturbed_loss", "surrogate_gap", "last_min_loss",
                 "last_y_loss", "perturbation_pass"):
        if hasattr(type(opt), attr):
            assert getattr(opt, attr) is None, attr
