"""MSAM, RST, AE-SAM: float64 references, identities (SAM, the base optimizer alone), resume, skips,
bad inputs, host reads, and the examples/cheap_sharpness.py quick mode."""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharpfused
from sharpfused import AESAM, MSAM, RST, SAM

from . import reference as ref
from .helpers import TRITON_DEVICES, optimizer_snapshot, rel_err, same_values
from .test_algorithms import BASES, batches, ce, grad_fn_for, mlp
from .test_no_sync import SyncDetector, TensorFactoryDetector, _where

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8

# name -> (class, constructor kwargs)
CASES = {
    "msam": (MSAM, dict(rho=0.3)),
    "rst": (RST, dict(rho=0.05, p=0.5, seed=3)),
    "rst-linear": (RST, dict(rho=0.05, p=0.2, p_end=0.9, total_steps=6, schedule="linear", seed=1)),
    "rst-cosine": (RST, dict(rho=0.05, p=1.0, p_end=0.0, total_steps=7, schedule="cosine", seed=2)),
    "aesam": (AESAM, dict(rho=0.05, delta=0.3, c=0.0)),
    "aesam-schedule": (AESAM, dict(rho=0.05, delta=0.3, c=0.5, c_end=-1.0, total_steps=6)),
}


def build(name, model, base="sgd", backend="torch", **over):
    cls, kw = CASES[name]
    bcls, bkw, _ = BASES[base]
    return cls(model.parameters(), bcls, backend=backend, **{**kw, **over}, **bkw)


def closure_for(model, x, y):
    def closure():
        loss = ce(model, x, y)
        loss.backward()
        return loss

    return closure


def run(model, opt, data):
    choices = []
    for x, y in data:
        opt.step(closure_for(model, x, y))
        choices.append(getattr(opt, "last_step_sam", None))
    return choices


def reference_run(name, model, data, base):
    """Float64 reference weights and the SAM/plain choice of each step."""
    cls, kw = CASES[name]
    _, bkw, refcls = BASES[base]
    params, rb, state, choices = [p.detach().clone() for p in model.parameters()], refcls(**bkw), {}, []
    for t, (x, y) in enumerate(data):
        gf = grad_fn_for(model, x, y)
        if cls is MSAM:
            params = ref.msam_step(params, gf, rb, rho=kw["rho"])
            choices.append(None)
        elif cls is RST:
            params, sam = ref.rst_step(params, gf, rb, t, **kw)
            choices.append(sam)
        else:
            params = ref.aesam_step(params, gf, rb, state, **kw)
            choices.append(state["choices"][-1])
    return params, choices


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, base):
    model, data = mlp(), batches(STEPS)
    want, want_choices = reference_run(name, copy.deepcopy(model), data, base)
    opt = build(name, model, base)
    choices = run(model, opt, data)
    assert choices == want_choices
    if CASES[name][0] is not MSAM:  # the cases take both kinds of steps
        assert True in choices and False in choices, choices
    err = rel_err(list(model.parameters()), want)
    assert err < 1e-9, f"{name}/{base}: relative error {err:.3g} vs the float64 reference"


@pytest.mark.parametrize("device", TRITON_DEVICES)  # cpu under the interpreter, cuda with a GPU
@pytest.mark.parametrize("name", ["msam", "rst", "aesam-schedule"])
def test_triton_backend_matches_torch_and_reference(name, device):
    why = sharpfused.ops.unavailable_reason("triton", torch.device(device))
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")
    data = batches(4)
    want, want_choices = reference_run(name, mlp(), data, "sgd")
    data32 = [(x.float().to(device), y.to(device)) for x, y in data]
    a, b = mlp(torch.float32).to(device), mlp(torch.float32).to(device)
    ca = run(a, build(name, a, backend="torch"), data32)
    cb = run(b, build(name, b, backend="triton"), data32)
    assert ca == cb == want_choices
    assert rel_err(list(b.parameters()), list(a.parameters())) < 1e-5
    assert rel_err(list(b.parameters()), want) < 1e-5


# ------------------------------------------------------------------ identities
def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _sam(data, base):
    model = mlp()
    bcls, bkw, _ = BASES[base]
    run(model, SAM(model.parameters(), bcls, rho=0.05, backend="torch", **bkw), data)
    return _weights(model)


def _plain(data, base):
    """The base torch optimizer alone (its own step, not the fused one)."""
    model = mlp()
    bcls, bkw, _ = BASES[base]
    opt = bcls(model.parameters(), **bkw)
    for x, y in data:
        opt.zero_grad()
        ce(model, x, y).backward()
        opt.step()
    return _weights(model), opt


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize(
    "cls,kw,like",
    [
        (RST, dict(p=1.0), "sam"),
        (RST, dict(p=0.0), "plain"),
        (RST, dict(p=1.0, p_end=0.0, total_steps=10**9, schedule="linear"), "sam"),  # p_t < 1 only after 1e9 steps
        (AESAM, dict(c=-1e30), "sam"),
        (AESAM, dict(c=1e30), "plain"),
        (MSAM, dict(rho=0.0), "plain"),
    ],
)
def test_identities(cls, kw, like, base):
    data = batches(6)
    model = mlp()
    bcls, bkw, _ = BASES[base]
    opt = cls(model.parameters(), bcls, backend="torch", **({"rho": 0.05} if cls is not MSAM else {}), **kw, **bkw)
    choices = run(model, opt, data)
    if cls is not MSAM:
        assert choices == [like == "sam"] * len(data)
    got = _weights(model)
    want = _sam(data, base) if like == "sam" else _plain(data, base)[0]
    if like == "sam" or base == "sgd":  # bit for bit: the same fused kernels / torch's SGD step
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"{cls.__name__}{kw} differs from {like}"
    else:  # torch's AdamW rounds its update in another order than the fused step
        assert rel_err(got, want) < 1e-13


def test_plain_steps_write_the_base_optimizers_state_like_torch():
    data = batches(5)
    want, plain = _plain(data, "sgd")
    model = mlp()
    opt = build("rst", model, p=0.0)
    run(model, opt, data)
    for p, q in zip(model.parameters(), plain.param_groups[0]["params"]):
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])


# ------------------------------------------------------------------ protocol
@pytest.mark.parametrize("name", ["rst", "aesam"])
def test_manual_protocol_equals_closure(name):
    data = batches(6)
    a, b = mlp(), mlp()
    opt_a, opt_b = build(name, a), build(name, b)
    run(a, opt_a, data)
    seen = []
    for x, y in data:
        ce(b, x, y).backward()
        due = opt_b.first_step(zero_grad=True)
        assert isinstance(due, bool)
        seen.append(due)
        if due:
            ce(b, x, y).backward()
            opt_b.second_step(zero_grad=True)
        else:
            with pytest.raises(RuntimeError, match="first_step\\(\\) returned False"):
                opt_b.second_step()
    assert True in seen and False in seen
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_msam_manual_protocol_equals_closure_and_leaves_weights_unperturbed():
    data = batches(5)
    a, b = mlp(), mlp()
    opt_a, opt_b = build("msam", a), build("msam", b)
    run(a, opt_a, data)
    for t, (x, y) in enumerate(data):
        before = _weights(b)
        opt_b.first_step(zero_grad=True)  # before the forward
        moved = any(not torch.equal(p, q) for p, q in zip(b.parameters(), before))
        assert moved == (t > 0)  # no momentum on the first step: no perturbation
        assert opt_b.perturbed
        ce(b, x, y).backward()
        opt_b.second_step(zero_grad=True)
        assert not opt_b.perturbed
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # the perturbation reads the base optimizer's own momentum buffers, which the fused step wrote
    for p in a.parameters():
        assert "momentum_buffer" in opt_a.base_optimizer.state[p]
    assert not opt_a.state  # MSAM keeps no state of its own


def test_msam_refuses_gradients_already_there():
    model, (x, y) = mlp(), batches(1)[0]
    opt = build("msam", model)
    ce(model, x, y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step(closure_for(model, x, y))


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_mid_run(name):
    data = batches()
    a = mlp()
    ca = run(a, build(name, a), data)
    b = mlp()
    opt_b = build(name, b)
    cb = run(b, opt_b, data[:4])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = mlp(seed=5)
    c.load_state_dict(saved["model"])
    opt_c = build(name, c)
    opt_c.load_state_dict(saved["opt"])
    cc = run(c, opt_c, data[4:])
    assert ca == cb + cc
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters())), f"{name}: resumed run differs"


# ------------------------------------------------------------------ non-finite steps
def _host_counters(snap):
    """RST's host step counter counts attempted steps (documented); everything else must not move."""
    return [s for s in snap if not (isinstance(s, tuple) and s[0] == "step" and isinstance(s[1], int))]


@pytest.mark.parametrize("where", ["first", "second"])
@pytest.mark.parametrize("name,over", [("msam", {}), ("rst", dict(p=1.0)), ("rst", dict(p=0.0)),
                                       ("aesam", dict(c=-1e30)), ("aesam", {})])  # fmt: skip
def test_nonfinite_step_is_skipped_with_no_state_change(name, over, where):
    if where == "second" and not (over.get("p") == 1.0 or over.get("c") == -1e30):
        pytest.skip("the step may take one pass only")
    data = batches(4)
    model = mlp()
    opt = build(name, model, **over)
    run(model, opt, data[:3])
    before = optimizer_snapshot(model, opt)
    x, y = data[3]
    calls = []

    def closure():
        calls.append(1)
        loss = ce(model, x, y)
        bad = where == "first" and len(calls) == 1 or where == "second" and len(calls) == 2
        (loss * float("nan") if bad else loss).backward()
        return loss

    opt.step(closure)
    assert bool(opt.last_step_skipped)
    after = optimizer_snapshot(model, opt)
    assert same_values(_host_counters(after), _host_counters(before))
    run(model, opt, data[:1])  # and it goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_aesam_skipped_first_step_leaves_no_state():
    model, (x, y) = mlp(), batches(1)[0]
    opt = build("aesam", model)

    def closure():
        loss = ce(model, x, y) * float("nan")
        loss.backward()
        return loss

    opt.step(closure)
    assert not opt.state and not opt.base_optimizer.state


# ------------------------------------------------------------------ host reads
@pytest.mark.parametrize("name,reads", [("msam", 0), ("rst", 0), ("aesam", 1)])
@pytest.mark.parametrize("backend,device", _where())
def test_host_reads_per_step(name, reads, backend, device, monkeypatch):
    """MSAM and RST never wait for the device in a step; AE-SAM reads its one choice (documented).
    On a GPU the detector also sees blocking copies (see tests/test_no_sync.py)."""
    from sharpfused.backends import torch_ops

    monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
    model = mlp(torch.float32).to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches(5, dtype=torch.float32)]
    opt = build(name, model, backend=backend)
    for t, (x, y) in enumerate(data):
        det = SyncDetector()
        with det, TensorFactoryDetector(det.hits):
            opt.step(closure_for(model, x, y))
        if t >= 2:  # the first step creates state and reads the skip flag once, as every algorithm
            assert len(det.hits) == reads, det.hits
            assert all(h.startswith("aten._local_scalar_dense") for h in det.hits), det.hits


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "cls,kw,err,match",
    [
        (MSAM, dict(rho=-0.1), ValueError, "rho"),
        (MSAM, dict(momentum=0.0), ValueError, "momentum"),
        (RST, dict(p=1.5), ValueError, "p must"),
        (RST, dict(p=float("nan")), ValueError, "p must"),
        (RST, dict(schedule="exp"), ValueError, "schedule"),
        (RST, dict(schedule="linear", p_end=0.1), ValueError, "total_steps"),
        (RST, dict(schedule="linear", total_steps=10), ValueError, "p_end"),
        (RST, dict(p_end=0.5), ValueError, "p_end"),
        (RST, dict(schedule="cosine", p_end=-0.1, total_steps=5), ValueError, "p_end"),
        (RST, dict(seed=-1), ValueError, "seed"),
        (RST, dict(rho=float("inf")), ValueError, "rho"),
        (AESAM, dict(delta=1.0), ValueError, "delta"),
        (AESAM, dict(delta=-0.1), ValueError, "delta"),
        (AESAM, dict(c=float("nan")), ValueError, "c must"),
        (AESAM, dict(c_end=-1.0), ValueError, "total_steps"),
        (AESAM, dict(total_steps=10), ValueError, "c_end"),
        (AESAM, dict(c_end=float("inf"), total_steps=3), ValueError, "c_end"),
    ],
)
def test_bad_inputs_raise(cls, kw, err, match):
    kw = {"momentum": 0.9, **kw}
    with pytest.raises(err, match=match):
        cls(mlp().parameters(), torch.optim.SGD, lr=0.1, **kw)


def test_msam_refuses_a_base_without_momentum_and_bn_model():
    with pytest.raises(TypeError, match="base_optimizer"):
        MSAM(mlp().parameters(), torch.optim.Adagrad, lr=0.1)
    model = mlp()
    with pytest.raises(ValueError, match="bn_model"):
        MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, bn_model=model)
    opt = MSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], "momentum": 0.0})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ the example
def test_example_quick_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cheap_sharpness.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "cheap_sharpness.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    for name in ["SGD", "SAM", "LookSAM", "MSAM", "RST", "AE-SAM"]:
        assert any(r.startswith(name) for r in rows), f"{name} missing from the table:\n{table}"
    acc = {
        line.split("|")[1].strip(): line.split("|")[3].strip() for line in table.splitlines() if line.startswith("| ")
    }
    # RST with p=0 takes torch's SGD step (bit for bit on small models, within rounding on this MLP's sizes)
    assert abs(float(acc["SGD (fused)"]) - float(acc["SGD"])) <= 0.005
    for name in ("ESAM", "MESA"):
        if hasattr(sharpfused, name):
            assert any(r.startswith(name) for r in rows), f"{name} missing from the table:\n{table}"
    assert (tmp_path / "cheap_sharpness.png").stat().st_size > 0
