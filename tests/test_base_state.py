"""The base optimizer's state and param groups replaced from outside mid-run: a torch state dict
loaded into ``opt.base_optimizer``, its state cleared, an entry deleted. The fused step must then
read and write the new state exactly as torch's own step would (found by an outside trial: the
fused step kept writing the old tensors)."""

from __future__ import annotations

import copy

import pytest
import torch

import sharpfused

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, weight_decay=0.01)),
}


def _loss(ws):
    return sum((w**2 * torch.arange(1, w.numel() + 1, dtype=w.dtype).view_as(w)).sum() for w in ws)


def _sam_step(ws, opt):
    _loss(ws).backward()
    opt.first_step(zero_grad=True)
    _loss(ws).backward()
    opt.second_step(zero_grad=True)


def _ref_step(ws, base, rho=0.05):
    """SAM in plain torch: perturb, second gradient at w + e, restore exactly, base.step()."""
    _loss(ws).backward()
    gs = [w.grad.clone() for w in ws]
    norm = torch.sqrt(sum((g**2).sum() for g in gs))
    saved = [w.detach().clone() for w in ws]
    with torch.no_grad():
        for w, g in zip(ws, gs):
            w.add_(g * (rho / (norm + 1e-12)))
    for w in ws:
        w.grad = None
    _loss(ws).backward()
    with torch.no_grad():
        for w, s in zip(ws, saved):
            w.copy_(s)
    base.step()
    for w in ws:
        w.grad = None


def _both_steps(ws, opt, rs, ref, n=1):
    """``n`` steps of the sharpfused SAM and of the plain-torch reference, in turn."""
    for _ in range(n):
        _sam_step(ws, opt)
        _ref_step(rs, ref)


def _pair(name):
    cls, kw = BASES[name]
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    rs = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    return ws, sharpfused.SAM(ws, cls, rho=0.05, **kw), rs, cls(rs, **kw)


def _close(a, b):
    return all(torch.allclose(x, y, rtol=1e-12, atol=1e-14) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(BASES))
def test_base_state_dict_loaded_mid_run_is_used(name):
    ws, opt, rs, ref = _pair(name)
    _both_steps(ws, opt, rs, ref, 2)
    sd = copy.deepcopy(ref.state_dict())
    for s in sd["state"].values():  # a different state: the next steps must start from it
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                s[k] = v * 3 + 0.5
    opt.base_optimizer.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    _both_steps(ws, opt, rs, ref, 3)
    assert _close(ws, rs)
    got, want = opt.base_optimizer.state_dict()["state"], ref.state_dict()["state"]
    for i in want:
        for k in want[i]:
            assert torch.allclose(torch.as_tensor(got[i][k]), torch.as_tensor(want[i][k]), rtol=1e-12), (name, k)
    # the optimizer's groups are the base's (a scheduler on opt drives the base), rho kept
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.param_groups[0]["rho"] == 0.05


@pytest.mark.parametrize("name", list(BASES))
def test_base_state_cleared_or_deleted_mid_run_restarts_like_torch(name):
    ws, opt, rs, ref = _pair(name)
    _both_steps(ws, opt, rs, ref, 2)
    opt.base_optimizer.state.clear()
    ref.state.clear()
    _both_steps(ws, opt, rs, ref)
    del opt.base_optimizer.state[ws[1]]
    del ref.state[rs[1]]
    _both_steps(ws, opt, rs, ref, 2)
    assert _close(ws, rs)
    assert len(opt.base_optimizer.state) == len(ref.state) == 2


def test_base_hyperparameters_loaded_are_used_and_scheduler_follows():
    ws, opt, rs, ref = _pair("sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sd = ref.state_dict()
    sd["param_groups"][0]["lr"] = 0.02
    opt.base_optimizer.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    for _ in range(3):
        _sam_step(ws, opt)
        sched.step()
        _ref_step(rs, ref)
        ref_sched.step()
    assert _close(ws, rs)
    assert opt.base_optimizer.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


def test_base_load_between_the_passes_refused_and_after_a_copy_still_watched():
    ws, opt, _, _ = _pair("sgd")
    _sam_step(ws, opt)
    sd = copy.deepcopy(opt.base_optimizer.state_dict())
    _loss(ws).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.base_optimizer.load_state_dict(sd)
    _loss(ws).backward()
    opt.second_step(zero_grad=True)
    twin = copy.deepcopy(opt)  # torch.optim drops hooks in a copy: the copy registers them again
    twin.base_optimizer.load_state_dict(sd)
    assert twin.param_groups is twin.base_optimizer.param_groups


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adagrad], ids=["fused", "unfused"])
def test_base_step_hooks_fire_once_on_a_skipped_step_fused_or_not(cls):
    w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = sharpfused.SAM([w], cls, lr=0.1)
    calls = []
    opt.base_optimizer.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.base_optimizer.register_step_post_hook(lambda *a: calls.append("post"))
    _loss([w]).backward()
    opt.first_step(zero_grad=True)
    w.grad = torch.full_like(w, float("inf"))
    opt.second_step(zero_grad=True)
    assert calls == ["pre", "post"] and bool(opt.last_step_skipped)


@pytest.mark.parametrize("name", list(BASES))
def test_a_parameter_joining_later_is_stepped_fused_like_torch(name):
    """A bucket whose parameters' states differ (one got its first gradient later, so it has no
    state or another step count) takes the fused step per layout -- equal to torch's own step, and
    base_optimizer.step() is never called (it ran unfused before: in fp16 another result)."""
    cls, kw = BASES[name]
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    rs = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    opt, ref = sharpfused.SAM(ws, cls, rho=0.05, **kw), cls(rs, **kw)

    def unfused(*a, **k):
        raise AssertionError("base_optimizer.step() called: the step ran unfused")

    opt.base_optimizer.step = unfused
    for t in range(5):
        live = ws if t >= 2 else ws[:1]  # the second parameter has a gradient from step 2 on
        live_ref = rs if t >= 2 else rs[:1]
        _sam_step(live, opt)
        _ref_step(live_ref, ref)
    assert _close(ws, rs)
    for p, q in zip(ws, rs):
        for k, v in ref.state[q].items():
            assert torch.allclose(torch.as_tensor(opt.base_optimizer.state[p][k]), torch.as_tensor(v), rtol=1e-12), k


def test_fp16_adamw_with_a_late_parameter_stays_finite():
    """The case an invariant harness found: fp16 AdamW, a parameter joining later (partly created
    state) -- torch's own fp16 step gave inf from finite gradients; the fused step computes in fp32."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(8).half()), torch.nn.Parameter(torch.randn(3).half())]
    opt = sharpfused.SAM(ws, torch.optim.AdamW, rho=0.05, lr=1e-3)
    for t in range(4):
        live = ws if t >= 1 else ws[:1]
        for _ in range(2):
            (sum((w.float() * 1e-3).sum() for w in live)).backward()
            (opt.first_step if not opt.perturbed else opt.second_step)(zero_grad=True)
    assert all(torch.isfinite(w).all() for w in ws)
