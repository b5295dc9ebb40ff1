"""Every algorithm's step on the triton backend runs Triton kernels only: no primitive falls back
to the torch backend (the dispatcher's one counter, ``ops.FALLBACKS``, and no torch-backend
primitive called at all). Float32 parameters, contiguous
(float64 and non-contiguous groups go to the torch backend by design, see kernels/table.py)."""

import pytest
import torch

import sharpfused
from sharpfused import ops
from sharpfused.backends import torch_ops

from .helpers import needs_interpreter

ALGOS = {
    "SAM": dict(rho=0.05),
    "ASAM": dict(rho=0.5, adaptive=True, eta=0.01),
    "GSAM": dict(rho_max=0.05, alpha=0.3),
    "BiSAM": dict(rho=0.05),
    "XSAM": dict(rho=0.1, alpha=0.5, steps=2),
    "SAMPa": dict(rho=0.1),
    "BSAM": dict(rho_max=0.05),
    "SSAM": dict(rho=0.05, mask_every=2),  # its uint8 mask goes to the perturb kernel as it is stored
    "LookSAM": dict(rho=0.05, k=2),
    "FriendlySAM": dict(rho=0.05),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_triton_step_calls_no_torch_backend_primitive(name, base, monkeypatch):
    calls = []
    for prim in ops.PRIMITIVES:
        real = getattr(torch_ops, prim)

        def counted(*a, _real=real, _name=prim, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(torch_ops, prim, counted)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    cls, kw = (torch.optim.SGD, dict(lr=0.1, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-3))
    opt = getattr(sharpfused, "SAM" if name == "ASAM" else name)(
        model.parameters(), cls, backend="triton", **ALGOS[name], **kw
    )
    x = torch.randn(5, 8)

    def closure(perturbation=None):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = ops.FALLBACKS.copy()
    for _ in range(4):  # full and reuse steps (LookSAM), mask refreshes (SSAM)
        opt.step(closure)
    fell = ops.FALLBACKS - before
    assert not fell, f"{name}+{base} fell back to the torch backend: {dict(fell)}"
    assert not calls, f"{name}+{base} fell back to the torch backend for {sorted(set(calls))}"


def test_fallback_counter_counts_what_triton_refuses():
    """float64 and non-contiguous groups go to the torch backend through the dispatcher, counted."""
    pytest.importorskip("triton")
    if ops.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
    before = ops.FALLBACKS.copy()
    x = [torch.randn(5, dtype=torch.float64), torch.randn(3, 4).t()]
    ops.sq_norm([x[0]], backend="triton")
    ops.restore_([x[1]], [torch.randn(4, 3)], backend="triton")
    assert ops.FALLBACKS - before == {("triton", "sq_norm"): 1, ("triton", "restore_"): 1}
