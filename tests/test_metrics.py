"""sharpfused.metrics against analytic cases: a quadratic 0.5 (w-c)^T H (w-c) with a known Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpfused import metrics


class Quadratic(nn.Module):
    """L(w) = 0.5 (w - c)^T H (w - c) over two parameter tensors (a matrix and a vector)."""

    def __init__(self, h: torch.Tensor, c: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("c", c)
        self.a = nn.Parameter(w0[:6].reshape(2, 3).clone())
        self.b = nn.Parameter(w0[6:].clone())

    def flat(self):
        return torch.cat([self.a.reshape(-1), self.b])

    def forward(self, _batch=None):
        d = self.flat() - self.c
        return 0.5 * d @ self.h @ d


def loss_fn(model, batch):
    return model(batch)


def spd(n=10, top=7.5, seed=0, dtype=torch.float64):
    """A random symmetric matrix with eigenvalues (top, then spread in (-2, 3)) and its eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(-2.0, 3.0, n, dtype=torch.float64)
    eig[-1] = top
    return ((q * eig) @ q.T).to(dtype), q[:, -1].to(dtype), eig


def make(dtype=torch.float64, seed=0, w0=None, top=7.5):
    h, v, eig = spd(top=top, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.randn(10, generator=g, dtype=torch.float64).to(dtype)
    if w0 is None:
        w0 = torch.randn(10, generator=g, dtype=torch.float64).to(dtype)
    return Quadratic(h, c, w0).to(dtype), h, c, v


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_identical(model, before):
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "weights changed"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_of_quadratic(seed):
    top = 4.0 + seed * 3.0
    model, h, _, _ = make(seed=seed, top=top)
    before = snapshot(model)
    lam = metrics.hessian_top_eigenvalue(model, loss_fn, None, iters=200, tol=1e-10, seed=seed)
    assert lam == pytest.approx(top, rel=1e-6)
    assert_bit_identical(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_top_eigenvalue_largest_magnitude_and_batches():
    # eigenvalues -9 .. 3: power iteration returns the largest magnitude, -9
    h, _, _ = spd(top=-9.0, seed=3)
    model = Quadratic(h, torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    lam = metrics.hessian_top_eigenvalue(model, loss_fn, None, iters=300, tol=1e-12)
    assert lam == pytest.approx(-9.0, rel=1e-6)
    # mean over a list of batches: (1+s) L for s in {0, 1.5} averages to 1.75 L -> 1.75 * top
    model, _, _, _ = make(top=6.0)
    lam = metrics.hessian_top_eigenvalue(model, lambda m, s: (1 + s) * m(), [0.0, 1.5], iters=200, tol=1e-12)
    assert lam == pytest.approx(1.75 * 6.0, rel=1e-6)


def test_surrogate_gap_exact_on_quadratic():
    model, h, c, _ = make()
    before = snapshot(model)
    rho = 0.3
    w = model.flat().detach()
    g = h @ (w - c)
    gn = g.norm()
    expected = rho * gn + 0.5 * rho**2 * (g @ h @ g) / gn**2
    gap = metrics.surrogate_gap(model, loss_fn, None, rho=rho)
    assert gap == pytest.approx(float(expected), rel=1e-10)
    assert_bit_identical(model, before)


def test_surrogate_gap_near_minimum_is_half_rho_squared_lambda_max():
    # at w = c + eps v_max the gradient points along the top eigenvector: h = rho eps lam + rho^2/2 lam
    top, rho, eps = 5.0, 0.1, 1e-6  # ||g|| >> the 1e-12 in rho/(||g|| + 1e-12)
    h, v, _ = spd(top=top, seed=4)
    c = torch.zeros(10, dtype=torch.float64)  # w - c = eps v without cancellation
    model = Quadratic(h, c, eps * v)
    gap = metrics.surrogate_gap(model, loss_fn, None, rho=rho)
    assert gap == pytest.approx(rho**2 / 2 * top + rho * eps * top, rel=1e-6)


def test_surrogate_gap_adaptive_and_restore_fp32():
    model, h, c, _ = make(dtype=torch.float32)
    before = snapshot(model)
    rho, eta = 0.2, 0.01
    w = model.flat().detach().double()
    g = h.double() @ (w - c.double())
    t = w.abs() + eta
    e = rho * t * t * g / (t * g).norm()
    expected = 0.5 * (w + e - c.double()) @ h.double() @ (w + e - c.double()) - 0.5 * (w - c.double()) @ h.double() @ (
        w - c.double()
    )
    gap = metrics.surrogate_gap(model, loss_fn, None, rho=rho, adaptive=True, eta=eta)
    assert gap == pytest.approx(float(expected), rel=1e-4)
    assert_bit_identical(model, before)


def test_landscape_1d_and_2d_match_quadratic():
    model, h, c, v = make()
    before = snapshot(model)
    w = model.flat().detach()
    d1 = torch.randn(10, dtype=torch.float64)
    d2 = torch.randn(10, dtype=torch.float64)
    split = lambda d: [d[:6].reshape(2, 3), d[6:]]  # noqa: E731
    r = metrics.loss_landscape(model, loss_fn, None, directions=[split(d1), split(d2)], span=2.0, steps=5)
    assert r["losses"].shape == (5, 5)
    coords = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            x = w + a * d1 + b * d2 - c
            assert float(r["losses"][i, j]) == pytest.approx(float(0.5 * x @ h @ x), rel=1e-12, abs=1e-12)
    assert r["center"] == pytest.approx(float(0.5 * (w - c) @ h @ (w - c)), rel=1e-12)
    assert_bit_identical(model, before)
    # 1-D along the top eigenvector: a parabola of curvature top around the centre
    r1 = metrics.loss_landscape(model, loss_fn, None, directions=[split(v)], span=1.0, steps=3)
    l_minus, l0, l_plus = r1["losses"].tolist()
    assert (l_minus + l_plus - 2 * l0) == pytest.approx(7.5, rel=1e-9)
    assert_bit_identical(model, before)


def test_filter_normalized_directions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    ps = list(net.parameters())
    d = metrics.filter_normalized_direction(ps, torch.Generator().manual_seed(1))
    for p, x in zip(ps, d):
        assert x.shape == p.shape
        if p.dim() > 1:
            dn = x.reshape(x.shape[0], -1).norm(dim=1)
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-5, atol=0)
        else:
            assert not x.any()  # biases ignored, as in Li et al.
    before = snapshot(net)
    xb = torch.randn(6, 3, 6, 6)
    yb = torch.randint(0, 5, (6,))
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    r = metrics.loss_landscape(net, ce, (xb, yb), directions=2, span=0.5, steps=3)
    assert r["losses"].shape == (3, 3)
    assert float(r["losses"][1, 1]) == pytest.approx(r["center"], rel=1e-6)
    assert torch.isfinite(r["losses"]).all()
    assert_bit_identical(net, before)
    lam = metrics.hessian_top_eigenvalue(net, ce, [(xb, yb)], iters=10)
    assert math.isfinite(lam) and lam > 0
    assert_bit_identical(net, before)


def test_plot_landscape(tmp_path):
    model, _, _, _ = make()
    r = metrics.loss_landscape(model, loss_fn, None, directions=1, span=1.0, steps=5, ignore_1d=False)
    ax = metrics.plot_landscape(r, label="quadratic")
    ax.figure.savefig(tmp_path / "l1.png")
    r2 = metrics.loss_landscape(model, loss_fn, None, directions=2, span=1.0, steps=4, ignore_1d=False)
    ax = metrics.plot_landscape(r2, label="quadratic")
    ax.figure.savefig(tmp_path / "l2.png")
    assert (tmp_path / "l1.png").stat().st_size > 0 and (tmp_path / "l2.png").stat().st_size > 0
