"""Base optimizers as adapters (sharpfused/optim/adapters.py): the fused base step equals the unfused one.

* The restore-step primitives of Adam (L2 weight decay) and RMSprop on every backend here,
  against torch.optim's own step: float64 bit-close, float32 within the design's 2x-torch-error
  rule, found_inf skips, grad_coef.
* Each adapter (SGD, AdamW, Adam L2, RMSprop) inside SAM: the fused path against the same
  optimizer with fusion disabled (``adapters.unfused()``), over several steps with a skipped
  (non-finite) step, clipping (grad_coef) and a state_dict save/load mid-run.
* torch.optim.Muon as a base (unfused): a SAM step is restore + Muon's own step.
"""

from __future__ import annotations

import copy
import io
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpfused import SAM, ops
from sharpfused.optim import adapters

from .helpers import MLP, TRITON_INTERPRET, assert_within_torch_error, data, rel_err

HAS_CUDA = torch.cuda.is_available()
CUDA_WHY = "no CUDA device" if not HAS_CUDA else ops.unavailable_reason("cuda", torch.device("cuda"))
# (backend, device) with the reason it cannot run here, or None
_TRITON_DEV = "cpu" if TRITON_INTERPRET else "cuda"
_TRITON_WHY = (
    "no CUDA device and no interpreter"
    if _TRITON_DEV == "cuda" and not HAS_CUDA
    else (ops.unavailable_reason("triton", torch.device(_TRITON_DEV)))
)
# backend -> (device, the reason it cannot run here or None)
BACKENDS = {"torch": ("cpu", None), "triton": (_TRITON_DEV, _TRITON_WHY), "cuda": ("cuda", CUDA_WHY)}


def _backend_param(name: str):
    dev, why = BACKENDS[name]
    marks = [pytest.mark.skipif(why is not None, reason=f"{name} backend: {why}")]
    if dev == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(name, marks=marks, id=name)


ALL_BACKENDS = [_backend_param(b) for b in BACKENDS]
F64_BACKENDS = [_backend_param("torch"), _backend_param("cuda")]  # Triton leaves float64 to the torch backend
SHAPES = [(7,), (33, 5), (4099,), (0,), (3, 1, 2)]


def _rand(shapes, dtype, device, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(device, dtype) for s in shapes]


# ================================================================================ primitives
def _torch_steps(cls, kw, w0, grads, dtype, coefs, skips):
    """torch.optim's own steps from w0 with these gradients (coef applied, skipped steps left out):
    the weights after each step."""
    ps = [w.detach().clone().to(dtype).requires_grad_() for w in w0]
    opt = cls(ps, **kw)
    outs = []
    for g, c, skip in zip(grads, coefs, skips):
        if not skip:
            for p, gg in zip(ps, g):
                p.grad = gg.to(dtype) * (1.0 if c is None else float(c))
            opt.step()
        outs.append([p.detach().clone() for p in ps])
    return outs, opt


def _run_primitive(name, backend, device, dtype, w0, grads, coefs, skips, hp, momentum):
    """The primitive over the steps: w_t = restore_step(backup = w_{t-1}); states start at zeros."""
    w = [x.to(device, dtype) for x in w0]
    s1 = [torch.zeros_like(x) for x in w]
    s2 = [torch.zeros_like(x) for x in w] if (name == "adam" or momentum) else None
    outs, t = [], 0
    for g, c, skip in zip(grads, coefs, skips):
        backup = [x.clone() for x in w]
        p = [x + 0.25 for x in w]  # the perturbed weights: overwritten
        found = torch.tensor(float(skip), device=device)
        gd = [x.to(device, dtype) for x in g]
        if skip:
            gd[0].fill_(float("nan"))  # never read on a skipped step
        coef = c if not isinstance(c, torch.Tensor) else c.to(device)
        if name == "adam":
            t += not skip
            step = torch.tensor(float(t), device=device)
            ops.restore_adamw_(p, backup, gd, s1, s2, step=step, lr=hp["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=hp["weight_decay"], grad_coef=coef, found_inf=found, decoupled=False,
                               backend=backend)  # fmt: skip
        else:
            ops.restore_rmsprop_(p, backup, gd, s1, s2, lr=hp["lr"], alpha=hp["alpha"], eps=1e-8,
                                 weight_decay=hp["weight_decay"], momentum=momentum, grad_coef=coef,
                                 found_inf=found, backend=backend)  # fmt: skip
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(p, backup)), "a skipped step must restore w bit for bit"
        w = p
        outs.append([x.detach().cpu() for x in w])
    return outs, s1, s2


PRIMS = {
    "adam-l2": ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), 0.0),
    "rmsprop": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, weight_decay=0.0), 0.0),
    "rmsprop-momentum-wd": ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.99, weight_decay=1e-2), 0.9),
}


@pytest.mark.parametrize("case", list(PRIMS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_primitive_matches_torch_optim(case, backend):
    name, cls, hp, momentum = PRIMS[case]
    device = BACKENDS[backend][0]
    torch.manual_seed(0)
    w0 = _rand(SHAPES, torch.float64, "cpu")
    grads = [_rand(SHAPES, torch.float64, "cpu") for _ in range(4)]
    coefs = [None, 0.5, torch.tensor(0.25), None]
    skips = [False, False, True, False]
    kw = dict(hp, momentum=momentum) if name == "rmsprop" else dict(hp)
    ref, _ = _torch_steps(cls, kw, w0, grads, torch.float64, coefs, skips)
    dtypes = [torch.float32] + ([torch.float64] if backend != "triton" else [])
    for dtype in dtypes:
        got, s1, s2 = _run_primitive(name, backend, device, dtype, w0, grads, coefs, skips, hp, momentum)
        if dtype == torch.float64:
            for t in range(len(grads)):
                assert rel_err(got[t], ref[t]) <= 1e-12, (case, t)
        else:
            mine, _ = _torch_steps(cls, kw, w0, grads, torch.float32, coefs, skips)
            for t in range(len(grads)):
                assert_within_torch_error(got[t], mine[t], ref[t], what=f"{case} {backend} step {t}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_adam_l2_differs_from_adamw(backend):
    """decoupled=False is not the AdamW rule (the switch reaches the kernel)."""
    device = BACKENDS[backend][0]
    torch.manual_seed(1)
    b, g = _rand(SHAPES, torch.float32, device), _rand(SHAPES, torch.float32, device)
    out = []
    for decoupled in (True, False):
        p, m, v = [x + 1 for x in b], [torch.zeros_like(x) for x in b], [torch.zeros_like(x) for x in b]
        ops.restore_adamw_(p, b, g, m, v, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5,
                           decoupled=decoupled, backend=backend)  # fmt: skip
        out.append(p)
    assert rel_err(out[0], out[1]) > 1e-4


# ================================================================================ adapters in SAM
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "sgd-nesterov-wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam-l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "adam-decoupled": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2)),
    "rmsprop-momentum-wd": (torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.9, weight_decay=1e-3)),
}


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def sam_run(base, dtype, backend, fused, steps=5, skip_at=(2,), ckpt_at=3, max_grad_norm=0.5):
    """SAM over ``steps`` steps on a small MLP; a NaN gradient in the second pass of the steps in
    ``skip_at``; after step ``ckpt_at`` the optimizer is saved and a new one loads it. Returns the
    weights and the base optimizer's state_dict."""
    cls, kw = BASES[base]
    device = BACKENDS[backend][0]
    torch.manual_seed(0)
    model = MLP().to(device, dtype)
    x, y = data("mlp")
    x, y = x.to(device, dtype), y.to(device)
    with nullcontext() if fused else adapters.unfused():
        opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, max_grad_norm=max_grad_norm, **kw)
        for t in range(steps):
            before = [p.detach().clone() for p in model.parameters()]
            _loss(model, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            if t in skip_at:
                model.net[0].weight.grad.view(-1)[3] = float("nan")
            opt.second_step(zero_grad=True)
            if t in skip_at:
                assert bool(opt.last_step_skipped)
                assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "skipped step moved w"
                if t == 0:
                    assert not opt.base_optimizer.state, "a skipped first step created base state"
            if t == ckpt_at:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, max_grad_norm=max_grad_norm, **kw)
                opt.load_state_dict(torch.load(buf))
        assert (adapters.lookup(opt.base_optimizer) is not None) == (fused and base != "_centered")
    return [p.detach().cpu() for p in model.parameters()], opt.base_optimizer.state_dict()


def _states(sd):
    """(key, tensor) of every state tensor, in order."""
    return [(f"{i}.{k}", v) for i, st in sorted(sd["state"].items()) for k, v in sorted(st.items())]


def _same_layout(a, b):
    sa, sb = _states(a), _states(b)
    assert [k for k, _ in sa] == [k for k, _ in sb], "state keys differ between fused and unfused"
    for (k, x), (_, y) in zip(sa, sb):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if k.endswith(".step"):
            assert float(x) == float(y), k
    return sa, sb


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_fused_equals_unfused_float64(base, backend):
    wf, sf = sam_run(base, torch.float64, backend, fused=True)
    wu, su = sam_run(base, torch.float64, backend, fused=False)
    assert rel_err(wf, wu) <= 1e-12
    a, b = _same_layout(sf, su)
    for (k, x), (_, y) in zip(a, b):
        if not k.endswith(".step"):
            assert rel_err(x, y) <= 1e-12, k


#: every adapter and option on the torch backend; on the kernels one case per adapter (interpreted
#: Triton costs ~3 s a case)
F32_CASES = [pytest.param(b, "torch", id=f"torch-{b}") for b in BASES] + [
    pytest.param(b, k.values[0], marks=k.marks, id=f"{k.id}-{b}")
    for k in ALL_BACKENDS[1:]
    for b in ("sgd-nesterov-wd", "adamw", "adam-l2", "rmsprop-momentum-wd")
]


@pytest.mark.parametrize("base,backend", F32_CASES)
def test_fused_within_torch_error_float32(base, backend):
    ref_backend = "cuda" if backend == "cuda" else "torch"
    wr, sr = sam_run(base, torch.float64, ref_backend, fused=False)
    wf, sf = sam_run(base, torch.float32, backend, fused=True)
    wu, su = sam_run(base, torch.float32, backend, fused=False)
    assert_within_torch_error(wf, wu, wr, what=f"{base} weights")
    a, b = _same_layout(sf, su)
    r = _states(sr)
    for (k, x), (_, y), (_, z) in zip(a, b, r):
        if not k.endswith(".step"):
            assert_within_torch_error(x, y, z, what=f"{base} {k}")


@pytest.mark.parametrize("base", ["sgd-momentum", "adam-l2", "rmsprop-momentum-wd"])
def test_skipped_first_step_creates_no_state(base):
    for fused in (True, False):
        w, sd = sam_run(base, torch.float64, "torch", fused=fused, steps=2, skip_at=(0,), ckpt_at=-1)
        assert len(sd["state"]) == 4, "the step after a skipped first step creates the state"
    wf, _ = sam_run(base, torch.float64, "torch", fused=True, steps=2, skip_at=(0,), ckpt_at=-1)
    wu, _ = sam_run(base, torch.float64, "torch", fused=False, steps=2, skip_at=(0,), ckpt_at=-1)
    assert rel_err(wf, wu) <= 1e-12


def test_unfusable_groups_run_unfused():
    ps = [nn.Parameter(torch.randn(3))]
    cases = [
        (torch.optim.Adam, dict(amsgrad=True), "amsgrad"),
        (torch.optim.AdamW, dict(maximize=True), "maximize"),
        (torch.optim.RMSprop, dict(centered=True), "centered"),
        (torch.optim.SGD, dict(lr=0.1, differentiable=True), "differentiable"),
        (torch.optim.Adam, dict(capturable=True), "capturable"),
        (torch.optim.Adam, dict(betas=(torch.tensor(0.9), torch.tensor(0.999))), "tensor betas"),
        (torch.optim.Adagrad, dict(), "no adapter for Adagrad"),
    ]
    for cls, kw, why in cases:
        assert adapters.why_unfused(cls(ps, **kw)) == why
        assert adapters.lookup(cls(ps, **kw)) is None
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop):
        assert adapters.lookup(cls(ps, lr=0.1)) is not None
        with adapters.unfused():
            assert adapters.lookup(cls(ps, lr=0.1)) is None

    class MyAdam(torch.optim.Adam):  # a subclass may change the step: its own step runs
        pass

    assert adapters.lookup(MyAdam(ps)) is None


def test_rmsprop_centered_runs_unfused():
    """centered RMSprop takes the unfused path (restore + torch's own step), grad_avg included."""
    BASES["_centered"] = (torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5))
    try:
        w1, s1 = sam_run("_centered", torch.float64, "torch", fused=True, ckpt_at=-1)
        w2, s2 = sam_run("_centered", torch.float64, "torch", fused=False, ckpt_at=-1)
    finally:
        del BASES["_centered"]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert [k for k, _ in _states(s1)] == [k for k, _ in _states(s2)]
    assert any(k.endswith("grad_avg") for k, _ in _states(s1))


# ================================================================================ torch.optim.Muon
def _muon_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)).double()


def _muon_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


MUON = dict(lr=0.02, momentum=0.9, weight_decay=0.01)


def test_muon_sam_step_is_restore_plus_muon_step():
    x, y = _muon_data()
    model = _muon_model()
    opt = SAM(model.parameters(), torch.optim.Muon, rho=0.05, **MUON)
    assert adapters.lookup(opt.base_optimizer) is None  # unfused
    twin = _muon_model()
    muon = torch.optim.Muon(twin.parameters(), **MUON)
    for _ in range(3):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
        # by hand: e = rho g / ||g||, gradient at w + e, back to w, Muon's own step
        ps = list(twin.parameters())
        g1 = torch.autograd.grad(_loss(twin, x, y), ps)
        norm = torch.sqrt(sum((g * g).sum() for g in g1))
        w0 = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p, g in zip(ps, g1):
                p.add_(g * (0.05 / (norm + 1e-12)))
        g2 = torch.autograd.grad(_loss(twin, x, y), ps)
        with torch.no_grad():
            for p, w in zip(ps, w0):
                p.copy_(w)
        for p, g in zip(ps, g2):
            p.grad = g
        muon.step()
        muon.zero_grad()
        assert rel_err(list(model.parameters()), ps) <= 1e-12
    sd = opt.state_dict()["base_optimizer"]["state"]
    assert rel_err([s["momentum_buffer"] for s in sd.values()], [muon.state[p]["momentum_buffer"] for p in ps]) <= 1e-12


def test_muon_state_dict_round_trip():
    x, y = _muon_data()

    def steps(model, opt, n):
        for _ in range(n):
            _loss(model, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)

    model = _muon_model()
    opt = SAM(model.parameters(), torch.optim.Muon, rho=0.05, **MUON)
    steps(model, opt, 4)
    straight = [p.detach().clone() for p in model.parameters()]

    model = _muon_model()
    opt = SAM(model.parameters(), torch.optim.Muon, rho=0.05, **MUON)
    steps(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    model2 = _muon_model(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = SAM(model2.parameters(), torch.optim.Muon, rho=0.05, **MUON)
    opt2.load_state_dict(copy.deepcopy(ck["opt"]))
    assert opt2.state_dict()["base_optimizer"]["state"].keys() == ck["opt"]["base_optimizer"]["state"].keys()
    steps(model2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), straight))


def test_muon_refuses_non_matrix_parameters():
    with pytest.raises(ValueError, match="2D|2-D|ndim|dimension"):
        SAM(MLP().parameters(), torch.optim.Muon, rho=0.05, lr=0.02)


def test_muon_skipped_step_moves_nothing():
    x, y = _muon_data()
    model = _muon_model()
    opt = SAM(model.parameters(), torch.optim.Muon, rho=0.05, **MUON)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    model[0].weight.grad[0, 0] = math.inf
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped) and not opt.base_optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("base", ["adam-l2", "rmsprop", "rmsprop-momentum-wd"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_step_never_waits_for_the_device(base, backend, monkeypatch):
    """After the first (state-creating) steps, the fused Adam/RMSprop step reads no device value:
    the torch backend's device path (HOST_BRANCH_ON_CPU off) and the kernels, as tests/test_no_sync.py
    holds SGD and AdamW to it."""
    from sharpfused.backends import torch_ops

    from .test_no_sync import SyncDetector, TensorFactoryDetector

    monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
    cls, kw = BASES[base]
    device = BACKENDS[backend][0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)
    opt = SAM(model.parameters(), cls, rho=0.05, backend=backend, max_grad_norm=1.0, **kw)
    assert adapters.lookup(opt.base_optimizer) is not None
    x = torch.randn(5, 8, device=device)

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for t in range(3):
        detector = SyncDetector()
        with detector, TensorFactoryDetector(detector.hits):
            opt.step(closure)
        if t >= 1:
            assert not detector.hits, f"{base} on {backend}, step {t}: {detector.hits}"
    detector = SyncDetector()
    with adapters.unfused(), detector:  # the unfused step reads the skip flag: the detector sees it
        opt.step(closure)
    assert detector.hits


@pytest.mark.parametrize(
    "base,op",
    [("adam-l2", "sharpfused.restore_adamw_.default"), ("rmsprop-momentum-wd", "sharpfused.restore_rmsprop_.default")],
)
def test_compiled_sam_step_uses_the_fused_base_step(base, op):
    """Under dynamo (which marks param groups capturable) the fused Adam/RMSprop step is a graph
    node, and the traced step equals the eager one."""
    cls, kw = BASES[base]
    x, y = data("mlp")

    def ready():
        torch.manual_seed(0)
        model = MLP()
        opt = SAM(model.parameters(), cls, rho=0.05, **kw)
        for _ in range(2):
            _loss(model, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)
        _loss(model, x, y).backward()
        return model, opt

    def sam_step(model, opt):
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)

    ref_model, ref_opt = ready()
    sam_step(ref_model, ref_opt)
    model, opt = ready()
    ex = torch._dynamo.explain(sam_step)(model, opt)
    assert op in {str(o) for ops_of_graph in ex.ops_per_graph for o in ops_of_graph}
    assert rel_err(list(model.parameters()), list(ref_model.parameters())) < 1e-6
