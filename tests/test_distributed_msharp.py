"""m-sharpness under DDP (``sharpfused.distributed.local_perturbation``), every algorithm, 2 gloo processes.

Each rank trains on its own half of the batch; the first (perturbation) pass runs under
``local_perturbation`` (DDP's ``no_sync``), the passes whose gradients enter the update are
averaged. For every algorithm sharpfused exports this checks, after EVERY step, that the
replicas hold bit-identical parameters and optimizer state (base and algorithm), and that the
result is the m-sharpness math: each replica perturbs with its own gradient, and what enters
the update is the average over the replicas (of the perturbed-point gradients; of the
first-pass quantities an algorithm's update or state uses -- GSAM's clean gradient, XSAM's
ascent, ...). Algorithms that cannot do it are refused before anything is perturbed.

One spawn runs every scenario; rank 0 saves what it saw, the tests compare it with a float64
simulation of the replicas made here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sharpfused
from sharpfused.buffers import FlatBuffer
from sharpfused.losses import bisam_lower_bound

from .helpers import MLP, data, optimizer_snapshot, rel_err, run_gloo, same_values
from .reference import EPS, SGDRef, esam_draw_seed, slerp, topk_mask

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
STEPS = 4
N = 16  # full batch; each rank takes N // WORLD rows
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
BUCKETS = [65, 8]  # numel of the two param groups (weights, biases): one bucket each (SSAM's scores)

# name -> (class name, algorithm kwargs, the optimizer's all-reduces per step (numels) under m-sharpness)
CONFIGS = {
    "SAM": ("SAM", dict(rho=0.05), lambda t: []),
    "ASAM": ("SAM", dict(rho=0.5, adaptive=True, eta=0.01), lambda t: []),
    "BiSAM": ("BiSAM", dict(rho=0.05), lambda t: []),
    "SSAM": ("SSAM", dict(rho=0.05, sparsity=0.5, mask="fisher", mask_every=2), lambda t: BUCKETS if t % 2 == 0 else []),
    "SSAM-random": ("SSAM", dict(rho=0.05, sparsity=0.5, mask="random", mask_every=2), lambda t: BUCKETS if t % 2 == 0 else []),
    "FriendlySAM": ("FriendlySAM", dict(rho=0.05, sigma=1.0, lam=0.6), lambda t: FLAT),
    "GSAM": ("GSAM", dict(rho_max=0.05, alpha=0.3), lambda t: FLAT),
    "XSAM-a1": ("XSAM", dict(rho=0.15, alpha=1.0, steps=1), lambda t: FLAT),
    "XSAM": ("XSAM", dict(rho=0.15, alpha=0.6, steps=2), lambda t: FLAT),
    "LookSAM": ("LookSAM", dict(rho=0.05, k=2, beta=0.7), lambda t: FLAT),
    "BSAM": ("BSAM", dict(rho_max=0.05), lambda t: FLAT),
    "SAMPa": ("SAMPa", dict(rho=0.1, lam=0.2), None),  # refused
    "ESAM": ("ESAM", dict(rho=0.05, beta=0.5, seed=3), lambda t: []),  # same seed: one mask for every replica
    "MESA": ("MESA", dict(decay=0.9), None),  # refused: one pass, nothing perturbed
    "MSAM": ("MSAM", dict(rho=0.3), None),  # refused: one pass, at a point the momentum gives
    "RST": ("RST", dict(rho=0.05, p=0.5), None),  # refused: a plain step's one pass would be local
    "AESAM": ("AESAM", dict(rho=0.05), None),  # refused: the same, and the choice would follow local gradients
}
SUPPORTED = [n for n, c in CONFIGS.items() if c[2] is not None]
REFUSED = [n for n, c in CONFIGS.items() if c[2] is None]
# every algorithm sharpfused exports is covered
assert {c[0] for c in CONFIGS.values()} == {n for n in sharpfused.__all__ if isinstance(getattr(sharpfused, n), type)
                                             and issubclass(getattr(sharpfused, n), sharpfused.SharpnessAware)
                                             and n != "SharpnessAware"}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP(d_in=10, d_hidden=5, d_out=3).double()


def groups(model):
    ps = list(model.named_parameters())
    return [{"params": [p for n, p in ps if n.endswith("weight")]}, {"params": [p for n, p in ps if n.endswith("bias")]}]


# flat buffers (a first-pass quantity averaged in one all-reduce per bucket) pad each tensor's
# segment to 16 bytes: the numels of the two buckets' buffers
FLAT = [FlatBuffer(g["params"]).flat.numel() for g in groups(make_model())]
assert sorted(FLAT) == [10, 66]  # 50 + 15 -> 50 + 16 and 5 + 3 -> 6 + 4 float64 elements


def make_opt(model, name):
    cls, kw, _ = CONFIGS[name]
    return getattr(sharpfused, cls)(groups(model), torch.optim.SGD, **kw, **SGD)


def batch(t: int, rank: int):
    x, y = data("mlp", n=N, seed=200 + t)
    n = N // WORLD
    return x.double()[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(name, out, y, perturbation=False):
    if name == "BiSAM" and perturbation:
        return bisam_lower_bound(out, y)
    return F.cross_entropy(out, y)


def manual_step(name, model, opt, x, y, scale=1.0):
    """One m-sharpness step by hand: first pass (and XSAM's ascent passes) local, the rest averaged."""
    cls = CONFIGS[name][0]
    with sharpfused.distributed.local_perturbation(model):
        (loss_fn(name, model(x), y, perturbation=True) * scale).backward()
        full = opt.first_step(zero_grad=True)
        for _ in range(getattr(opt, "steps", 1) - 1):
            loss_fn(name, model(x), y).backward()
            opt.ascent_step(zero_grad=True)
    if cls == "LookSAM" and full is False:
        return  # a reuse step is done after its one pass
    loss_fn(name, model(x), y).backward()
    if cls == "BSAM":
        opt.bilateral_step(zero_grad=True)
        loss_fn(name, model(x), y).backward()
    opt.second_step(zero_grad=True)


def closure_step(name, model, opt, x, y):
    """``opt.step(closure)`` with the whole step inside the context."""

    def closure(perturbation=False):
        loss = loss_fn(name, model(x), y, perturbation=perturbation)
        loss.backward()
        return loss

    with sharpfused.distributed.local_perturbation(model):
        if CONFIGS[name][0] == "BiSAM":
            opt.step(closure)
        else:
            opt.step(lambda: closure())


def param_diff(a, b, n) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a[:n], b[:n]))


class Counter:
    """The all_reduce calls the optimizer makes (DDP's own reducer does not go through dist.all_reduce)."""

    def __init__(self):
        self.calls, self._orig = [], None

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls.append(tensor.numel())
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


# ------------------------------------------------------------------ worker
def _run(name, rank, step_fn, bad_steps=()):
    """STEPS steps; after each, whether the replicas agree bit for bit (params and all state)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1234 + rank)  # rank-dependent global RNG (as with per-rank augmentation seeds)
    model = DDP(make_model())
    opt = make_opt(model.module, name)
    n = len(list(model.parameters()))
    rec = dict(identical=[], diff=[], calls=[], skipped=[], error=None)
    for t in range(STEPS):
        x, y = batch(t, rank)
        before = optimizer_snapshot(model.module, opt)
        with Counter() as c:
            try:
                if bad_steps:
                    step_fn(name, model, opt, x, y, scale=math.inf if (rank == 1 and t in bad_steps) else 1.0)
                else:
                    step_fn(name, model, opt, x, y)
            except Exception as exc:  # a refusal: must leave everything as it was
                rec["error"] = (type(exc).__name__, str(exc), same_values(before, optimizer_snapshot(model.module, opt)))
                break
        rec["calls"].append(sorted(c.calls))
        s = opt.last_step_skipped
        rec["skipped"].append(None if s is None else bool(s))
        snaps = [None] * WORLD
        dist.all_gather_object(snaps, optimizer_snapshot(model.module, opt))
        rec["identical"].append(same_values(snaps[0], snaps[1]))
        rec["diff"].append(param_diff(snaps[0], snaps[1], n))
        skips = [None] * WORLD
        dist.all_gather_object(skips, rec["skipped"][-1])
        rec["skipped_agree"] = rec.get("skipped_agree", True) and skips[0] == skips[1]
    rec["params"] = [p.detach().clone() for p in model.module.parameters()]
    return rec


def _worker(rank):
    out = {"manual": {}, "closure": {}, "nonfinite": {}}
    for name in SUPPORTED:
        out["manual"][name] = _run(name, rank, manual_step)
    for name in CONFIGS:
        out["closure"][name] = _run(name, rank, closure_step)
    for name in SUPPORTED:
        out["nonfinite"][name] = _run(name, rank, manual_step, bad_steps=(1, 2))
    return out



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_gloo(_worker, tmp_path_factory.mktemp("msharp"), nprocs=WORLD)[0]


# ------------------------------------------------------------------ float64 simulation of the replicas
def _grad_fn(model, loss="ce"):
    names = [n for n, _ in model.named_parameters()]

    def grad(params, x, y):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        value = bisam_lower_bound(out, y) if loss == "q" else F.cross_entropy(out, y)
        return list(torch.autograd.grad(value, ps))

    return grad


def _norm(xs):
    return math.sqrt(sum(float((x * x).sum()) for x in xs))


def _dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def _mean(lists):
    return [sum(xs) / len(xs) for xs in zip(*lists)]


def _axpy(x, a, y):
    return [xi + a * yi for xi, yi in zip(x, y)]


def m_sharpness_reference(name, steps=STEPS):
    """Each replica perturbs with its own first-pass gradient; the update uses replica averages."""
    cls, kw, _ = CONFIGS[name]
    model = make_model()
    grad, qgrad = _grad_fn(model), _grad_fn(model, "q")
    w = [p.detach().clone() for p in model.parameters()]
    group_of = [0, 1, 0, 1]  # weights, biases
    base = SGDRef(**SGD)
    state: dict = {}
    R = range(WORLD)
    for t in range(steps):
        xs = [batch(t, r) for r in R]
        g = [grad(w, *xs[r]) for r in R]  # local first-pass gradients
        if cls == "SAM" and kw.get("adaptive"):
            T = [wi.abs() + kw["eta"] for wi in w]
            e = []
            for r in R:
                n = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(T, g[r])))
                e.append([kw["rho"] * ti * ti * gi / (n + EPS) for ti, gi in zip(T, g[r])])
            d = _mean([grad([wi + ei for wi, ei in zip(w, e[r])], *xs[r]) for r in R])
        elif cls in ("SAM", "BiSAM"):
            q = [qgrad(w, *xs[r]) for r in R] if cls == "BiSAM" else g
            d = _mean([grad(_axpy(w, kw["rho"] / (_norm(q[r]) + EPS), q[r]), *xs[r]) for r in R])
        elif cls == "SSAM":
            if t % kw["mask_every"] == 0:
                if kw["mask"] == "fisher":
                    score = _mean([[gi * gi for gi in g[r]] for r in R])  # the replicas' mean Fisher score
                    masks = [None] * 4
                    for gr in (0, 1):
                        idx = [i for i in range(4) if group_of[i] == gr]
                        for i, m in zip(idx, topk_mask([score[i] for i in idx], 1.0 - kw["sparsity"])):
                            masks[i] = m
                    state["mask"] = masks
                else:
                    state["mask"] = None  # random: compared for agreement only
            if state["mask"] is None:
                d = None
            else:
                d = _mean([grad([wi + kw["rho"] / (_norm(g[r]) + EPS) * m * gi for wi, m, gi in zip(w, state["mask"], g[r])],
                                *xs[r]) for r in R])
        elif cls == "ESAM":  # the documented masks: one generator per step, the buckets (groups) in order
            gen = torch.Generator().manual_seed(esam_draw_seed(kw["seed"], t))
            masks = [None] * 4
            for gr in (0, 1):
                idx = [i for i in range(4) if group_of[i] == gr]
                sizes = [-(-w[i].numel() // 16) * 16 for i in idx]
                flat = torch.zeros(sum(sizes), dtype=torch.uint8).bernoulli_(kw["beta"], generator=gen)
                off = 0
                for i, size in zip(idx, sizes):
                    masks[i] = flat[off : off + w[i].numel()].view(w[i].shape).double()
                    off += size
            scale = [kw["rho"] / kw["beta"] / (_norm(g[r]) + EPS) for r in R]
            d = _mean([grad([wi + scale[r] * m * gi for wi, m, gi in zip(w, masks, g[r])], *xs[r]) for r in R])
        elif cls == "FriendlySAM":
            if "m" not in state:
                dirs = g
                state["m"] = _mean(g)
            else:
                dirs = [_axpy(g[r], -kw["sigma"], state["m"]) for r in R]
                state["m"] = [kw["lam"] * m + (1 - kw["lam"]) * gi for m, gi in zip(state["m"], _mean(g))]
            d = _mean([grad(_axpy(w, kw["rho"] / (_norm(dirs[r]) + EPS), dirs[r]), *xs[r]) for r in R])
        elif cls == "GSAM":
            gs = _mean([grad(_axpy(w, kw["rho_max"] / (_norm(g[r]) + EPS), g[r]), *xs[r]) for r in R])
            gbar = _mean(g)
            proj = _dot(gbar, gs) / (_norm(gs) ** 2 + EPS)
            d = _axpy(gs, -kw["alpha"], _axpy(gbar, -proj, gs))
        elif cls == "XSAM":
            k = kw["steps"]
            ends, us = [], []
            for r in R:
                wk, u = list(w), [torch.zeros_like(wi) for wi in w]
                for i in range(k):
                    gi = g[r] if i == 0 else grad(wk, *xs[r])
                    step = kw["rho"] / k / (_norm(gi) + EPS)
                    wk, u = _axpy(wk, step, gi), _axpy(u, step, gi)
                ends.append(wk)
                us.append(u)
            gk = _mean([grad(ends[r], *xs[r]) for r in R])
            u = _mean(us)  # the replicas' mean ascent
            v0 = [x / _norm(u) for x in u]
            v1 = [x / _norm(gk) for x in gk]
            d = [_norm(gk) * x for x in slerp(v0, v1, kw["alpha"])]
        elif cls == "LookSAM":
            gbar = _mean(g)
            if t % kw["k"] == 0:
                d = _mean([grad(_axpy(w, kw["rho"] / (_norm(g[r]) + EPS), g[r]), *xs[r]) for r in R])
                state["gv"] = _axpy(d, -_dot(gbar, d) / (_norm(gbar) ** 2 + EPS), gbar)
            else:
                d = _axpy(gbar, kw["beta"] * _norm(gbar) / (_norm(state["gv"]) + EPS), state["gv"])
        elif cls == "BSAM":
            gmax = _mean([grad(_axpy(w, kw["rho_max"] / (_norm(g[r]) + EPS), g[r]), *xs[r]) for r in R])
            gmin = _mean([grad(_axpy(w, -kw["rho_max"] / (_norm(g[r]) + EPS), g[r]), *xs[r]) for r in R])
            ratio = _norm(gmax) / (_norm(gmin) + EPS)
            d = [a + b - ratio * c for a, b, c in zip(gmax, _mean(g), gmin)]
        else:
            raise AssertionError(name)
        if d is None:
            return None
        w = base.step(w, d)
    return w


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", SUPPORTED)
def test_replicas_stay_identical_after_every_step(runs, name):
    r = runs["manual"][name]
    assert r["error"] is None, r["error"]
    assert r["identical"] == [True] * STEPS, f"{name}: replicas differ by {r['diff']} (params) after steps 1..{STEPS}"


@pytest.mark.parametrize("name", SUPPORTED)
def test_result_is_the_m_sharpness_math(runs, name):
    ref = m_sharpness_reference(name)
    if ref is None:
        pytest.skip("random mask: checked for agreement across replicas only")
    assert rel_err(runs["manual"][name]["params"], ref) < 1e-10


@pytest.mark.parametrize("name", SUPPORTED)
def test_cost_is_the_documented_all_reduces(runs, name):
    """SAM, ASAM, BiSAM: none (the first pass saves DDP's all-reduce); the others one per bucket."""
    expected = [sorted(CONFIGS[name][2](t)) for t in range(STEPS)]
    assert runs["manual"][name]["calls"] == expected


@pytest.mark.parametrize("name", SUPPORTED)
def test_step_closure_inside_the_context(runs, name):
    """``with local_perturbation(model): opt.step(closure)``: the optimizer averages the update passes itself."""
    r, manual = runs["closure"][name], runs["manual"][name]
    assert r["error"] is None, r["error"]
    assert r["identical"] == [True] * STEPS, r["diff"]
    assert rel_err(r["params"], manual["params"]) < 1e-12


@pytest.mark.parametrize("name", SUPPORTED)
def test_non_finite_local_pass_on_one_replica(runs, name):
    """Replica 1's first-pass gradient is inf/NaN at steps 2 and 3: the replicas still agree bit for bit
    (on the weights, the state and whether the step was skipped)."""
    r = runs["nonfinite"][name]
    assert r["error"] is None, r["error"]
    assert r["identical"] == [True] * STEPS, r["diff"]
    assert r["skipped_agree"], r["skipped"]
    assert all(torch.isfinite(p).all() for p in r["params"])


@pytest.mark.parametrize("name", REFUSED)
def test_refused_before_anything_moves(runs, name):
    """SAMPa has step(closure) only; inside the context it is refused before it perturbs."""
    r = runs["closure"][name]
    assert r["error"] is not None, f"{name} ran under local_perturbation (replicas differ by {r['diff']})"
    kind, msg, unchanged = r["error"]
    assert kind == "TypeError" and name in msg and "local_perturbation" in msg, msg
    assert "without local_perturbation" in msg  # the working alternative
    assert unchanged, "the refusal changed weights or state"
