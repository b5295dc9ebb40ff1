"""Eager baselines that benchmarks race and tests trust: written the way SAM is commonly ported.

``EagerLoopSAM`` is a per-parameter Python loop (one small op per tensor per line), the shape of
the widely used PyTorch SAM port: norm by stacking per-tensor norms, perturb with an ``old_p``
clone per parameter, restore by assignment, then the base optimizer's own step.
``EagerForeachSAM`` is the same algorithm with ``torch._foreach_*`` calls and no fusion.
"""

from __future__ import annotations

import torch


class EagerLoopSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        dev = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(dev)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


class EagerForeachSAM(EagerLoopSAM):
    """The same algorithm with foreach ops (SAM only, adaptive=False), unfused: what a careful port does."""

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        gs = [p.grad for p in ps]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
        scale = self.param_groups[0]["rho"] / (norm + 1e-12)
        self._old = torch._foreach_mul(ps, 1.0)  # clone
        torch._foreach_add_(ps, torch._foreach_mul(gs, scale))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_copy_(ps, self._old)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
