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


class EagerForeachASAM(EagerForeachSAM):
    """SAM/ASAM with foreach ops, unfused (T = |w| for ``adaptive=True``, as the popular port)."""

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        gs = [p.grad for p in ps]
        adaptive = self.param_groups[0]["adaptive"]
        tg = torch._foreach_mul(torch._foreach_abs(ps), gs) if adaptive else gs
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))
        scale = self.param_groups[0]["rho"] / (norm + 1e-12)
        self._old = torch._foreach_mul(ps, 1.0)  # clone
        e = torch._foreach_mul(torch._foreach_mul(ps, ps), gs) if adaptive else gs
        torch._foreach_add_(ps, torch._foreach_mul(e, scale))
        if zero_grad:
            self.zero_grad()


class EagerLoopGSAM(torch.optim.Optimizer):
    """GSAM (Zhuang et al., ICLR 2022) with constant rho, as a per-parameter loop:
    e = rho g/||g||; g_s = grad at w + e; d = g_s - alpha (g - <g,g_s>/||g_s||^2 g_s); base step at w."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, alpha=0.01, **kwargs):
        super().__init__(params, dict(rho=rho, alpha=alpha, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _live(self):
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        live = self._live()
        dev = live[0][1].device
        norm = torch.norm(torch.stack([p.grad.norm(p=2).to(dev) for _, p in live]), p=2)
        for group, p in live:
            scale = group["rho"] / (norm + 1e-12)
            self.state[p]["old_p"] = p.data.clone()
            self.state[p]["old_g"] = p.grad.clone()
            p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        live = self._live()
        dev = live[0][1].device
        dot = sum((self.state[p]["old_g"].to(_opmath(p)) * p.grad.to(_opmath(p))).sum().to(dev) for _, p in live)
        gs2 = sum((p.grad.to(_opmath(p)) ** 2).sum().to(dev) for _, p in live)
        proj = dot / (gs2 + 1e-12)
        for group, p in live:
            a = group["alpha"]
            g_perp = self.state[p]["old_g"] - proj.to(p) * p.grad
            p.grad.sub_(a * g_perp)
            p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class EagerForeachGSAM(EagerLoopGSAM):
    """The same GSAM with foreach ops, unfused."""

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        ps = [p for _, p in self._live()]
        gs = [p.grad for p in ps]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
        scale = self.param_groups[0]["rho"] / (norm + 1e-12)
        self._old = torch._foreach_mul(ps, 1.0)
        self._old_g = torch._foreach_mul(gs, 1.0)
        torch._foreach_add_(ps, torch._foreach_mul(gs, scale))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        ps = [p for _, p in self._live()]
        gs = [p.grad for p in ps]
        gs32, old32 = [g.to(_opmath(g)) for g in gs], [g.to(_opmath(g)) for g in self._old_g]
        dot = torch.stack([d.sum() for d in torch._foreach_mul(gs32, old32)]).sum()
        gs2 = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs32))) ** 2
        proj = dot / (gs2 + 1e-12)
        a = self.param_groups[0]["alpha"]
        # d = (1 + a proj) g_s - a g
        torch._foreach_mul_(gs, (1.0 + a * proj).to(gs[0].dtype))
        torch._foreach_add_(gs, self._old_g, alpha=-a)
        torch._foreach_copy_(ps, self._old)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# ---------------------------------------------------------------- primitives as eager per-tensor loops
# The same signatures as sharpfused.ops (opmath float32 for low precision, float64 for float64):
# what a port writes without multi-tensor kernels. Benchmarks time these against each backend.


def _opmath(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def loop_sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    per = []
    for i, x in enumerate(xs):
        x = x.to(_opmath(x))
        if weights is not None:
            x = (weights[i].to(x.dtype).abs() + eta) * x
        per.append((x * x).sum())
    per = torch.stack(per)
    return (per.sum(), per) if per_tensor else per.sum()


@torch.no_grad()
def loop_perturb_(params, grads, backup, scale, eta=None, mask=None):
    for i, (w, g) in enumerate(zip(params, grads)):
        if backup is not None:
            backup[i].copy_(w)
        w32, g32 = w.to(_opmath(w)), g.to(_opmath(w))
        e = g32 * scale
        if eta is not None:
            e = e * (w32.abs() + eta) ** 2
        if mask is not None:
            e = e * mask[i]
        w.copy_(w32 + e)


@torch.no_grad()
def loop_restore_(params, backup):
    for w, b in zip(params, backup):
        w.copy_(b)


def loop_dot_norms(a, b):
    dot = ssa = ssb = 0.0
    for x, y in zip(a, b):
        x, y = x.to(_opmath(x)), y.to(_opmath(y))
        dot = dot + (x * y).sum()
        ssa = ssa + (x * x).sum()
        ssb = ssb + (y * y).sum()
    return torch.stack([torch.as_tensor(v, dtype=_opmath(a[0])) for v in (dot, ssa, ssb)])


@torch.no_grad()
def loop_combine_(g, saved, c1, c2):
    for x, s in zip(g, saved):
        x.copy_(c1 * x.to(_opmath(x)) + c2 * s.to(_opmath(x)))


@torch.no_grad()
def loop_restore_sgd_(
    params, backup, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, init_momentum
):
    for i, (w, b, g) in enumerate(zip(params, backup, grads)):
        w0, d = b.to(_opmath(b)), g.to(_opmath(b))
        if weight_decay:
            d = d + weight_decay * w0
        if momentum:
            buf = momentum_buffers[i]
            new = d if init_momentum else momentum * buf.to(d.dtype) + (1 - dampening) * d
            buf.copy_(new)
            d = d + momentum * new if nesterov else new
        w.copy_(w0 - lr * d)


@torch.no_grad()
def loop_restore_adamw_(params, backup, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    for w, b, g, m, v in zip(params, backup, grads, exp_avgs, exp_avg_sqs):
        w0, g32 = b.to(_opmath(b)), g.to(_opmath(b))
        m32 = beta1 * m.to(w0.dtype) + (1 - beta1) * g32
        v32 = beta2 * v.to(w0.dtype) + (1 - beta2) * g32 * g32
        m.copy_(m32)
        v.copy_(v32)
        w.copy_(w0 * (1 - lr * weight_decay) - lr / bc1 * m32 / (v32.sqrt() / bc2**0.5 + eps))


@torch.no_grad()
def loop_restore_rmsprop_(params, backup, grads, square_avgs, momentum_buffers, *, lr, alpha, eps, weight_decay,
                          momentum):
    for i, (w, b, g, v) in enumerate(zip(params, backup, grads, square_avgs)):
        w0, d = b.to(_opmath(b)), g.to(_opmath(b))
        if weight_decay:
            d = d + weight_decay * w0
        v32 = alpha * v.to(w0.dtype) + (1 - alpha) * d * d
        v.copy_(v32)
        step = d / (v32.sqrt() + eps)
        if momentum:
            buf = momentum_buffers[i]
            step = momentum * buf.to(w0.dtype) + step
            buf.copy_(step)
        w.copy_(w0 - lr * step)


LOOP_PRIMITIVES = {
    "sq_norm": loop_sq_norm,
    "perturb_": loop_perturb_,
    "restore_": loop_restore_,
    "dot_norms": loop_dot_norms,
    "combine_": loop_combine_,
    "restore_sgd_": loop_restore_sgd_,
    "restore_adamw_": loop_restore_adamw_,
    "restore_rmsprop_": loop_restore_rmsprop_,
}
