"""DDP and FSDP2 (CPU, gloo, 2 processes) against the single-process run on the concatenated batch.

One spawn runs every distributed scenario (spawning costs more than the scenarios) and rank 0
saves what it saw; the tests below compare that with single-process runs made here. float64
throughout, so agreement is limited by summation order only.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import sharpfused

from .helpers import MLP, data, optimizer_snapshot, rel_err, run_gloo, same_values

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
STEPS = 4
N = 16  # full batch; each rank takes N // WORLD rows
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)

# name -> (class name, algorithm kwargs, base optimizer, base kwargs, optimizer all-reduces per step:
# one per reduction stage, the final-gradient check (non-finite skip, clipping) included)
CONFIGS = {
    "SAM": ("SAM", dict(rho=0.05), torch.optim.SGD, SGD, 2),
    "ASAM-adamw": ("SAM", dict(rho=0.5, adaptive=True, eta=0.01), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), 2),
    "GSAM": ("GSAM", dict(rho_max=0.05, alpha=0.3), torch.optim.SGD, SGD, 3),
    "XSAM": ("XSAM", dict(rho=0.15, rho_max=0.3, alpha=0.7, steps=2), torch.optim.SGD, SGD, 4),
    "FriendlySAM": ("FriendlySAM", dict(rho=0.05, sigma=1.0, lam=0.6), torch.optim.SGD, SGD, 2),  # state_buffer
}
CONFIGS = {k: v for k, v in CONFIGS.items() if hasattr(sharpfused, v[0])}
CKPT = ["SAM", "ASAM-adamw", "GSAM", "FriendlySAM"]  # FriendlySAM: algorithm-owned state in the checkpoint


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP(d_in=10, d_hidden=5, d_out=3).double()  # 5 and 3 rows shard unevenly over 2 ranks


def groups(model):
    """Two param groups (so two buckets): weights, and biases without weight decay."""
    ps = list(model.named_parameters())
    return [
        {"params": [p for n, p in ps if n.endswith("weight")]},
        {"params": [p for n, p in ps if n.endswith("bias")], "weight_decay": 0.0},
    ]


def make_opt(model, name):
    cls, kw, base, base_kw, _ = CONFIGS[name]
    return getattr(sharpfused, cls)(groups(model), base, **kw, **base_kw)


def batch(t: int, rank: int | None = None):
    x, y = data("mlp", n=N, seed=100 + t)
    x = x.double()
    if rank is None:
        return x, y
    n = N // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def run_steps(model, opt, steps, rank=None, start=0, on_pass=None):
    for t in range(start, start + steps):
        opt.step(make_closure(model, *batch(t, rank), on_pass))


def make_closure(model, x, y, on_pass=None):
    def closure():
        if on_pass:
            on_pass(True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if on_pass:
            on_pass(False)
        return loss

    return closure


def full_params(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ worker


class Counter:
    """Records the all_reduce calls made outside forward/backward (i.e. by the optimizer)."""

    def __init__(self):
        self.calls, self.in_pass, self._orig = [], False, None

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            if not self.in_pass:
                self.calls.append(tensor.numel())
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig

    def pass_(self, inside: bool):
        self.in_pass = inside


def _fsdp(model, mesh):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.net[0], mesh=mesh)
    fully_shard(model.net[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ddp_scenarios(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for name in CONFIGS:
        model = DDP(make_model())
        opt = make_opt(model.module, name)
        with Counter() as c:
            run_steps(model, opt, STEPS, rank, on_pass=c.pass_)
        out["ddp"][name] = full_params(model.module)
        out["ddp_calls"][name] = c.calls

    # m-sharpness: perturb with the local gradient, average only the second pass
    model = DDP(make_model())
    opt = sharpfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD)
    with Counter() as c:
        for t in range(STEPS):
            x, y = batch(t, rank)
            with sharpfused.distributed.local_perturbation(model):
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    out["msharp"] = full_params(model.module)
    out["msharp_calls"] = c.calls


def _fsdp_scenarios(rank, out, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for name in CONFIGS:
        model = _fsdp(make_model(), mesh)
        opt = make_opt(model, name)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        with Counter() as c:
            run_steps(model, opt, STEPS, rank, on_pass=c.pass_)
        out["fsdp"][name] = full_params(model)
        out["fsdp_calls"][name] = c.calls
        with pytest.raises(TypeError, match="FSDP2"):
            with sharpfused.distributed.local_perturbation(model):
                pass

    # HSDP: (Replicate, Shard) placements; the replicate dim must not be summed
    hmesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    model = _fsdp(make_model(), hmesh)
    opt = make_opt(model, "SAM")
    out["hsdp_placements"] = [str(p.placements) for p in model.parameters()][:1]
    with Counter() as c:
        run_steps(model, opt, STEPS, rank, on_pass=c.pass_)
    out["hsdp"] = full_params(model)
    out["hsdp_calls"] = c.calls

    # sharded checkpoint at step 3, resumed in a fresh model and optimizer, run to step 6
    for name in [n for n in CKPT if n in CONFIGS]:
        model = _fsdp(make_model(), mesh)
        opt = make_opt(model, name)
        run_steps(model, opt, 6, rank)
        straight = full_params(model)

        model = _fsdp(make_model(), mesh)
        opt = make_opt(model, name)
        run_steps(model, opt, 3, rank)
        path = os.path.join(ckpt_dir, name)
        dcp.save(
            {"model": get_model_state_dict(model), "optim": sharpfused.distributed.get_optimizer_state_dict(model, opt)},
            checkpoint_id=path,
        )
        del model, opt

        model = _fsdp(make_model(seed=1), mesh)  # different init: everything must come from the checkpoint
        opt = make_opt(model, name)
        fresh = full_params(model)
        sd = {"model": get_model_state_dict(model), "optim": sharpfused.distributed.get_optimizer_state_dict(model, opt)}
        unchanged = max(float((a - b).abs().max()) for a, b in zip(fresh, full_params(model)))
        untouched_state = len(opt.state) + len(opt.base_optimizer.state)  # the template leaves it fresh
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        sharpfused.distributed.set_optimizer_state_dict(model, opt, sd["optim"])
        run_steps(model, opt, 3, rank, start=3)
        out["ckpt"][name] = dict(straight=straight, resumed=full_params(model), init_moved=unchanged,
                                 template_state=untouched_state)


def _worker(rank, ckpt_dir):
    out = {"ddp": {}, "ddp_calls": {}, "fsdp": {}, "fsdp_calls": {}, "ckpt": {}}
    _ddp_scenarios(rank, out)
    _fsdp_scenarios(rank, out, ckpt_dir)
    return out



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    return run_gloo(_worker, tmp, str(tmp), nprocs=WORLD)[0]


def single_process(name, steps=STEPS):
    model = make_model()
    opt = make_opt(model, name)
    run_steps(model, opt, steps)
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_equals_single_process_full_batch(runs, name):
    ref = single_process(name)
    assert rel_err(runs["ddp"][name], ref) < 1e-12
    assert runs["ddp_calls"][name] == []  # DDP averages gradients; the optimizer adds no collective


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_equals_single_process_full_batch(runs, name):
    ref = single_process(name)
    assert rel_err(runs["fsdp"][name], ref) < 1e-12


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_one_small_all_reduce_per_stage(runs, name):
    """Two buckets (param groups), four sharded tensors: still one all_reduce per norm or dot product."""
    per_step = CONFIGS[name][4]
    calls = runs["fsdp_calls"][name]
    assert len(calls) == STEPS * per_step, calls
    assert all(n in (1, 3) for n in calls), calls  # a squared norm, or (<a,b>, |a|^2, |b|^2)


def test_hsdp_replicate_dim_not_double_counted(runs):
    assert "Replicate" in runs["hsdp_placements"][0] and "Shard" in runs["hsdp_placements"][0]
    assert rel_err(runs["hsdp"], single_process("SAM")) < 1e-12
    assert len(runs["hsdp_calls"]) == STEPS * CONFIGS["SAM"][4]  # reduced over the shard dim only


def m_sharpness_reference(steps=STEPS, rho=0.05):
    """Each half-batch perturbs with its own gradient and norm; the perturbed gradients are averaged."""
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, **SGD)
    for t in range(steps):
        w0 = [p.detach().clone() for p in params]
        gs = []
        for r in range(WORLD):
            xr, yr = batch(t, r)
            g = torch.autograd.grad(F.cross_entropy(model(xr), yr), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi, alpha=float(rho / (norm + 1e-12)))
            gs.append(torch.autograd.grad(F.cross_entropy(model(xr), yr), params))
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
        for p, *g in zip(params, *gs):
            p.grad = sum(g) / WORLD
        base.step()
        base.zero_grad()
    return [p.detach().clone() for p in params]


def test_m_sharpness_equals_per_half_perturbation(runs):
    ref = m_sharpness_reference()
    assert rel_err(runs["msharp"], ref) < 1e-12
    assert runs["msharp_calls"] == []  # the first-pass norm is local: no all-reduce
    full = copy.deepcopy(make_model())
    opt = sharpfused.SAM(full.parameters(), torch.optim.SGD, rho=0.05, **SGD)
    run_steps(full, opt, STEPS)
    assert rel_err(runs["msharp"], list(full.parameters())) > 1e-6  # m-sharpness is a different method


@pytest.mark.parametrize("name", CKPT)
def test_sharded_checkpoint_resume_equals_uninterrupted(runs, name):
    if name not in CONFIGS:
        pytest.skip(f"{name} not in sharpfused")
    r = runs["ckpt"][name]
    assert r["init_moved"] == 0.0  # preparing the load target leaves the weights alone
    assert r["template_state"] == 0  # ... and the optimizer without state
    assert rel_err(r["resumed"], r["straight"]) < 1e-14
    assert rel_err(r["straight"], single_process(name, steps=6)) < 1e-12


def test_local_perturbation_is_a_no_op_without_ddp():
    model = make_model()
    with sharpfused.distributed.local_perturbation(model):
        F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_adapter_rejects_plain_optimizers():
    model = make_model()
    with pytest.raises(TypeError, match="SharpnessAware"):
        sharpfused.distributed.get_optimizer_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ------------------------------------------------------------------------------ checkpoints never change state
def _ckpt_opt(model, name, base):
    base_cls, base_kw = {
        "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
        "sgd-plain": (torch.optim.SGD, dict(lr=0.1)),  # a base optimizer without state
        "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    }[base]
    cls, kw = {
        "SAM": ("SAM", dict(rho=0.05)),
        "SSAM": ("SSAM", dict(rho=0.05, sparsity=0.5, mask_every=2)),
        "SSAM-random": ("SSAM", dict(rho=0.05, sparsity=0.5, mask="random", mask_every=2)),
        "LookSAM": ("LookSAM", dict(rho=0.05, k=2)),
        "FriendlySAM": ("FriendlySAM", dict(rho=0.05, lam=0.6)),
        "GSAM": ("GSAM", dict(rho_max=0.05, alpha=0.3)),
        "XSAM": ("XSAM", dict(rho=0.15, alpha=0.6, steps=2)),
        "BSAM": ("BSAM", dict(rho_max=0.05)),
        "SAMPa": ("SAMPa", dict(rho=0.1)),
    }[name]
    return getattr(sharpfused, cls)(groups(model), base_cls, **kw, **base_kw)


def _everything(model, opt):
    """Weights, every state tensor and value (base and algorithm), hyperparameters, RNG: as a flat list."""
    out = optimizer_snapshot(model, opt)
    out.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    out.append(torch.random.get_rng_state())
    return out


CKPT_CASES = [(n, b) for n in ["SAM", "SSAM", "SSAM-random", "LookSAM", "FriendlySAM"] for b in ["sgd", "adamw"]] + [
    ("GSAM", "sgd"), ("XSAM", "sgd"), ("BSAM", "adamw"), ("SAMPa", "sgd"), ("LookSAM", "sgd-plain"), ("SAM", "sgd-plain"),
]


@pytest.mark.parametrize("name,base", CKPT_CASES)
def test_get_optimizer_state_dict_of_a_fresh_optimizer_changes_nothing(name, base):
    """Issue: a hidden lr=0 step initialized the state (SGD momentum = wd*w, AdamW step 1, algorithm state)."""
    torch.manual_seed(5)
    model = make_model()
    opt = _ckpt_opt(model, name, base)
    before = _everything(model, opt)
    sd = sharpfused.distributed.get_optimizer_state_dict(model, opt)
    assert same_values(_everything(model, opt), before)  # weights, state (still none), hyperparameters, RNG
    assert not opt.state and not opt.base_optimizer.state and all(p.grad is None for p in model.parameters())
    assert sd["sharpness_aware"]["fresh"] is True
    if base != "sgd-plain":  # the template has the entries a trained optimizer has (dcp.load fills them)
        assert len(sd["base_optimizer"]["state"]) == len(list(model.parameters()))
    run_steps(model, opt, 4)
    after_call = _everything(model, opt)

    torch.manual_seed(5)
    model = make_model()
    opt = _ckpt_opt(model, name, base)
    run_steps(model, opt, 4)
    assert same_values(after_call, _everything(model, opt))


@pytest.mark.parametrize("name,base", [("LookSAM", "sgd-plain"), ("FriendlySAM", "sgd-plain"), ("SSAM", "sgd-plain")])
def test_get_optimizer_state_dict_of_a_trained_optimizer_changes_nothing(name, base):
    """A trained optimizer whose base optimizer keeps no state (SGD without momentum) got the hidden step
    on every call (LookSAM's counter, FriendlySAM's momentum, SSAM's mask schedule moved)."""
    model = make_model()
    opt = _ckpt_opt(model, name, base)
    run_steps(model, opt, 3)
    before = _everything(model, opt)
    sd = sharpfused.distributed.get_optimizer_state_dict(model, opt)
    assert same_values(_everything(model, opt), before)
    assert sd["sharpness_aware"]["fresh"] is False and sd["sharpness_aware"]["state"]


def test_get_optimizer_state_dict_keeps_gradients_and_hooks():
    """Gradients already there (a backward before the first step) are kept, and a fresh template is
    still complete; no step hook of the user sees the throwaway step."""
    model = make_model()
    opt = _ckpt_opt(model, "SAM", "sgd")
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(a))
    sd = sharpfused.distributed.get_optimizer_state_dict(model, opt)
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), grads, values))
    assert len(sd["base_optimizer"]["state"]) == len(grads) and not opt.base_optimizer.state
    assert calls == []


def _dcp_resume(tmp_path, name, base, save_at, total):
    """Train ``save_at`` steps, dcp.save, resume in a fresh model/optimizer (other init), train to ``total``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = make_model()
    opt = _ckpt_opt(model, name, base)
    run_steps(model, opt, save_at)
    path = str(tmp_path / f"{name}-{base}-{save_at}")
    dcp.save({"model": get_model_state_dict(model), "optim": sharpfused.distributed.get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    model = make_model(seed=1)
    opt = _ckpt_opt(model, name, base)
    sd = {"model": get_model_state_dict(model), "optim": sharpfused.distributed.get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    sharpfused.distributed.set_optimizer_state_dict(model, opt, sd["optim"])
    run_steps(model, opt, total - save_at, start=save_at)
    return _everything(model, opt)


@pytest.mark.parametrize("name,base", [("SAM", "sgd"), ("SAM", "adamw"), ("SSAM", "sgd"), ("LookSAM", "adamw"),
                                       ("FriendlySAM", "sgd"), ("LookSAM", "sgd-plain")])
def test_dcp_resume_single_process_is_bit_identical(tmp_path, name, base):
    model = make_model()
    opt = _ckpt_opt(model, name, base)
    run_steps(model, opt, 5)
    straight = _everything(model, opt)
    assert same_values(_dcp_resume(tmp_path, name, base, 3, 5)[:-1], straight[:-1])  # the RNG state aside
    # a fresh optimizer's checkpoint, loaded into a fresh one, then trained: fresh training
    assert same_values(_dcp_resume(tmp_path, name, base, 0, 5)[:-1], straight[:-1])


@pytest.mark.parametrize("name,base", [("SAM", "sgd"), ("LookSAM", "adamw"), ("FriendlySAM", "sgd")])
def test_fresh_state_dict_loaded_in_memory_gives_a_fresh_optimizer(name, base):
    """set_optimizer_state_dict of a fresh dict: the placeholders made on throwaway state are not loaded."""
    model = make_model()
    opt = _ckpt_opt(model, name, base)
    sd = sharpfused.distributed.get_optimizer_state_dict(model, opt)
    model2 = make_model()
    opt2 = _ckpt_opt(model2, name, base)
    run_steps(model2, opt2, 2)  # a trained optimizer loading a fresh dict becomes fresh
    sharpfused.distributed.set_optimizer_state_dict(model2, opt2, sd)
    assert not opt2.state and not opt2.base_optimizer.state
    model2.load_state_dict(model.state_dict())
    run_steps(model, opt, 3)
    run_steps(model2, opt2, 3)
    assert same_values(_everything(model2, opt2), _everything(model, opt))


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("name", ["SAM", "FriendlySAM", "LookSAM"])
def test_torch_dcp_functions_on_a_sharpfused_optimizer_name_ours(name, trained):
    """torch's get/set_optimizer_state_dict on the wrapper itself would run a hidden step (fresh) or drop
    the nested base optimizer state (trained): refused, naming sharpfused.distributed's functions, with
    nothing changed (torch had set lr = 0 and zero gradients for its hidden step: put back)."""
    from torch.distributed.checkpoint import state_dict as tsd

    model = make_model()
    opt = _ckpt_opt(model, name, "sgd")
    if trained:
        run_steps(model, opt, 2)
    before = _everything(model, opt)
    with pytest.raises(TypeError, match="sharpfused.distributed.get_optimizer_state_dict"):
        tsd.get_optimizer_state_dict(model, opt)
    assert same_values(_everything(model, opt), before) and all(p.grad is None for p in model.parameters())
    sd = sharpfused.distributed.get_optimizer_state_dict(model, opt)
    with pytest.raises(TypeError, match="sharpfused.distributed.set_optimizer_state_dict"):
        tsd.set_optimizer_state_dict(model, opt, sd["base_optimizer"])
    assert same_values(_everything(model, opt), before)


def test_checkpoint_adapter_refused_mid_step():
    model = make_model()
    opt = _ckpt_opt(model, "SAM", "sgd")
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="between first_step"):
        sharpfused.distributed.get_optimizer_state_dict(model, opt)
    with pytest.raises(RuntimeError, match="between first_step"):
        sharpfused.distributed.set_optimizer_state_dict(model, opt, {})


def _abort_once(rank, flag_dir):
    import os

    flag = os.path.join(flag_dir, f"aborted{rank}")
    if rank == 1 and not os.path.exists(flag):
        open(flag, "w").close()
        os.abort()  # a rank dying of a signal, no Python error
    return rank


def _raise(rank, flag_dir):
    raise AssertionError("a test's own failure")


def test_run_gloo_retries_a_signal_death_once_and_never_a_test_failure(tmp_path):
    import torch.multiprocessing as mp

    with pytest.warns(UserWarning, match="died of SIGABRT"):
        assert run_gloo(_abort_once, tmp_path, str(tmp_path)) == [0, 1]
    with pytest.raises(mp.ProcessRaisedException, match="a test's own failure"):
        run_gloo(_raise, tmp_path, str(tmp_path))
