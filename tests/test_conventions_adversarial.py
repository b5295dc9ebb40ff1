"""Adversarial tests of the README's conventions: the pass indicator ``opt.perturbed``,
``bn_model=``, ``step(closure)`` after ``first_step()``, ``step_accumulated``, ``zero_grad``
zeros, step hooks, schedulers, mid-run hyperparameter changes against torch.optim's own step,
base-optimizer forms, ``repr``, combined with exceptions, checkpoints, copies and GradScaler.

Written from the README and the class docstrings only; every test states what a user expects.
"""

import copy
import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import sharpfused

F = nn.functional


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only spin (on a loaded 2-core box this file took 10x longer)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- fixtures
def _model(seed=0, dtype=torch.float64, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


_g = torch.Generator().manual_seed(123)
X = torch.randn(16, 4, dtype=torch.float64, generator=_g)
Y = torch.randint(0, 3, (16,), generator=_g)


def _loss(m, x=X, y=Y):
    return F.cross_entropy(m(x.to(next(m.parameters()).dtype)).double(), y)


ALGS = {
    "SAM": lambda p, **k: sharpfused.SAM(p, torch.optim.SGD, lr=0.1, **{"momentum": 0.9, **k}),
    "ASAM": lambda p, **k: sharpfused.SAM(p, torch.optim.SGD, lr=0.1, adaptive=True, rho=0.5, **k),
    "GSAM": lambda p, **k: sharpfused.GSAM(p, torch.optim.SGD, lr=0.1, **k),
    "BiSAM": lambda p, **k: sharpfused.BiSAM(p, torch.optim.SGD, lr=0.1, **k),
    "XSAM": lambda p, **k: sharpfused.XSAM(p, torch.optim.SGD, lr=0.1, **k),
    "XSAM2": lambda p, **k: sharpfused.XSAM(p, torch.optim.SGD, lr=0.1, steps=2, **k),
    "SAMPa": lambda p, **k: sharpfused.SAMPa(p, torch.optim.SGD, lr=0.1, **k),
    "BSAM": lambda p, **k: sharpfused.BSAM(p, torch.optim.SGD, lr=0.1, **k),
    "SSAM": lambda p, **k: sharpfused.SSAM(p, torch.optim.SGD, lr=0.1, **k),
    "LookSAM": lambda p, **k: sharpfused.LookSAM(p, torch.optim.SGD, lr=0.1, k=2, **k),
    "FriendlySAM": lambda p, **k: sharpfused.FriendlySAM(p, torch.optim.SGD, lr=0.1, **k),
}
MANUAL = [n for n in ALGS if n != "SAMPa"]  # SAMPa offers step(closure) only


def _closure(name, m, opt, log=None):
    """The closure each algorithm's docstring asks for (BiSAM's takes ``perturbation``, here the same
    loss for both passes); ``log`` records ``opt.perturbed``."""

    def c(perturbation=True):
        if log is not None:
            log.append(opt.perturbed)
        loss = _loss(m)
        loss.backward()
        return loss

    return c


def _manual_step(name, m, opt, log=None):
    """One step by hand, following each class's documented protocol."""
    _loss(m).backward()
    due = opt.first_step(zero_grad=True)
    if log is not None:
        log.append((opt.perturbed, m[1].track_running_stats))
    if name == "LookSAM" and due is False:
        return
    if name == "XSAM2":
        _loss(m).backward()
        opt.ascent_step(zero_grad=True)
    _loss(m).backward()
    if name == "BSAM":
        opt.bilateral_step(zero_grad=True)
        if log is not None:
            log.append((opt.perturbed, m[1].track_running_stats))
        _loss(m).backward()
    opt.second_step(zero_grad=True)
    if log is not None:
        log.append((opt.perturbed, m[1].track_running_stats))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    return a == b


class _SGD(torch.optim.SGD):
    """Not fused (a subclass): runs torch's own SGD step -- the oracle."""


class _AdamW(torch.optim.AdamW):
    """Not fused (a subclass): runs torch's own AdamW step -- the oracle."""


# ============================================================================ FINDINGS
# (these fail now)


@pytest.mark.parametrize("name", ["BSAM", "XSAM2"])
def test_step_closure_after_first_step_completes_multi_pass_algorithms(name):
    """README: "After first_step(), step(closure) runs the closure as the last pass and completes
    the step (the form a framework's optimizer step takes)". For BSAM and XSAM(steps=2) it raises
    an error about ``second_step()`` (which the user never called) and leaves the weights at the
    perturbed point. A user expects step(closure) to run the passes still due and give the same
    step as step(closure) alone. (``_finish_perturbed`` runs the closure once, then calls
    ``second_step()`` outside the abort guard, so the failure also leaves the step half-done.)"""
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    ref = _model()
    ref_opt = ALGS[name](ref.parameters(), bn_model=ref)
    for _ in range(2):
        _loss(m).backward()
        opt.first_step(zero_grad=True)
        opt.step(_closure(name, m, opt))
        ref_opt.step(_closure(name, ref, ref_opt))
        assert not opt.perturbed and m[1].track_running_stats
    assert _same(m.state_dict().values(), ref.state_dict().values())


def test_base_optimizer_zero_grad_set_to_none_false_is_not_a_first_pass():
    """README: "the zeros left by zero_grad(set_to_none=False) do not count" as a first pass.
    ``opt.base_optimizer`` shares the param groups, and frameworks/user code often zero through
    it; its zeros are taken as the first-pass gradient: the closure runs once, the perturbation
    is built from a zero gradient and SAM silently degrades to a plain base step. Expected: the
    same two passes as after ``opt.zero_grad(set_to_none=False)``. (Only the SAM object's own
    zero_grad records the zeros; ``model.zero_grad(set_to_none=False)`` has the same effect.)"""
    m = _model(bn=False)
    opt = sharpfused.SAM(m.parameters(), lr=0.1)
    _loss(m).backward()
    opt.base_optimizer.zero_grad(set_to_none=False)
    log = []
    out = opt.step(_closure("SAM", m, opt, log))
    assert log == [False, True]
    assert out is not None


def test_repr_shows_global_hyperparameters():
    """``repr(opt)`` lists the per-group hyperparameters but drops the global ones given at
    construction: XSAM's ``steps``, LookSAM's ``k``, SSAM's ``mask`` and ``mask_every``. A user
    printing the optimizer to log the run configuration expects every constructor setting."""
    m = _model()
    cases = [
        (sharpfused.XSAM(m.parameters(), lr=0.1, steps=3), ["steps=3"]),
        (sharpfused.LookSAM(m.parameters(), lr=0.1, k=7), ["k=7"]),
        (sharpfused.SSAM(m.parameters(), lr=0.1, mask="random", mask_every=17), ["mask='random'", "mask_every=17"]),
    ]
    for opt, needles in cases:
        r = repr(opt)
        for needle in needles:
            assert needle in r, (type(opt).__name__, needle, r.splitlines()[0])


def test_adaptive_accepts_numpy_bool():
    """README: hyperparameters "may be numbers (numpy scalars included)", and ``adaptive=0/1``
    is accepted, as is ``np.int64(1)``; but ``adaptive=np.True_`` (what a config parsed through
    numpy/pandas gives) raises TypeError "must be True or False (or 0 / 1), got np.True_" (the
    check looks for the type name ``bool_``; under numpy 2 it is ``bool``). Setting
    ``group["adaptive"] = np.True_`` mid-run is accepted and works, so construction is the odd one."""
    m = _model()
    opt = sharpfused.SAM(m.parameters(), lr=0.1, adaptive=np.True_, rho=0.5)
    mr = _model()
    ref = sharpfused.SAM(mr.parameters(), lr=0.1, adaptive=True, rho=0.5)
    for _ in range(2):
        opt.step(_closure("SAM", m, opt))
        ref.step(_closure("SAM", mr, ref))
    assert _same(m.parameters(), mr.parameters())


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_sampa_scheduler_on_base_optimizer_no_warning(base):
    """README: "an LR scheduler attached to either drives both (no warning either way)". With
    SAMPa and a fused base (SGD/AdamW), a scheduler attached to ``opt.base_optimizer`` warns
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`" at its first step:
    SAMPa.step marks only the SAM object as stepped (``_opt_called``), not the base optimizer
    whose ``step()`` the fused path skips (the other algorithms do mark it)."""
    m = _model()
    opt = sharpfused.SAMPa(m.parameters(), base, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, 1, 0.5)
        for _ in range(3):
            opt.step(_closure("SAMPa", m, opt))
            sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_sampa_scheduler_on_sam_object_no_warning():
    m = _model()
    opt = sharpfused.SAMPa(m.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        for _ in range(2):
            opt.step(_closure("SAMPa", m, opt))
            sch.step()


# ============================================================================ GUARDS
# (attacks that held; worth keeping)


@pytest.mark.parametrize("name", list(ALGS))
def test_bn_model_step_closure_advances_once_and_perturbed_sequence(name):
    """bn_model: BatchNorm statistics advance once per step in step(closure) for every
    algorithm (extra passes included); ``opt.perturbed`` is False in the first pass, True at the
    perturbed point(s), False after the step; track_running_stats is restored."""
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    expected = {
        "XSAM2": [False, True, True],
        "BSAM": [False, True, True],
        "SAMPa": [True, False],
    }.get(name, [False, True])
    for s in range(3):
        log = []
        opt.step(_closure(name, m, opt, log))
        assert int(m[1].num_batches_tracked) == s + 1
        assert m[1].track_running_stats and not opt.perturbed
        if name == "LookSAM" and s == 1:
            assert log == [False]  # a reuse step: one pass
        elif name == "SAMPa" and s == 0:
            assert log == [False, True, False]  # the first step's extra pass at x_0
        else:
            assert log == expected
        assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name", MANUAL)
def test_bn_model_manual_protocol(name):
    """By hand: frozen from first_step() to second_step() (across bilateral_step/ascent_step),
    running again after; LookSAM's reuse step (first_step() returns False) never freezes."""
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    for s in range(3):
        log = []
        _manual_step(name, m, opt, log)
        assert int(m[1].num_batches_tracked) == s + 1
        if name == "LookSAM" and s == 1:
            assert log == [(False, True)]
        else:
            assert log[0] == (True, False) and log[-1] == (False, True)
            assert all(entry == (True, False) for entry in log[1:-1])


def test_bn_model_running_stats_come_from_the_first_pass():
    """The running statistics of a SAM step with bn_model are those of one forward at w."""
    m = _model()
    ref = copy.deepcopy(m)
    ref(X)
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=m)
    opt.step(_closure("SAM", m, opt))
    assert torch.equal(m[1].running_mean, ref[1].running_mean)
    assert torch.equal(m[1].running_var, ref[1].running_var)


def test_bn_model_keeps_a_user_disabled_layer_disabled_and_nests_with_frozen_bn_stats():
    """A layer the user set to track_running_stats=False stays False after the step; the README's
    manual frozen_bn_stats / disable+enable inside a bn_model step leave it enabled at the end."""
    m = _model()
    m[1].track_running_stats = False
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=m)
    opt.step(_closure("SAM", m, opt))
    _manual_step("SAM", m, opt)
    assert m[1].track_running_stats is False

    m = _model()
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=m)
    _loss(m).backward()
    opt.first_step(zero_grad=True)
    with sharpfused.frozen_bn_stats(m):
        _loss(m).backward()
    opt.second_step(zero_grad=True)
    _loss(m).backward()
    opt.first_step(zero_grad=True)
    sharpfused.disable_running_stats(m)
    _loss(m).backward()
    sharpfused.enable_running_stats(m)
    opt.second_step(zero_grad=True)
    assert m[1].track_running_stats and int(m[1].num_batches_tracked) == 2


def test_bn_model_rejects_non_modules():
    for bad in ([_model()], _model().parameters(), "model"):
        with pytest.raises(TypeError):
            sharpfused.SAM(_model().parameters(), lr=0.1, bn_model=bad)


@pytest.mark.parametrize("name", [n for n in MANUAL if n not in ("BSAM", "XSAM2", "LookSAM")])
def test_step_closure_after_first_step_equals_step_closure(name):
    """first_step() then step(closure): the closure runs once, at the perturbed point, and the
    step equals step(closure) alone (weights and BN buffers bit-identical); grads cleared."""
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    ref = _model()
    ref_opt = ALGS[name](ref.parameters(), bn_model=ref)
    for _ in range(3):
        log = []
        _loss(m).backward()
        opt.first_step(zero_grad=True)
        opt.step(_closure(name, m, opt, log))
        ref_opt.step(_closure(name, ref, ref_opt))
        assert log == [True] and not opt.perturbed
        assert all(p.grad is None for p in m.parameters())
    assert _same(m.state_dict().values(), ref.state_dict().values())


def test_looksam_step_closure_after_due_first_step_equals_step_closure():
    m = _model()
    opt = ALGS["LookSAM"](m.parameters(), bn_model=m)
    ref = _model()
    ref_opt = ALGS["LookSAM"](ref.parameters(), bn_model=ref)
    for _ in range(4):
        _loss(m).backward()
        if opt.first_step(zero_grad=True):
            opt.step(_closure("LookSAM", m, opt))
        opt.zero_grad()
        ref_opt.step(_closure("LookSAM", ref, ref_opt))
    assert _same(m.state_dict().values(), ref.state_dict().values())


@pytest.mark.parametrize("name", list(ALGS))
def test_zero_grad_set_to_none_false_is_not_a_first_pass(name):
    m = _model()
    opt = ALGS[name](m.parameters())
    _loss(m).backward()
    opt.zero_grad(set_to_none=False)
    log = []
    opt.step(_closure(name, m, opt, log))
    assert len(log) >= 2


@pytest.mark.parametrize("name", list(ALGS))
def test_step_hooks_once_per_step(name):
    """Pre-hook, base pre/post, post-hook: once each per step, in that order, for step(closure)
    and the manual protocol."""
    m = _model()
    opt = ALGS[name](m.parameters())
    ev = []
    opt.register_step_pre_hook(lambda o, a, k: ev.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: ev.append("post"))
    opt.base_optimizer.register_step_pre_hook(lambda o, a, k: ev.append("bpre"))
    opt.base_optimizer.register_step_post_hook(lambda o, a, k: ev.append("bpost"))
    opt.step(_closure(name, m, opt))
    assert ev == ["pre", "bpre", "bpost", "post"]
    if name in MANUAL:
        ev.clear()
        _manual_step(name, m, opt)
        assert ev == ["pre", "bpre", "bpost", "post"]


@pytest.mark.parametrize("name", ["SAM", "GSAM", "SSAM", "FriendlySAM", "XSAM", "BiSAM"])
def test_grad_scaler_cpu_hooks_skip_and_bn(name):
    """scaler.step(opt) after first_step(): hooks once per step, an inf second pass skips the
    step (weights bit-exact, scale backs off), BN advances once per step."""
    m = _model(dtype=torch.float32)
    opt = ALGS[name](m.parameters(), bn_model=m)
    ev = []
    opt.register_step_pre_hook(lambda o, a, k: ev.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: ev.append("post"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    kw = {"grad_scaler": scaler} if name == "FriendlySAM" else {}
    for s in range(3):
        w0 = [p.detach().clone() for p in m.parameters()]
        scaler.scale(_loss(m)).backward()
        opt.first_step(zero_grad=True, **kw)
        loss = _loss(m) * (float("inf") if s == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scale = scaler.get_scale()
        scaler.update()
        opt.zero_grad()
        if s == 1:
            assert bool(opt.last_step_skipped) and _same(w0, m.parameters())
            assert scaler.get_scale() == scale / 2
        assert not opt.perturbed and m[1].track_running_stats
    assert ev == ["pre", "post"] * 3
    assert int(m[1].num_batches_tracked) == 3


def test_grad_scaler_inf_on_first_step_creates_no_state():
    m = _model(dtype=torch.float32)
    opt = sharpfused.SAM(m.parameters(), lr=0.1, momentum=0.9, bn_model=m)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    w0 = [p.detach().clone() for p in m.parameters()]
    scaler.scale(_loss(m)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(m) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    assert _same(w0, m.parameters()) and len(opt.base_optimizer.state) == 0
    assert m[1].track_running_stats


def test_friendlysam_scaler_without_grad_scaler_aborts_and_restores_bn():
    m = _model(dtype=torch.float32)
    opt = sharpfused.FriendlySAM(m.parameters(), lr=0.1, bn_model=m)
    opt.step(_closure("FriendlySAM", m, opt))
    scaler = torch.amp.GradScaler("cpu")
    w0 = [p.detach().clone() for p in m.parameters()]
    scaler.scale(_loss(m)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(m)).backward()
    with pytest.raises(RuntimeError, match="grad_scaler"):
        scaler.step(opt)
    assert not opt.perturbed and m[1].track_running_stats and _same(w0, m.parameters())


@pytest.mark.parametrize("on_base", [False, True])
@pytest.mark.parametrize("name", ["SAM", "GSAM", "LookSAM", "BSAM"])
def test_scheduler_on_sam_or_base_no_warning(name, on_base):
    m = _model()
    opt = ALGS[name](m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = torch.optim.lr_scheduler.StepLR(opt.base_optimizer if on_base else opt, 1, 0.5)
        for _ in range(3):
            opt.step(_closure(name, m, opt))
            sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def _traj(base, changes, alg, n=6, **kw):
    m = _model()
    opt = getattr(sharpfused, alg)(m.parameters(), base, **kw)
    out = []
    for s in range(n):
        for k, v in changes.get(s, {}).items():
            for g in opt.param_groups:
                g[k] = v() if callable(v) else v
        opt.step(_closure(alg, m, opt))
        out.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    return out


SGD_CHANGES = [
    {2: {"momentum": 0.9}},
    {2: {"momentum": 0.9}, 4: {"nesterov": True}},
    {0: {"momentum": 0.9}, 2: {"dampening": 0.5}},
    {2: {"momentum": 0.9, "dampening": 0.5}},
    {0: {"momentum": 0.9}, 3: {"weight_decay": 0.1}},
    {0: {"momentum": 0.9, "nesterov": True}, 3: {"nesterov": False}},
    {0: {"momentum": 0.9}, 3: {"momentum": 0.0}, 4: {"momentum": 0.5}},
    {1: {"lr": 0.01}, 2: {"maximize": True}},
    {0: {"momentum": 0.9}, 2: {"lr": lambda: torch.tensor(0.05, dtype=torch.float64)}},
]


@pytest.mark.parametrize("alg", ["SAM", "LookSAM", "SAMPa"])
def test_sgd_hyperparameters_changed_mid_run_match_torch(alg):
    for ch in SGD_CHANGES:
        a = _traj(torch.optim.SGD, ch, alg, lr=0.1)
        b = _traj(_SGD, ch, alg, lr=0.1)
        d = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert d < 1e-12, (ch, d)


@pytest.mark.parametrize("alg", ["SAM", "LookSAM"])
def test_adamw_hyperparameters_changed_mid_run_match_torch(alg):
    # float64; differences of ~1e-11 come from eps=1e-8 amplifying 1e-17 gradient differences
    for ch in [{2: {"betas": (0.5, 0.9)}}, {2: {"weight_decay": 0.3}}, {1: {"lr": 0.001}, 3: {"eps": 1e-3}},
               {2: {"maximize": True}}]:
        a = _traj(torch.optim.AdamW, ch, alg, lr=0.01)
        b = _traj(_AdamW, ch, alg, lr=0.01)
        d = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert d < 1e-8, (ch, d)


def test_base_optimizer_forms_and_refusals():
    m = _model()
    opt = sharpfused.SAM(m.parameters(), functools.partial(torch.optim.SGD, momentum=0.9), lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups is opt.base_optimizer.param_groups
    for base in (sharpfused.SAM, sharpfused.GSAM, functools.partial(sharpfused.SAM, rho=0.1),
                 sharpfused.SAM(m.parameters(), lr=0.1)):
        with pytest.raises(TypeError, match="sharpfused"):
            sharpfused.SAM(m.parameters(), base, lr=0.1)
    for a, b in ((1, True), (0, False)):
        m1, m2 = _model(), _model()
        o1 = sharpfused.SAM(m1.parameters(), lr=0.1, rho=0.5, adaptive=a)
        o2 = sharpfused.SAM(m2.parameters(), lr=0.1, rho=0.5, adaptive=b)
        for _ in range(2):
            o1.step(_closure("SAM", m1, o1))
            o2.step(_closure("SAM", m2, o2))
        assert _same(m1.parameters(), m2.parameters())
    for bad in (2, 0.5, "yes", None):
        with pytest.raises(TypeError):
            sharpfused.SAM(m.parameters(), lr=0.1, adaptive=bad)


@pytest.mark.parametrize("name", list(ALGS))
def test_closure_exception_with_bn_model_aborts_everything(name):
    npass = {"XSAM2": 3, "BSAM": 3}.get(name, 2)
    for fail_at in range(npass):
        m = _model()
        opt = ALGS[name](m.parameters(), bn_model=m)
        opt.step(_closure(name, m, opt))
        if name == "LookSAM":
            opt.step(_closure(name, m, opt))  # next one is a full step
        w0 = [p.detach().clone() for p in m.parameters()]
        s0 = copy.deepcopy(opt.state_dict())
        inner = _closure(name, m, opt)
        calls = [0]

        def c(*a, calls=calls, fail_at=fail_at, inner=inner, **k):
            calls[0] += 1
            if calls[0] - 1 == fail_at:
                raise KeyError("boom")
            return inner(*a, **k)

        with pytest.raises(KeyError):
            opt.step(c)
        assert _same(w0, m.parameters()) and _tree_equal(s0, opt.state_dict())
        assert m[1].track_running_stats and not opt.perturbed
        assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name", [n for n in MANUAL if n != "LookSAM"])
def test_deepcopy_and_pickle_mid_step_with_bn_model_continue_bit_identically(name):
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    opt.step(_closure(name, m, opt))
    _loss(m).backward()
    opt.first_step(zero_grad=True)
    m2, o2 = copy.deepcopy((m, opt))
    m3, o3 = pickle.loads(pickle.dumps((m, opt)))
    for mm, oo in ((m2, o2), (m3, o3)):
        assert oo.perturbed and mm[1].track_running_stats is False
    for mm, oo in ((m, opt), (m2, o2), (m3, o3)):
        if name == "XSAM2":
            _loss(mm).backward()
            oo.ascent_step(zero_grad=True)
        _loss(mm).backward()
        if name == "BSAM":
            oo.bilateral_step(zero_grad=True)
            _loss(mm).backward()
        oo.second_step(zero_grad=True)
        oo.step(_closure(name, mm, oo))
        assert mm[1].track_running_stats
    for mm in (m2, m3):
        assert _same(m.state_dict().values(), mm.state_dict().values())


@pytest.mark.parametrize("name", ["SAM", "GSAM", "BSAM", "FriendlySAM"])
def test_state_dict_refused_mid_step_and_load_aborts_with_bn(name):
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    opt.step(_closure(name, m, opt))
    sd = copy.deepcopy(opt.state_dict())
    w = [p.detach().clone() for p in m.parameters()]
    _loss(m).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    opt.load_state_dict(sd)
    assert not opt.perturbed and m[1].track_running_stats and _same(w, m.parameters())


@pytest.mark.parametrize("name", list(ALGS))
def test_state_dict_round_trip_between_steps_with_bn_model(name):
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    for _ in range(2):
        opt.step(_closure(name, m, opt))
    m2 = _model(seed=5)
    m2.load_state_dict(copy.deepcopy(m.state_dict()))
    o2 = ALGS[name](m2.parameters(), bn_model=m2)
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        opt.step(_closure(name, m, opt))
        o2.step(_closure(name, m2, o2))
    assert _same(m.state_dict().values(), m2.state_dict().values())


MB = [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 16, 4)]


@pytest.mark.parametrize("name", [n for n in ALGS if n != "BiSAM"])
def test_step_accumulated_equals_large_batch(name):
    m = _model(bn=False)
    opt = ALGS[name](m.parameters())
    ref = _model(bn=False)
    ref_opt = ALGS[name](ref.parameters())
    for _ in range(3):
        opt.step_accumulated(lambda b: F.cross_entropy(m(b[0]), b[1]), iter(MB))
        ref_opt.step(_closure(name, ref, ref_opt))
    d = max((a - b).abs().max().item() for a, b in zip(m.parameters(), ref.parameters()))
    assert d < 1e-10


def test_step_accumulated_bn_model_and_exception():
    m = _model()
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=m)
    opt.step_accumulated(lambda b: F.cross_entropy(m(b[0]), b[1]), MB)
    assert int(m[1].num_batches_tracked) == len(MB)
    w0 = [p.detach().clone() for p in m.parameters()]
    calls = [0]

    def lf(b):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyError("boom")
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.raises(KeyError):
        opt.step_accumulated(lf, MB)
    assert _same(w0, m.parameters()) and not opt.perturbed and m[1].track_running_stats
    with pytest.raises(ValueError):
        opt.step_accumulated(lf, [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["SAM", "FriendlySAM"])
def test_low_precision_deepcopy_with_bn_continues_bit_identically(name, dtype):
    m = _model(dtype=dtype)
    opt = ALGS[name](m.parameters(), bn_model=m)
    opt.step(_closure(name, m, opt))
    m2, o2 = copy.deepcopy((m, opt))
    for _ in range(2):
        opt.step(_closure(name, m, opt))
        o2.step(_closure(name, m2, o2))
    assert _same(m.state_dict().values(), m2.state_dict().values())


@pytest.mark.parametrize("name", ["SAM", "GSAM", "BSAM", "FriendlySAM", "XSAM2", "SAMPa"])
def test_add_param_group_mid_run_matches_torch_oracle(name):
    def run(base):
        m = _model()
        extra = nn.Linear(3, 3).double()
        opt = getattr(sharpfused, {"XSAM2": "XSAM"}.get(name, name))(
            m.parameters(), base, lr=0.1, momentum=0.9, **({"steps": 2} if name == "XSAM2" else {}))

        def c():
            loss = F.cross_entropy(extra(m(X)), Y)
            loss.backward()
            return loss

        opt.step(c)
        opt.add_param_group({"params": extra.parameters(), "lr": 0.05, "weight_decay": 0.1})
        for _ in range(3):
            opt.step(c)
        return list(m.parameters()) + list(extra.parameters())

    torch.manual_seed(1)
    a = run(torch.optim.SGD)
    torch.manual_seed(1)
    b = run(_SGD)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) < 1e-12


@pytest.mark.parametrize("name", ["SAM", "GSAM", "FriendlySAM", "SSAM"])
def test_base_exception_in_closure_after_first_step_aborts(name):
    """first_step() then step(closure) whose closure raises (even KeyboardInterrupt): the step
    is aborted, weights back at w, no state moved, BN tracking restored, gradients cleared."""
    m = _model()
    opt = ALGS[name](m.parameters(), bn_model=m)
    opt.step(_closure(name, m, opt))
    w0 = [p.detach().clone() for p in m.parameters()]
    s0 = copy.deepcopy(opt.state_dict())
    _loss(m).backward()
    opt.first_step(zero_grad=True)

    def c():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(c)
    assert _same(w0, m.parameters()) and _tree_equal(s0, opt.state_dict())
    assert not opt.perturbed and m[1].track_running_stats
    assert all(p.grad is None for p in m.parameters())


def test_bn_model_follows_user_toggles_mid_run_and_xsam_search_alpha():
    m = _model()
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=m)
    opt.step(_closure("SAM", m, opt))
    m[1].track_running_stats = False
    opt.step(_closure("SAM", m, opt))
    assert m[1].track_running_stats is False
    m[1].track_running_stats = True
    opt.step(_closure("SAM", m, opt))
    assert m[1].track_running_stats is True and int(m[1].num_batches_tracked) == 2

    m = _model()
    opt = sharpfused.XSAM(m.parameters(), lr=0.1, bn_model=m)
    _loss(m).backward()
    opt.first_step(zero_grad=True)
    _loss(m).backward()
    stats = m[1].running_mean.clone()
    opt.search_alpha(lambda: _loss(m))  # forward passes at perturbed points: BN frozen
    assert torch.equal(stats, m[1].running_mean) and int(m[1].num_batches_tracked) == 1
    opt.second_step(zero_grad=True)
    assert m[1].track_running_stats


def test_torch_compile_model_with_bn_model():
    """bn_model=torch.compile(model): the compiled graph follows the frozen/unfrozen BN flag
    (stats advance once per step) and training matches eager."""
    m = _model(dtype=torch.float32)
    cm = torch.compile(m)
    ref = _model(dtype=torch.float32)
    opt = sharpfused.SAM(m.parameters(), lr=0.1, bn_model=cm)
    ref_opt = sharpfused.SAM(ref.parameters(), lr=0.1, bn_model=ref)
    x = X.float()
    for _ in range(2):
        for mm, oo in ((cm, opt), (ref, ref_opt)):
            def c(mm=mm):
                loss = F.cross_entropy(mm(x), Y)
                loss.backward()
                return loss

            oo.step(c)
    assert int(m[1].num_batches_tracked) == 2 and m[1].track_running_stats
    for a, b in zip(m.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
