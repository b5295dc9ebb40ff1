"""sharpfused with accelerate (sharpfused.integrations.accelerate) against the plain-PyTorch loop.

Float64 model, same initial weights and batches: bit for bit where the same operations run
(accelerator.backward of loss / 1 or loss / 2 is exact); tolerances where they cannot, with the
reason next to each (one large batch vs two half-means; bf16 autocast; the framework's clipping
against the optimizer's folded one).
"""

from __future__ import annotations

import math
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import sharpfused  # noqa: E402
from sharpfused.integrations import accelerate as sfa  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_model(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def data(n=16, inf_at=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    if inf_at is not None:
        x[inf_at, 0] = math.inf
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, n, 2)]  # micro-batches of 2


def loss_of(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


SGD = lambda m, **kw: sharpfused.SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)  # noqa: E731
ALGOS = {
    "sam": SGD,
    "looksam": lambda m, **kw: sharpfused.LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1, **kw),
    "xsam2": lambda m, **kw: sharpfused.XSAM(m.parameters(), torch.optim.SGD, rho=0.05, steps=2, lr=0.1, **kw),
    "bsam": lambda m, **kw: sharpfused.BSAM(m.parameters(), torch.optim.SGD, lr=0.1, **kw),
    "sampa": lambda m, **kw: sharpfused.SAMPa(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, **kw),
    "esam": lambda m, **kw: sharpfused.ESAM(m.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, seed=3, lr=0.1, **kw),
    "mesa": lambda m, **kw: sharpfused.MESA(m.parameters(), torch.optim.SGD, decay=0.9, lr=0.1, **kw),
}


def reference(make, mbs_per_step, steps, batches, **kw):
    model = make_model()
    opt = make(model, **kw)
    f = loss_of(model)
    for s in range(steps):
        opt.step_accumulated(f, batches[s * mbs_per_step : (s + 1) * mbs_per_step])
    return model, opt


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_plain_prepare_hides_sam_and_reports_no_skip():
    """What accelerate alone does (the reason for wrap/prepare): no first_step, and a skipped step reads as taken."""
    acc = Accelerator(cpu=True)
    model = make_model()
    opt = acc.prepare(SGD(model))
    assert not hasattr(opt, "first_step")
    x, y = data(inf_at=0)[0]
    acc.backward(F.cross_entropy(model(x), y))
    opt.optimizer.first_step(zero_grad=True)
    acc.backward(F.cross_entropy(model(x), y))
    opt.step()
    assert bool(opt.optimizer.last_step_skipped) and opt.step_was_skipped is False  # accelerate's answer
    sfa.wrap(opt)
    assert opt.step_was_skipped is True and acc.optimizer_step_was_skipped is True


def test_manual_protocol_through_prepared_optimizer():
    acc = Accelerator(cpu=True)
    model = make_model()
    model, opt = sfa.prepare(acc, model, SGD(model))
    assert isinstance(opt, sfa.SAMAcceleratedOptimizer) and isinstance(opt, AcceleratedOptimizer)
    batches = data()
    for x, y in batches[:4]:
        acc.backward(F.cross_entropy(model(x), y))
        opt.first_step(zero_grad=True)  # reachable through the prepared optimizer
        assert opt.perturbed
        acc.backward(F.cross_entropy(model(x), y))
        opt.step()  # = second_step()
        opt.zero_grad()
        assert not opt.perturbed and not opt.step_was_skipped
    ref, _ = reference(SGD, 1, 4, batches)
    assert same(model, ref)


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("gas", [1, 2])
def test_sam_step_accumulation_is_large_batch(name, gas):
    """sam_step over 2 micro-batches == step_accumulated (bit for bit), whether or not the accelerator
    itself divides by gradient_accumulation_steps."""
    acc = Accelerator(cpu=True, gradient_accumulation_steps=gas)
    model = make_model()
    model, opt = sfa.prepare(acc, model, ALGOS[name](model))
    batches = data()
    losses = []
    for s in range(4):
        losses.append(sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], model=model))
        opt.zero_grad()
    ref, _ = reference(ALGOS[name], 2, 4, batches)
    assert same(model, ref), name
    assert all(torch.isfinite(v) for v in losses)
    if name != "sampa":  # the first pass's mean loss (SAMPa: the loss at its perturbed point)
        first = (loss_of(make_model())(batches[0]) + loss_of(make_model())(batches[1])) / 2
        assert losses[0].item() == pytest.approx(first.item(), rel=1e-14)


def test_sam_step_equals_one_large_batch():
    acc = Accelerator(cpu=True)
    model = make_model()
    model, opt = sfa.prepare(acc, model, SGD(model))
    batches = data()
    for s in range(4):
        sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], model=model)
        opt.zero_grad()
    big = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(batches[::2], batches[1::2])]
    ref, _ = reference(SGD, 1, 4, big)
    for p, q in zip(model.parameters(), ref.parameters()):  # mean of 4 vs two half-means of 2: rounding only
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_skipped_step_prepared_scheduler_does_not_step():
    acc = Accelerator(cpu=True)
    model = make_model()
    opt = SGD(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, opt, sched = sfa.prepare(acc, model, opt, sched)
    batches = data(inf_at=4)  # micro-batch 2 = the second step's first micro-batch
    skipped = []
    for s in range(4):
        sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], model=model)
        skipped.append((opt.step_was_skipped, acc.optimizer_step_was_skipped))
        sched.step()
        opt.zero_grad()
    assert skipped == [(False, False), (True, True), (False, False), (False, False)]
    assert sched.scheduler.last_epoch == 3 and int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_grad_norm_and_clip_grad_norm():
    """Clipping of the update gradient: the optimizer's max_grad_norm (bit for bit with the plain loop);
    accelerator.clip_grad_norm_ between the passes clips the last pass's gradient, which for SAM is
    the update gradient (same result to rounding: torch scales the gradients, the optimizer folds the
    factor into its step)."""
    batches = data()
    acc = Accelerator(cpu=True)
    model = make_model()
    model, opt = sfa.prepare(acc, model, SGD(model, max_grad_norm=0.05))
    for s in range(4):
        sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], model=model)
        opt.zero_grad()
    ref, _ = reference(SGD, 2, 4, batches, max_grad_norm=0.05)
    assert same(model, ref)
    unclipped, _ = reference(SGD, 2, 4, batches)
    assert not same(model, unclipped)

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    m2 = make_model()
    m2, o2 = sfa.prepare(acc, m2, SGD(m2))
    for s in range(4):
        f = loss_of(m2)
        for b in batches[2 * s : 2 * s + 2]:
            acc.backward(f(b) / 2)
        o2.first_step(zero_grad=True)
        for b in batches[2 * s : 2 * s + 2]:
            acc.backward(f(b) / 2)
        acc.clip_grad_norm_(m2.parameters(), 0.05)
        o2.step()
        o2.zero_grad()
    for p, q in zip(m2.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_bf16_mixed_precision_cpu():
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    assert acc.scaler is None  # bf16: no loss scaling
    model = make_model(torch.float32)
    model, opt = sfa.prepare(acc, model, SGD(model))
    batches = data(dtype=torch.float32)
    for s in range(4):
        loss = sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], model=model)
        assert torch.isfinite(loss)
        opt.zero_grad()
    ref = make_model(torch.float32)
    ropt = SGD(ref)

    def f(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ref(b[0])
        return F.cross_entropy(out.float(), b[1])

    for s in range(4):
        ropt.step_accumulated(f, batches[2 * s : 2 * s + 2])
    for p, q in zip(model.parameters(), ref.parameters()):  # same bf16 autocast; accelerate's fp32 output cast
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bisam_perturbation_loss():
    acc = Accelerator(cpu=True)
    model = make_model()
    make = lambda m: sharpfused.BiSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)  # noqa: E731
    model, opt = sfa.prepare(acc, model, make(model))
    batches = data()
    lower = lambda m: lambda b: sharpfused.losses.bisam_lower_bound(m(b[0]), b[1], backend="torch")  # noqa: E731
    with pytest.raises(ValueError, match="perturbation_loss_fn"):
        sfa.sam_step(acc, opt, loss_of(model), batches[:2])
    for s in range(3):
        sfa.sam_step(acc, opt, loss_of(model), batches[2 * s : 2 * s + 2], perturbation_loss_fn=lower(model))
        opt.zero_grad()
    ref = make_model()
    ropt = make(ref)
    for s in range(3):
        mbs = batches[2 * s : 2 * s + 2]

        def closure(perturbation, mbs=mbs):
            fn = lower(ref) if perturbation else loss_of(ref)
            total = 0
            for b in mbs:
                loss = fn(b)
                (loss / 2).backward()
                total = total + loss.detach()
            return total / 2

        ropt.step(closure)
    assert same(model, ref)


def test_sam_step_refusals():
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    model, opt = sfa.prepare(acc, model, SGD(model))
    b = data()[:2]
    acc.backward(loss_of(model)(b[0]))
    with pytest.raises(RuntimeError, match="gradients are present"):
        sfa.sam_step(acc, opt, loss_of(model), b)
    opt.zero_grad()
    with acc.accumulate(model):  # first call: not a sync step
        with pytest.raises(RuntimeError, match="sync_gradients is False"):
            sfa.sam_step(acc, opt, loss_of(model), b)
    assert not opt.perturbed
    with pytest.raises(TypeError, match="sharpfused optimizer"):
        sfa.sam_step(acc, torch.optim.SGD(model.parameters(), lr=0.1), loss_of(model), b)
    with pytest.raises(ValueError, match="at least one"):
        sfa.sam_step(acc, opt, loss_of(model), [])


def test_exception_in_pass_aborts_step():
    acc = Accelerator(cpu=True)
    model = make_model()
    model, opt = sfa.prepare(acc, model, SGD(model))
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def bad(b):
        calls.append(opt.perturbed)
        if opt.perturbed:
            raise KeyError("boom")
        return loss_of(model)(b)

    with pytest.raises(KeyError):
        sfa.sam_step(acc, opt, bad, data()[:2])
    assert calls == [False, False, True] and not opt.perturbed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_doc_snippet_runs():
    text = (ROOT / "docs" / "accelerate.md").read_text()
    m = re.search(r"<!-- snippet: accelerate -->\s*```python\n(.*?)```", text, re.S)
    assert m, "no '<!-- snippet: accelerate -->' python block in docs/accelerate.md"
    exec(compile(m.group(1), "docs/accelerate.md", "exec"), {"__name__": "snippet"})
