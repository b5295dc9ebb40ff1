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


# ------------------------------------------------------------------ successors of SAM (GSAM, BiSAM, XSAM, SAMPa, ...)
def _norm(xs) -> float:
    return math.sqrt(sum((x * x).sum().item() for x in xs))


def _dot(a, b) -> float:
    return sum((x * y).sum().item() for x, y in zip(a, b))


def _axpy(x, a, y):
    """x + a*y per tensor."""
    return [xi + a * yi for xi, yi in zip(x, y)]


def gsam_rho(lr, rho_max, rho_min=None, lr_max=None, lr_min=0.0):
    """GSAM's rho_t following the learning rate."""
    if rho_min is None:
        return rho_max
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def gsam_step(params, grad_fn: GradFn, base, rho=0.05, alpha=0.01, adaptive=False):
    """One GSAM step with radius ``rho`` (= rho_t); ``adaptive``: the authors' option, e = rho |w|^2 g /
    (||(|w| g)|| + eps), the decomposition unchanged."""
    g = grad_fn(params)
    if adaptive:
        norm = _norm([w.abs() * gi for w, gi in zip(params, g)])
        gs = grad_fn([w + rho * w * w * gi / (norm + EPS) for w, gi in zip(params, g)])
    else:
        gs = grad_fn(_axpy(params, rho / (_norm(g) + EPS), g))
    proj = _dot(g, gs) / (_norm(gs) ** 2 + EPS)
    g_perp = _axpy(g, -proj, gs)
    return base.step(params, _axpy(gs, -alpha, g_perp))


def bisam_lower_bound(logits, targets, variant="log", mu=None, a=0.1):
    """BiSAM's per-sample lower bound, float64, straight from the formula (loops over samples)."""
    mu = (1.0 if variant == "log" else 10.0) if mu is None else mu
    gamma = math.log(math.e - 1.0)
    out = []
    for f, y in zip(logits.double(), targets.tolist()):
        margins = f - f[y]
        phi = 1.0 - torch.log1p(torch.exp(gamma - margins)) if variant == "log" else torch.tanh(a * margins)
        out.append(torch.log(torch.exp(mu * phi).sum()) / mu)
    return torch.stack(out)


def bisam_step(params, q_grad_fn: GradFn, grad_fn: GradFn, base, rho=0.05):
    """BiSAM: perturb along the lower bound's gradient, step with the training loss's."""
    q = q_grad_fn(params)
    return base.step(params, grad_fn(_axpy(params, rho / (_norm(q) + EPS), q)))


def slerp(v0, v1, alpha):
    """XSAM's d(alpha) for unit v0, v1 (lists of tensors)."""
    theta = math.acos(max(-1.0, min(1.0, _dot(v0, v1))))
    s = math.sin(theta)
    if s < 1e-8:
        return [(x + y) / 2 for x, y in zip(v0, v1)]
    return [(math.sin((1 - alpha) * theta) * x + math.sin(alpha * theta) * y) / s for x, y in zip(v0, v1)]


def xsam_step(params, grad_fn: GradFn, base, rho=0.15, alpha=1.0, steps=1):
    """XSAM: k ascent steps from w0, gradient ||g_k|| d(alpha) applied at w0."""
    w = params
    for _ in range(steps):
        g = grad_fn(w)
        w = _axpy(w, rho / steps / (_norm(g) + EPS), g)
    gk = grad_fn(w)
    diff = [a - b for a, b in zip(w, params)]
    v0 = [x / _norm(diff) for x in diff]
    v1 = [x / _norm(gk) for x in gk]
    return base.step(params, [_norm(gk) * x for x in slerp(v0, v1, alpha)])


def sampa_step(x, grad_fn: GradFn, base, state: dict, rho=0.1, lam=0.2, lr=0.1):
    """SAMPa, sequential; ``state["gy"]`` is grad f(y_t) (y_0 = x_0 on the first call)."""
    if "gy" not in state:
        state["gy"] = grad_fn(x)
    gy = state["gy"]
    g_tilde = grad_fn(_axpy(x, rho / (_norm(gy) + EPS), gy))
    state["gy"] = grad_fn(_axpy(x, -lr, gy))
    return base.step(x, [(1 - lam) * a + lam * b for a, b in zip(g_tilde, state["gy"])])


def bsam_step(params, grad_fn: GradFn, base, rho_max=0.05, rho_min=0.05):
    """Bilateral SAM: d = g_max + g_0 - (||g_max||/||g_min||) g_min."""
    g0 = grad_fn(params)
    n0 = _norm(g0) + EPS
    gmax = grad_fn(_axpy(params, rho_max / n0, g0))
    gmin = grad_fn(_axpy(params, -rho_min / n0, g0))
    r = _norm(gmax) / (_norm(gmin) + EPS)
    return base.step(params, [a + b - r * c for a, b, c in zip(gmax, g0, gmin)])


def topk_mask(scores, keep_fraction):
    """Binary masks keeping the largest ``round(keep_fraction * n)`` entries over the whole list."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = round(keep_fraction * flat.numel())
    m = torch.zeros_like(flat)
    m[torch.topk(flat, keep).indices] = 1.0
    return [part.view(s.shape) for part, s in zip(m.split([s.numel() for s in scores]), scores)]


def ssam_step(params, grad_fn: GradFn, base, state: dict, rho=0.05, sparsity=0.5, mask_every=1):
    """SSAM-F with the Fisher score g*g of the refreshing step's gradient."""
    g = grad_fn(params)
    t = state.get("t", 0)
    if t % mask_every == 0:
        state["mask"] = topk_mask([x * x for x in g], 1.0 - sparsity)
    state["t"] = t + 1
    scale = rho / (_norm(g) + EPS)
    gs = grad_fn([w + scale * m * x for w, m, x in zip(params, state["mask"], g)])
    return base.step(params, gs)


def looksam_step(params, grad_fn: GradFn, base, state: dict, rho=0.05, beta=0.7, k=5):
    """LookSAM: full SAM every k steps (storing g_v), g + beta ||g||/||g_v|| g_v otherwise."""
    t = state.get("t", 0)
    state["t"] = t + 1
    g = grad_fn(params)
    if t % k == 0:
        gs = grad_fn(_axpy(params, rho / (_norm(g) + EPS), g))
        state["gv"] = _axpy(gs, -_dot(g, gs) / (_norm(g) ** 2 + EPS), g)
        return base.step(params, gs)
    gv = state["gv"]
    return base.step(params, _axpy(g, beta * _norm(g) / (_norm(gv) + EPS), gv))


def friendly_sam_step(params, grad_fn: GradFn, base, state: dict, rho=0.05, sigma=1.0, lam=0.9):
    """Friendly SAM (authors' first step: d = g, m = g)."""
    g = grad_fn(params)
    if "m" not in state:
        d = g
        state["m"] = g
    else:
        d = _axpy(g, -sigma, state["m"])
        state["m"] = [lam * m + (1 - lam) * x for m, x in zip(state["m"], g)]
    gs = grad_fn(_axpy(params, rho / (_norm(d) + EPS), d))
    return base.step(params, gs)


# ------------------------------------------------------------------ cheap sharpness (MSAM, RST, AE-SAM)
def base_momentum(base) -> Optional[list[Tensor]]:
    """The momentum a base reference holds (SGDRef's buffers, AdamWRef's first moment), or None yet."""
    return getattr(base, "bufs", None) if isinstance(base, SGDRef) else base.m


def msam_step(params, grad_fn: GradFn, base, rho=0.3):
    """Momentum-SAM: one pass at w - rho v / ||v|| (v the base's momentum; at w on the first step)."""
    v = base_momentum(base)
    at = params if v is None else _axpy(params, -rho / (_norm(v) + EPS), v)
    return base.step(params, grad_fn(at))


def rst_probability(t, p, p_end=None, total_steps=None, schedule="constant"):
    """RST's probability of a SAM step at step t (0-based): constant, or p -> p_end over total_steps."""
    if schedule == "constant":
        return p
    frac = min(t / total_steps, 1.0)
    if schedule == "linear":
        return p + (p_end - p) * frac
    return p_end + (p - p_end) * 0.5 * (1 + math.cos(math.pi * frac))  # cosine


def switch_step(params, grad_fn: GradFn, base, sam: bool, rho=0.05):
    """RST / AE-SAM's step once the choice is made: SAM's step, or the base step with g."""
    if sam:
        return sam_step(params, grad_fn, base, rho=rho)
    return base.step(params, grad_fn(params))


def aesam_decide(state: dict, gsq: float, delta=0.9, c=1.0) -> bool:
    """AE-SAM: update the running mean and variance of ||g||^2, then SAM when ||g||^2 >= mu + c sigma."""
    mu = delta * state.get("mu", 0.0) + (1 - delta) * gsq
    var = delta * state.get("var", 0.0) + (1 - delta) * (gsq - mu) ** 2
    state["mu"], state["var"] = mu, var
    return gsq >= mu + c * math.sqrt(var)


def aesam_threshold(t, c=1.0, c_end=None, total_steps=None):
    """AE-SAM's c_t: constant, or linear from c to c_end over total_steps (0-based step t)."""
    if c_end is None:
        return c
    return c + (c_end - c) * min(t / total_steps, 1.0)


def aesam_step(params, grad_fn: GradFn, base, state: dict, rho=0.05, delta=0.9, c=1.0, c_end=None, total_steps=None):
    """AE-SAM: SAM's step when ||g||^2 is large against its running statistics, else the base step."""
    t = state.get("t", 0)
    g = grad_fn(params)
    sam = aesam_decide(state, _norm(g) ** 2, delta, aesam_threshold(t, c, c_end, total_steps))
    state["t"] = t + 1
    state.setdefault("choices", []).append(sam)
    return switch_step(params, grad_fn, base, sam, rho)


def rst_step(params, grad_fn: GradFn, base, t, seed=0, rho=0.05, p=0.5, p_end=None, total_steps=None,
             schedule="constant"):
    """RST at step t: a SAM step when the (seed, t) uniform draw falls below p_t, else the base step."""
    import random

    sam = random.Random((seed << 32) + t).random() < rst_probability(t, p, p_end, total_steps, schedule)
    return switch_step(params, grad_fn, base, sam, rho), sam


# ------------------------------------------------------------------ ESAM, MESA
_M64 = (1 << 64) - 1


def esam_draw_seed(seed: int, draw: int) -> int:
    """The documented seed of ESAM's mask number ``draw`` (splitmix64 of seed + (draw+1) * golden, top 63 bits)."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def esam_masks(shapes, beta, seed, draw, align=16):
    """ESAM's SWP masks of one bucket (one group, device and dtype): Bernoulli(beta) bytes drawn over the
    bucket's flat byte buffer (segments start at multiples of ``align`` bytes) by a CPU generator seeded
    with :func:`esam_draw_seed`; a tensor's mask is its segment."""
    numels = [math.prod(s) for s in shapes]
    sizes = [-(-n // align) * align for n in numels]
    gen = torch.Generator().manual_seed(esam_draw_seed(seed, draw))
    flat = torch.zeros(sum(sizes), dtype=torch.uint8).bernoulli_(beta, generator=gen)
    out, off = [], 0
    for n, size, s in zip(numels, sizes, shapes):
        out.append(flat[off : off + n].view(s).double())
        off += size
    return out


def esam_step(params, grad_fn: GradFn, base, rho=0.05, beta=1.0, masks=None, second_grad_fn: Optional[GradFn] = None):
    """ESAM: e = (rho/beta) m * g/(||g||+eps) (all of g's norm), base step with the second pass's gradient
    at w + e (``second_grad_fn``: SDS's subset loss; the full batch by default)."""
    g = grad_fn(params)
    scale = rho / beta / (_norm(g) + EPS)
    masks = masks or [torch.ones_like(w) for w in params]
    at = [w + scale * m * x for w, m, x in zip(params, masks, g)]
    return base.step(params, (second_grad_fn or grad_fn)(at))


def sds_indices(loss_before, loss_after, gamma):
    """SDS: the floor(gamma n) (at least 1) samples with the largest loss_after - loss_before, ascending."""
    n = loss_before.numel()
    k = max(1, int(math.floor(gamma * n + 1e-9)))
    order = sorted(range(n), key=lambda i: float(loss_after[i] - loss_before[i]), reverse=True)
    return sorted(order[:k])


def kl_trajectory(logits, ema_logits, tau):
    """tau^2 * mean over samples of sum_c q (log q - log p), p = softmax(z/tau), q = softmax(z_ema/tau)."""
    p = torch.softmax(logits.double() / tau, dim=-1)
    q = torch.softmax(ema_logits.double() / tau, dim=-1)
    return (q * (q.log() - p.log())).sum(-1).mean() * tau * tau


def mesa_step(params, grad_fn: Callable, base, state: dict, decay=0.9998):
    """MESA: base step with the gradient of L + lam * KL term (``grad_fn(params, ema)``), then
    ema <- decay ema + (1 - decay) w; the EMA starts at the weights before the first step."""
    if "ema" not in state:
        state["ema"] = f64(params)
    new = base.step(params, grad_fn(params, state["ema"]))
    state["ema"] = [decay * e + (1 - decay) * w for e, w in zip(state["ema"], new)]
    return new
