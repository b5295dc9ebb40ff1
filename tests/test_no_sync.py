"""No hidden host sync inside a step, seen at the dispatcher (below any Python-level patch).

A step on device tensors must never wait for the device:

* no read of a device value: ``aten._local_scalar_dense`` and ``aten.item`` are what ``.item()``,
  ``bool()``, ``float()`` and a 0-d tensor passed where a number is expected (e.g. as a foreach
  "scalar") all end in;
* no device-to-host copy, and no host-to-device copy from pageable memory or without
  ``non_blocking`` (CUDA synchronizes the stream for those): seen at ``aten._to_copy`` /
  ``aten.copy_``, and ``torch.tensor(..., device=<not cpu>)`` at the torch-function level (its copy
  happens below the dispatch mode).

Every algorithm, SGD and AdamW bases, on the torch backend's device path (on CPU
``HOST_BRANCH_ON_CPU = False`` is the code a GPU runs), on the Triton backend (interpreted on CPU,
compiled on a GPU) and, on a GPU, the CUDA backend. Only the steps after the first are held to it:
the first step creates state and reads the skip flag once (see the README). On CPU the copy checks
have nothing to see (every tensor is on the host); on a GPU (``bench/gpu_check.sh``) they do.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import sharpfused
from sharpfused import ops
from sharpfused.backends import torch_ops

from .helpers import TRITON_DEVICES

SYNCS = ("aten._local_scalar_dense", "aten.item")
COPIES = ("aten._to_copy", "aten.copy_", "aten._copy_from")


def _copy_hit(name, args, kwargs):
    """Why this copy blocks the host (None when it does not)."""
    if name.startswith("aten._to_copy"):
        src = args[0]
        dst = kwargs.get("device") or src.device
        non_blocking = kwargs.get("non_blocking", False)
    else:
        dst, src = args[0].device, args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    src_dev, dst = src.device, torch.device(dst)
    if src_dev.type == "cpu" and dst.type != "cpu" and not (src.is_pinned() and non_blocking):
        return f"{name}: host-to-device copy from {'pinned' if src.is_pinned() else 'pageable'} memory, non_blocking={non_blocking}"
    if src_dev.type != "cpu" and dst.type == "cpu":
        return f"{name}: device-to-host copy"
    return None


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = str(func), kwargs or {}
        if name.startswith(SYNCS):
            self.hits.append(name)
        elif name.startswith(COPIES):
            why = _copy_hit(name, args, kwargs)
            if why:
                self.hits.append(why)
        return func(*args, **kwargs)


class TensorFactoryDetector(TorchFunctionMode):
    """``torch.tensor(data, device=<a device>)``: a pageable host-to-device copy the dispatcher does not show."""

    def __init__(self, hits):
        super().__init__()
        self.hits = hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != "cpu":
                self.hits.append(f"torch.{func.__name__}(..., device={kwargs['device']})")
        return func(*args, **kwargs)


def _where():
    """(backend, device) pairs a step runs on here."""
    out = [("torch", "cpu")] + [("triton", d) for d in TRITON_DEVICES]
    if torch.cuda.is_available():
        out.append(("torch", "cuda"))
        if ops.unavailable_reason("cuda", torch.device("cuda")) is None:
            out.append(("cuda", "cuda"))
    return out


ALGOS = {
    "SAM": dict(rho=0.05),
    "ASAM": dict(rho=0.5, adaptive=True, eta=0.01),
    "GSAM": dict(rho_max=0.05, rho_min=0.01, lr_max=0.2),
    "BiSAM": dict(rho=0.05),
    "XSAM": dict(rho=0.1, alpha=0.5, steps=2),
    "SAMPa": dict(rho=0.1),
    "BSAM": dict(rho_max=0.05),
    "SSAM": dict(rho=0.05, mask_every=1000),  # a mask refresh (not this step) reads the host once
    "LookSAM": dict(rho=0.05, k=2),
    "FriendlySAM": dict(rho=0.05),
    "ESAM": dict(rho=0.05, beta=0.5, seed=1),  # the mask is drawn on the device
    "MESA": dict(decay=0.9),
}


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("backend,device", _where())
def test_a_step_never_waits_for_the_device(name, base, backend, device, monkeypatch):
    monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    lr = 0.1 if base == "sgd" else 1e-3
    if device == "cpu":
        lr = torch.tensor(lr)  # a CPU tensor lr (torch.optim allows it): read on the host, free
    cls, kw = (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4)) if base == "sgd" else (torch.optim.AdamW, {})
    opt = getattr(sharpfused, "SAM" if name == "ASAM" else name)(
        model.parameters(), cls, lr=lr, backend=backend, **ALGOS[name], **kw
    )
    x = torch.randn(5, 8, device=device)

    def closure(perturbation=None):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for t in range(4):
        detector = SyncDetector()
        with detector, TensorFactoryDetector(detector.hits):
            opt.step(closure)
        if t >= 2:
            assert not detector.hits, f"{name}+{base} on {backend}/{device}, step {t}: {detector.hits}"


def test_the_detector_sees_a_sync():
    detector = SyncDetector()
    with detector:
        torch._foreach_add_([torch.zeros(2)], torch.tensor(1.0))  # 0-d tensor as a foreach scalar
    assert detector.hits


def test_the_detector_sees_blocking_copies(monkeypatch):
    """The copy rules, on tensors that only pretend to be elsewhere (CPU here)."""
    host, dev = torch.zeros(3), torch.zeros(3, device="meta")
    assert _copy_hit("aten._to_copy.default", (host,), {"device": torch.device("cuda")}) is not None
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    assert _copy_hit("aten._to_copy.default", (host,), {"device": torch.device("cuda"), "non_blocking": True}) is None
    assert _copy_hit("aten._to_copy.default", (host,), {"device": torch.device("cuda")}) is not None  # blocking
    assert "device-to-host" in _copy_hit("aten._to_copy.default", (dev,), {"device": torch.device("cpu")})
    assert "device-to-host" in _copy_hit("aten.copy_.default", (host, dev), {})
    hits = []
    with TensorFactoryDetector(hits):
        torch.tensor([1, 2], device="meta")
        torch.tensor([1, 2], device="cpu")
    assert hits == ["torch.tensor(..., device=meta)"]
