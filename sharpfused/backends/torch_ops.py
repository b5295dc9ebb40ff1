"""The ``torch`` backend: every primitive as a few ``torch._foreach_*`` calls per (device, dtype).

Intermediates that are as large as the parameters live in a cached opmath workspace
(float32, or float64 for float64 inputs), allocated on the first call for a list of shapes
and reused after: a step allocates no parameter-sized memory after the first one.
Low-precision results are computed in opmath and rounded once, when written back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)
_WORKSPACES: OrderedDict[tuple, tuple[Tensor, list[Tensor]]] = OrderedDict()
_MAX_WORKSPACES = 16


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace_flat(like: Sequence[Tensor], dtype: torch.dtype, slot: int = 0) -> tuple[Tensor, list[Tensor]]:
    key = (like[0].device, dtype, slot, tuple(t.shape for t in like))
    hit = _WORKSPACES.get(key)
    if hit is None:
        flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=like[0].device)
        views, off = [], 0
        for t in like:
            views.append(flat[off : off + t.numel()].view(t.shape))
            off += t.numel()
        hit = _WORKSPACES[key] = (flat, views)
        if len(_WORKSPACES) > _MAX_WORKSPACES:
            _WORKSPACES.popitem(last=False)
    else:
        _WORKSPACES.move_to_end(key)
    return hit


def _workspace(like: Sequence[Tensor], dtype: torch.dtype, slot: int = 0) -> list[Tensor]:
    """Opmath scratch tensors shaped like ``like`` (one flat allocation per key, kept and reused).

    Contents are garbage and valid until the next primitive call. Slots 0 and 1 are two
    independent scratch lists for operations that need two opmath operands at once.
    """
    return _workspace_flat(like, dtype, slot)[1]


def _opm(xs: Sequence[Tensor], dtype: torch.dtype, slot: int) -> list[Tensor]:
    """``xs`` in opmath for READ-ONLY use: the tensors themselves when already opmath, else a copy.

    Arithmetic between different dtypes makes torch's CPU kernels allocate a cast temporary;
    copying into a workspace first (copy_ converts without one) keeps every step allocation-free.
    """
    if xs[0].dtype == opmath(dtype):
        return list(xs)
    ws = _workspace(xs, opmath(dtype), slot)
    torch._foreach_copy_(ws, xs)
    return ws


def _groups(first: Sequence[Tensor], *others: Optional[Sequence[Tensor]]):
    """Split parallel lists by (device, dtype) of ``first``; yields (dtype, [sublists...])."""
    if not first:
        raise ValueError("primitives take a non-empty list of tensors")
    key0 = (first[0].device, first[0].dtype)
    if all((t.device, t.dtype) == key0 for t in first):
        yield first[0].dtype, [first, *others]
        return
    idx: dict = {}
    for i, t in enumerate(first):
        idx.setdefault((t.device, t.dtype), []).append(i)
    for (_, dtype), ii in idx.items():
        yield dtype, [[first[i] for i in ii], *[None if o is None else [o[i] for i in ii] for o in others]]


def _mul_(xs: list[Tensor], s) -> None:
    if isinstance(s, Tensor):
        torch._foreach_mul_(xs, s.to(xs[0].dtype))
    elif s != 1:
        torch._foreach_mul_(xs, float(s))


def _axpy_(ws: list[Tensor], x: Sequence[Tensor], s) -> None:
    """ws <- ws + s * x (s a number or a 0-d tensor; x of ws's dtype)."""
    if isinstance(s, Tensor):
        torch._foreach_addcmul_(ws, x, [s.to(ws[0].dtype)] * len(ws))
    else:
        torch._foreach_add_(ws, x, alpha=float(s))


def _t_(ws: list[Tensor], w: Sequence[Tensor], eta: float) -> None:
    """ws <- T = |w| + eta (the ASAM weight) in opmath."""
    torch._foreach_copy_(ws, w)
    torch._foreach_abs_(ws)
    if eta:
        torch._foreach_add_(ws, float(eta))


def _store_(dst: Sequence[Tensor], delta: list[Tensor], base: Sequence[Tensor], dtype: torch.dtype) -> None:
    """dst <- base + delta, computed in opmath and rounded once (``delta`` is opmath scratch, slot 0)."""
    if dtype in _LOW:
        torch._foreach_add_(delta, _opm(base, dtype, 1))
        torch._foreach_copy_(dst, delta)
    elif dst is base:
        torch._foreach_add_(dst, delta)
    else:
        torch._foreach_add_(delta, base)
        torch._foreach_copy_(dst, delta)


def _sum_squares(xs: list[Tensor]) -> Tensor:
    """Per-tensor squared norms of opmath tensors, as a 1-d tensor (deterministic)."""
    return torch.stack(torch._foreach_norm(xs, 2)).square()


def sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    parts, order = [], []
    for dtype, (x, w) in _groups(xs, weights):
        if w is not None:
            ws = _workspace(x, opmath(dtype), 0)
            _t_(ws, w, eta)
            torch._foreach_mul_(ws, _opm(x, dtype, 1))
            per = _sum_squares(ws)
        else:
            per = _sum_squares(_opm(x, dtype, 0))
        parts.append(per)
        order.append(x)
    if len(parts) == 1:
        per = parts[0]
    else:
        # mixed dtypes: put per-tensor results back in list order, in float64 when any input is float64
        out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        pos = {id(t): i for i, t in enumerate(xs)}
        per = torch.empty(len(xs), dtype=out_dtype, device=xs[0].device)
        for p, x in zip(parts, order):
            per[torch.tensor([pos[id(t)] for t in x], device=per.device)] = p.to(out_dtype)
    total = per.sum()
    return (total, per) if per_tensor else total


def perturb_(params, grads, backup, scale, eta=None, mask=None):
    for dtype, (p, g, b, m) in _groups(params, grads, backup, mask):
        if b is not None:
            torch._foreach_copy_(b, p)
        if eta is None and m is None and dtype not in _LOW:
            _axpy_(p, g, scale)  # opmath == dtype: w + scale*g directly, no scratch
            continue
        ws = _workspace(p, opmath(dtype), 0)
        if eta is not None:
            _t_(ws, p, eta)  # T at the incoming w
            torch._foreach_mul_(ws, ws)
            torch._foreach_mul_(ws, _opm(g, dtype, 1))
        else:
            torch._foreach_copy_(ws, g)
        if m is not None:
            m1 = _workspace(p, opmath(dtype), 1)
            torch._foreach_copy_(m1, m)
            torch._foreach_mul_(ws, m1)
        _mul_(ws, scale)
        _store_(p, ws, p, dtype)


def restore_(params, backup):
    for _, (p, b) in _groups(params, backup):
        torch._foreach_copy_(p, b)


def dot_norms(a, b):
    out = []
    for dtype, (x, y) in _groups(a, b):
        flat, ws = _workspace_flat(x, opmath(dtype), 0)
        torch._foreach_copy_(ws, x)
        yy = _opm(y, dtype, 1)
        na = _sum_squares(ws).sum()
        nb = _sum_squares(yy).sum()
        torch._foreach_mul_(ws, yy)
        out.append(torch.stack([flat.sum(), na, nb]))
    return out[0] if len(out) == 1 else torch.stack([o.double() for o in out]).sum(0)


def combine_(g, saved, c1, c2):
    for dtype, (x, s) in _groups(g, saved):
        if dtype not in _LOW:
            _mul_(x, c1)
            _axpy_(x, s, c2)
            continue
        ws = _workspace(x, opmath(dtype), 0)  # c1*g + c2*saved in opmath, one rounding at the end
        torch._foreach_copy_(ws, x)
        _mul_(ws, c1)
        _axpy_(ws, _opm(s, dtype, 1), c2)
        torch._foreach_copy_(x, ws)


def restore_sgd_(params, backup, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, init_momentum):
    for dtype, (p, b, g, buf) in _groups(params, backup, grads, momentum_buffers):
        d = _workspace(p, opmath(dtype), 0)
        torch._foreach_copy_(d, g)
        if weight_decay:
            _axpy_(d, _opm(b, dtype, 1), weight_decay)
        if momentum:
            if init_momentum:
                torch._foreach_copy_(buf, d)
            elif dtype in _LOW:
                bb = _opm(buf, dtype, 1)
                torch._foreach_mul_(bb, float(momentum))
                _axpy_(bb, d, 1.0 - float(dampening))
                torch._foreach_copy_(buf, bb)
            else:
                torch._foreach_mul_(buf, float(momentum))
                _axpy_(buf, d, 1.0 - float(dampening))
            if nesterov:
                _axpy_(d, _opm(buf, dtype, 1), momentum)
            else:
                torch._foreach_copy_(d, buf)
        _mul_(d, -lr)
        _store_(p, d, b, dtype)


def restore_adamw_(params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    for dtype, (p, b, g, m, v) in _groups(params, backup, grads, exp_avgs, exp_avg_sqs):
        # moments stay in the parameter dtype, as torch.optim.AdamW keeps them
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        ws = _workspace(p, opmath(dtype), 0)
        torch._foreach_copy_(ws, v)
        torch._foreach_sqrt_(ws)
        torch._foreach_div_(ws, bc2_sqrt)
        torch._foreach_add_(ws, eps)
        torch._foreach_reciprocal_(ws)
        torch._foreach_mul_(ws, _opm(m, dtype, 1))  # m / denom
        _mul_(ws, lr)
        _mul_(ws, -1.0 / bc1)  # -lr/bc1 * m/denom
        # + w0*(1 - lr*wd), accumulated in opmath
        w0 = _opm(b, dtype, 1)
        _axpy_(ws, w0, 1.0 - lr * weight_decay)
        torch._foreach_copy_(p, ws)
