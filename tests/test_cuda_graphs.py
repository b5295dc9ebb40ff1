"""first_step() and second_step() captured in CUDA graphs and replayed (GPU only).

The recipe of docs/cuda.md ("CUDA graphs"): static inputs and gradient tensors
(``zero_grad(set_to_none=False)``), the learning rate a device tensor, a few eager warm-up steps
on a side stream (they create the base optimizer's state and every launch table), then one graph
per half step. Replaying the graphs must give the same weights and base-optimizer state as the
same steps run eagerly. This file has no CPU test: graphs need a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sharpfused
from sharpfused import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]
CUDA = torch.device("cuda")


def _backends():
    return [b for b in ("torch", "triton", "cuda") if ops.unavailable_reason(b, CUDA) is None]


def _setup(backend, base):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(CUDA)
    lr = torch.tensor(0.05, device=CUDA)
    kw = dict(lr=lr, momentum=0.9) if base is torch.optim.SGD else dict(lr=lr, weight_decay=0.01, capturable=False)
    opt = sharpfused.SAM(model.parameters(), base, rho=0.05, backend=backend, **kw)
    return model, opt


def _half_steps(model, opt, x, y):
    def fwd_bwd():
        F.mse_loss(model(x), y).backward()

    def first():
        opt.zero_grad(set_to_none=False)
        fwd_bwd()
        opt.first_step()

    def second():
        opt.zero_grad(set_to_none=False)
        fwd_bwd()
        opt.second_step()

    return first, second


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("backend", _backends())
def test_sam_half_steps_replayed_from_cuda_graphs_equal_eager(backend, base):
    x, y = torch.randn(8, 16, device=CUDA), torch.randn(8, 4, device=CUDA)
    model, opt = _setup(backend, base)
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = sharpfused.SAM(twin.parameters(), base, rho=0.05, backend=backend, **opt.base_optimizer.defaults)
    first, second = _half_steps(model, opt, x, y)
    t_first, t_second = _half_steps(twin, twin_opt, x, y)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, launch tables, the backward's own buffers
        for _ in range(3):
            first()
            second()
            t_first()
            t_second()
    torch.cuda.current_stream().wait_stream(side)

    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    F.mse_loss(model(x), y).backward()
    with torch.cuda.graph(g1):
        opt.first_step()
    g1.replay()  # capture records, it does not run: the captured first step runs now
    opt.zero_grad(set_to_none=False)
    F.mse_loss(model(x), y).backward()
    with torch.cuda.graph(g2):
        opt.second_step()
    g2.replay()
    t_first()
    t_second()
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        F.mse_loss(model(x), y).backward()
        g1.replay()
        opt.zero_grad(set_to_none=False)
        F.mse_loss(model(x), y).backward()
        g2.replay()
        t_first()
        t_second()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        sa, sb = opt.base_optimizer.state[p], twin_opt.base_optimizer.state[q]
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
