"""Float64, per-parameter, obvious implementations: the ground truth of every test and benchmark.

Each function works on plain lists of tensors (it never calls sharpfused) and computes in
float64. ``*_step`` functions take a model-free view: a list of parameter tensors and a
``grad_fn(params) -> list of grads`` that evaluates the loss gradient at given weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor

EPS = 1e-12
GradFn = Callable[[list[Tensor]], list[Tensor]]


def f64(xs: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().to(torch.float64).clone() for x in xs]


# ------------------------------------------------------------------ primitives
def sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    per = []
    for i, x in enumerate(xs):
        x = x.double()
        if weights is not None:
            x = (weights[i].double().abs() + eta) * x
        per.append((x * x).sum())
    per = torch.stack(per)
    return (per.sum(), per) if per_tensor else per.sum()


def perturb(params, grads, scale, eta=None, mask=None):
    out = []
    for i, (w, g) in enumerate(zip(params, grads)):
        w, g = w.double(), g.double()
        t2 = (w.abs() + eta) ** 2 if eta is not None else 1.0
        e = float(scale) * t2 * g
        if mask is not None:
            e = e * mask[i].double()
        out.append(w + e)
    return out


def dot_norms(a, b):
    a, b = f64(a), f64(b)
    return torch.stack([sum((x * y).sum() for x, y in zip(a, b)), sum((x * x).sum() for x in a), sum((y * y).sum() for y in b)])


def combine(g, saved, c1, c2):
    return [float(c1) * x.double() + float(c2) * s.double() for x, s in zip(g, saved)]


# ------------------------------------------------------------------ base optimizers
class SGDRef:
    """torch.optim.SGD's update, per parameter, float64."""

    def __init__(self, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.lr, self.momentum, self.dampening, self.wd, self.nesterov = lr, momentum, dampening, weight_decay, nesterov
        self.bufs: Optional[list[Tensor]] = None

    def step(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        out, bufs = [], []
        for i, (w, g) in enumerate(zip(params, grads)):
            d = g + self.wd * w
            if self.momentum:
                buf = d.clone() if self.bufs is None else self.momentum * self.bufs[i] + (1 - self.dampening) * d
                bufs.append(buf)
                d = d + self.momentum * buf if self.nesterov else buf
            out.append(w - self.lr * d)
        if self.momentum:
            self.bufs = bufs
        return out


class AdamWRef:
    """torch.optim.AdamW's update, per parameter, float64."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m: Optional[list[Tensor]] = None
        self.v: Optional[list[Tensor]] = None
        self.t = 0

    def step(self, params, grads):
        if self.m is None:
            self.m = [torch.zeros_like(w) for w in params]
            self.v = [torch.zeros_like(w) for w in params]
        self.t += 1
        bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        out = []
        for i, (w, g) in enumerate(zip(params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            denom = self.v[i].sqrt() / math.sqrt(bc2) + self.eps
            out.append(w * (1 - self.lr * self.wd) - self.lr / bc1 * self.m[i] / denom)
        return out


# ------------------------------------------------------------------ algorithms
def sam_step(params, grad_fn: GradFn, base, rho=0.05, adaptive=False, eta=0.0, rhos=None, adaptives=None):
    """One SAM/ASAM step. ``rhos``/``adaptives`` give per-parameter values (per-group settings)."""
    n = len(params)
    rhos = rhos or [rho] * n
    adaptives = adaptives or [adaptive] * n
    g = grad_fn(params)
    t = [(w.abs() + eta) if a else torch.ones_like(w) for w, a in zip(params, adaptives)]
    norm = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi in zip(t, g)))
    perturbed = [w + r * ti * ti * gi / (norm + EPS) for w, r, ti, gi in zip(params, rhos, t, g)]
    gs = grad_fn(perturbed)
    return base.step(params, gs)
