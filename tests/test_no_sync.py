"""No hidden host sync inside a step, seen at the dispatcher (below any Python-level patch).

A step on device tensors must never read a device value back: ``aten._local_scalar_dense`` and
``aten.item`` are what ``.item()``, ``bool()``, ``float()`` and a 0-d tensor passed where a number is
expected (e.g. as a foreach "scalar") all end in. On CPU the torch backend's device path
(``HOST_BRANCH_ON_CPU = False``) is the code a GPU runs. Only the steps after the first are held to
it: the first step creates state and reads the skip flag once (see the README).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sharpfused
from sharpfused.backends import torch_ops

SYNCS = ("aten._local_scalar_dense", "aten.item")


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCS):
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


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
}


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_step_reads_no_device_value(name, base, monkeypatch):
    monkeypatch.setattr(torch_ops, "HOST_BRANCH_ON_CPU", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    lr = torch.tensor(0.1 if base == "sgd" else 1e-3)
    cls, kw = (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-4)) if base == "sgd" else (torch.optim.AdamW, {})
    opt = getattr(sharpfused, "SAM" if name == "ASAM" else name)(model.parameters(), cls, lr=lr, **ALGOS[name], **kw)
    x = torch.randn(5, 8)

    def closure(perturbation=None):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for t in range(4):
        detector = SyncDetector()
        with detector:
            opt.step(closure)
        if t >= 2:
            assert not detector.hits, f"{name}+{base}, step {t}: {detector.hits}"


def test_the_detector_sees_a_sync():
    detector = SyncDetector()
    with detector:
        torch._foreach_add_([torch.zeros(2)], torch.tensor(1.0))  # 0-d tensor as a foreach scalar
    assert detector.hits
