"""The eager baselines the benchmarks race are checked against the float64 reference here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from . import reference as ref
from .baselines import (
    LOOP_PRIMITIVES,
    EagerForeachASAM,
    EagerForeachGSAM,
    EagerForeachSAM,
    EagerLoopGSAM,
    EagerLoopSAM,
)
from .helpers import MLP, ODD_SIZES, ConvBN, data, rand_list, rel_err
from .test_sam import grad_fn_for

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("kind", ["mlp", "convbn"])
@pytest.mark.parametrize(
    "cls,kw,step",
    [
        (EagerLoopSAM, dict(rho=0.05), lambda p, gf, b: ref.sam_step(p, gf, b, rho=0.05)),
        (EagerForeachSAM, dict(rho=0.05), lambda p, gf, b: ref.sam_step(p, gf, b, rho=0.05)),
        (EagerLoopSAM, dict(rho=0.5, adaptive=True), lambda p, gf, b: ref.sam_step(p, gf, b, rho=0.5, adaptive=True)),
        (
            EagerForeachASAM,
            dict(rho=0.5, adaptive=True),
            lambda p, gf, b: ref.sam_step(p, gf, b, rho=0.5, adaptive=True),
        ),
        (EagerForeachASAM, dict(rho=0.05, adaptive=False), lambda p, gf, b: ref.sam_step(p, gf, b, rho=0.05)),
        (EagerLoopGSAM, dict(rho=0.05, alpha=0.3), lambda p, gf, b: ref.gsam_step(p, gf, b, rho=0.05, alpha=0.3)),
        (EagerForeachGSAM, dict(rho=0.05, alpha=0.3), lambda p, gf, b: ref.gsam_step(p, gf, b, rho=0.05, alpha=0.3)),
    ],
    ids=["loop-sam", "foreach-sam", "loop-asam", "foreach-asam", "foreach-asam-off", "loop-gsam", "foreach-gsam"],
)
def test_step_baselines_match_reference(kind, cls, kw, step):
    torch.manual_seed(3)
    model = (MLP() if kind == "mlp" else ConvBN()).double().eval()  # eval: BN uses running stats, a pure function
    x, y = data(kind)
    x = x.double()
    params = [p.detach().clone() for p in model.parameters()]
    gf = grad_fn_for(copy.deepcopy(model), x, y)
    opt = cls(model.parameters(), torch.optim.SGD, **kw, **SGD_KW)
    _train(model, opt, x, y, 7)
    base = ref.SGDRef(**SGD_KW)
    for _ in range(7):
        params = step(params, gf, base)
    assert rel_err(list(model.parameters()), params) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_loop_primitives_match_reference(dtype, tol):
    shapes = ODD_SIZES
    w, g, s = rand_list(shapes, dtype), rand_list(shapes, dtype), rand_list(shapes, dtype)
    # sq_norm plain and ASAM-weighted, per tensor
    total, per = LOOP_PRIMITIVES["sq_norm"](g, w, 0.01, per_tensor=True)
    rt, rp = ref.sq_norm(g, w, 0.01, per_tensor=True)
    assert rel_err(total, rt) < tol and rel_err(per, rp) < tol
    assert rel_err(LOOP_PRIMITIVES["sq_norm"](g), ref.sq_norm(g)) < tol
    # perturb_ with backup, ASAM weighting and a mask
    mask = [(torch.rand(sh) > 0.5).to(dtype) for sh in shapes]
    ww, backup = [x.clone() for x in w], [torch.full_like(x, float("nan")) for x in w]
    LOOP_PRIMITIVES["perturb_"](ww, g, backup, 0.3, 0.01, mask)
    assert all(torch.equal(a, b) for a, b in zip(backup, w))
    assert rel_err(ww, ref.perturb(w, g, 0.3, 0.01, mask)) < tol
    # restore_ is bit-exact
    LOOP_PRIMITIVES["restore_"](ww, backup)
    assert all(torch.equal(a, b) for a, b in zip(ww, w))
    # dot_norms
    assert rel_err(LOOP_PRIMITIVES["dot_norms"](g, s), ref.dot_norms(g, s)) < tol
    # combine_
    gg = [x.clone() for x in g]
    LOOP_PRIMITIVES["combine_"](gg, s, 1.3, -0.2)
    assert rel_err(gg, ref.combine(g, s, 1.3, -0.2)) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_loop_restore_sgd_matches_reference(dtype, tol, nesterov):
    shapes = ODD_SIZES
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=nesterov)
    sgd = ref.SGDRef(**kw)
    backup = rand_list(shapes, dtype)
    w = [torch.full_like(x, float("nan")) for x in backup]
    bufs = [torch.zeros_like(x) for x in backup]
    for t in range(3):
        g = rand_list(shapes, dtype)
        LOOP_PRIMITIVES["restore_sgd_"](w, backup, g, bufs, init_momentum=t == 0, **kw)
        expected = sgd.step(ref.f64(backup), ref.f64(g))
        assert rel_err(w, expected) < tol
        assert rel_err(bufs, sgd.bufs) < tol
        backup = [x.clone() for x in w]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_loop_restore_adamw_matches_reference(dtype, tol):
    shapes = ODD_SIZES
    adam = ref.AdamWRef(lr=1e-2, weight_decay=0.05)
    backup = rand_list(shapes, dtype)
    w = [torch.full_like(x, float("nan")) for x in backup]
    m, v = [torch.zeros_like(x) for x in backup], [torch.zeros_like(x) for x in backup]
    for t in range(1, 4):
        g = rand_list(shapes, dtype)
        LOOP_PRIMITIVES["restore_adamw_"](
            w, backup, g, m, v, step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05
        )
        expected = adam.step(ref.f64(backup), ref.f64(g))
        assert rel_err(w, expected) < tol
        assert rel_err(m, adam.m) < tol and rel_err(v, adam.v) < tol
        backup = [x.clone() for x in w]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_loop_restore_rmsprop_matches_torch_optim(dtype, tol):
    backup = rand_list(ODD_SIZES, dtype)
    ps = [torch.nn.Parameter(x.double().clone()) for x in backup]
    rms = torch.optim.RMSprop(ps, lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.05, momentum=0.8)
    w = [torch.full_like(x, float("nan")) for x in backup]
    v, buf = [torch.zeros_like(x) for x in backup], [torch.zeros_like(x) for x in backup]
    for _ in range(3):
        g = rand_list(ODD_SIZES, dtype)
        LOOP_PRIMITIVES["restore_rmsprop_"](
            w, backup, g, v, buf, lr=1e-2, alpha=0.9, eps=1e-8, weight_decay=0.05, momentum=0.8
        )
        for p, gi in zip(ps, g):
            p.grad = gi.double()
        rms.step()
        assert rel_err(w, [p.detach() for p in ps]) < tol
        assert rel_err(v, [rms.state[p]["square_avg"] for p in ps]) < tol
        backup = [x.clone() for x in w]
