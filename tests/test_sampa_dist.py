"""SAMPa's two-process form (gloo, CPU): each rank computes one gradient; the result equals the sequential form."""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sharpfused import SAMPa

from .helpers import run_gloo

STEPS = 7


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)) for _ in range(STEPS)]


def _train(opt, model, data):
    for x, y in data:

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _worker(rank):
    data = _data()
    model = _model()
    opt = SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9,
                process_group=dist.group.WORLD, backend="torch")
    _train(opt, model, data)
    out = {"par": [p.detach() for p in model.parameters()]}
    if rank == 0:  # the sequential form, same process settings
        seq_model = _model()
        seq = SAMPa(seq_model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9, backend="torch")
        _train(seq, seq_model, data)
        out.update(seq=[p.detach() for p in seq_model.parameters()],
                   grad_y=[opt.state[p]["grad_y"].clone() for p in model.parameters()],
                   seq_grad_y=[seq.state[p]["grad_y"].clone() for p in seq_model.parameters()])
    return out



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_two_process_sampa_equals_sequential(tmp_path):
    r0, r1 = run_gloo(_worker, tmp_path)
    for a, b, c in zip(r0["par"], r1["par"], r0["seq"]):
        assert torch.equal(a, b), "the two ranks diverged"
        assert torch.equal(a, c), "the two-process form differs from the sequential form"
    for a, b in zip(r0["grad_y"], r0["seq_grad_y"]):
        assert torch.equal(a, b)
    # and it moved
    assert not all(torch.equal(a, b) for a, b in zip(r0["par"], [p.detach() for p in _model().parameters()]))


def test_process_group_must_be_initialized():
    with pytest.raises(ValueError, match="process_group"):
        SAMPa(_model().parameters(), torch.optim.SGD, lr=0.1, process_group=object())
