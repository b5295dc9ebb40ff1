"""The ``torch`` backend: every primitive as a few ``torch._foreach_*`` calls per (device, dtype).

Intermediates that are as large as the parameters live in a cached opmath workspace
(float32, or float64 for float64 inputs), allocated on the first call for a list of shapes
and reused after: a step allocates no parameter-sized memory after the first one.
Low-precision results are computed in opmath and rounded once, when written back.

On CPU three things differ, all measured with bench/run.py (bench/NOTES.md):

* Tiles. A primitive that needs opmath scratch cuts its lists into tiles of at most
  ``CPU_TILE`` elements (1-D views of contiguous tensors) and runs its foreach ops tile by tile
  over scratch of ``CPU_TILE`` elements that stays in cache, so the conversion and scratch
  passes cost no memory traffic. In fp32/fp64, elementwise results are the bits of an untiled run.
* bfloat16 sums of squares use torch's bf16 kernels (ASAM's T*x rounded to bf16; float32
  accumulation, each tensor's norm rounded to bf16; see ``_sq_norm_group``, ``_sq_norm_tile``).
  fp16 keeps the exact path: its norm could overflow.
* Restore fused into SGD. ``w <- backup - lr * d`` is one ``torch.add(..., out=w)`` per large
  tensor (foreach has no ``out=``), saving the separate restore pass.
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

#: Elements per tile on CPU (an opmath scratch slot of 1 MiB in float32: cache-sized).
CPU_TILE = 1 << 18
_SCRATCH: dict[tuple, Tensor] = {}  # (device, dtype, slot) -> CPU_TILE elements
_SCRATCH_VIEWS: OrderedDict[tuple, tuple[Tensor, list[Tensor]]] = OrderedDict()
_TILINGS: OrderedDict[tuple, list] = OrderedDict()
_MAX_TILINGS = 32
_MAX_SCRATCH_VIEWS = 4096


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    views, off = [], 0
    for t in like:
        views.append(flat[off : off + t.numel()].view(t.shape))
        off += t.numel()
    return views


def _scratch_flat(like: Sequence[Tensor], dtype: torch.dtype, slot: int, n: int) -> tuple[Tensor, list[Tensor]]:
    """Views of the shared CPU scratch slot (for lists of at most CPU_TILE elements, as a tile is)."""
    dev = like[0].device
    base = _SCRATCH.get((dev, dtype, slot))
    if base is None or base.numel() < CPU_TILE:
        base = _SCRATCH[(dev, dtype, slot)] = torch.empty(CPU_TILE, dtype=dtype, device=dev)
    key = (dev, dtype, slot, tuple(t.shape for t in like))
    hit = _SCRATCH_VIEWS.get(key)
    if hit is not None and hit[0].data_ptr() == base.data_ptr():
        _SCRATCH_VIEWS.move_to_end(key)
        return hit
    flat = base[:n]
    hit = _SCRATCH_VIEWS[key] = (flat, _views(flat, like))
    if len(_SCRATCH_VIEWS) > _MAX_SCRATCH_VIEWS:
        _SCRATCH_VIEWS.popitem(last=False)
    return hit


def _workspace_flat(like: Sequence[Tensor], dtype: torch.dtype, slot: int = 0) -> tuple[Tensor, list[Tensor]]:
    n = sum(t.numel() for t in like)
    if like[0].device.type == "cpu" and n <= CPU_TILE:
        return _scratch_flat(like, dtype, slot, n)
    key = (like[0].device, dtype, slot, tuple(t.shape for t in like))
    hit = _WORKSPACES.get(key)
    if hit is None:
        flat = torch.empty(n, dtype=dtype, device=like[0].device)
        hit = _WORKSPACES[key] = (flat, _views(flat, like))
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


def _tiles(lists: Sequence[Optional[Sequence[Tensor]]]) -> Optional[list[tuple[list, Tensor]]]:
    """CPU lists cut into tiles of at most CPU_TILE elements: per tile, (the parallel sublists of
    1-D views -- None for an absent list -- and the index of each view's tensor). None when the
    tensors are not on the CPU, one is not contiguous or all are empty (the caller runs untiled)."""
    first = lists[0]
    if first[0].device.type != "cpu":
        return None
    if any(lst is not None and not all(t.is_contiguous() for t in lst) for lst in lists):
        return None
    # contiguous: the address and size fix what a 1-D view covers, whatever the shape
    key = (CPU_TILE,) + tuple(
        None if lst is None else tuple((t.data_ptr(), t.numel(), t.dtype) for t in lst) for lst in lists
    )
    hit = _TILINGS.get(key)
    if hit is not None:
        _TILINGS.move_to_end(key)
        return hit
    tiles: list[tuple[list, Tensor]] = []
    cur: list[list[Tensor]] = [[] for _ in lists]
    idx: list[int] = []
    used = 0

    def close() -> None:
        nonlocal cur, idx, used
        tiles.append(([None if lst is None else c for lst, c in zip(lists, cur)], torch.tensor(idx)))
        cur, idx, used = [[] for _ in lists], [], 0

    for i, t in enumerate(first):
        n, a = t.numel(), 0
        flats = [None if lst is None else lst[i].view(-1) for lst in lists]
        while a < n:
            b = min(n, a + CPU_TILE - used)
            for c, f in zip(cur, flats):
                if f is not None:
                    c.append(f[a:b])
            idx.append(i)
            used += b - a
            a = b
            if used == CPU_TILE:
                close()
    if used:
        close()
    if not tiles:  # every tensor empty: nothing to tile
        return None
    _TILINGS[key] = tiles
    if len(_TILINGS) > _MAX_TILINGS:
        _TILINGS.popitem(last=False)
    return tiles


def _tiled(lists: Sequence[Optional[Sequence[Tensor]]]):
    """Yields the parallel sublists of each tile (CPU), or ``lists`` once (other devices)."""
    tiles = _tiles(lists)
    if tiles is None:
        yield list(lists)
        return
    for sub, _ in tiles:
        yield sub


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
    """Per-tensor squared norms as a 1-d opmath tensor (deterministic); a bf16 list's norms
    come from torch's bf16 kernel, rounded to bf16 before they are squared in float32."""
    return torch.stack(torch._foreach_norm(xs, 2)).to(opmath(xs[0].dtype)).square()


def _weighted_(ws, x, w, eta, dtype) -> None:
    """ws <- T * x in opmath, T = |w| + eta."""
    if eta:
        _t_(ws, w, eta)
        torch._foreach_mul_(ws, _opm(x, dtype, 1))
    else:  # (|w| x)^2 == (w x)^2: no abs pass
        torch._foreach_copy_(ws, x)
        torch._foreach_mul_(ws, _opm(w, dtype, 1))


def _sq_norm_group(x, w, eta, dtype) -> Tensor:
    """Per-tensor sums of squares of one (device, dtype) group, in opmath."""
    if w is not None:
        ws = _workspace(x, opmath(dtype), 0)
        _weighted_(ws, x, w, eta, dtype)
        return _sum_squares(ws)
    if dtype == torch.bfloat16 and x[0].device.type == "cpu":
        # torch's bf16 norm: float32 accumulation, each tensor's norm rounded to bf16 (relative
        # error <= 2^-8 on the sum, as torch.nn.utils.clip_grad_norm_ has), at a third of the
        # time of a float32 copy first. Not for fp16: a norm past 65504 would read as inf.
        return _sum_squares(x)
    return _sum_squares(_opm(x, dtype, 0))


def _sq_norm_tile(x, w, eta, dtype) -> Tensor:
    """Sum of squares of one CPU tile: T*x into the cached scratch, then one dot product."""
    if dtype == torch.bfloat16 and w is not None:
        # torch's bf16 arithmetic, as for the unweighted bf16 norm (_sq_norm_group): T*x rounded
        # to bf16, each norm accumulated in float32 and rounded to bf16
        ws = _workspace(x, dtype, 0)
        torch._foreach_copy_(ws, w)
        if eta:
            torch._foreach_abs_(ws)
            torch._foreach_add_(ws, float(eta))
        torch._foreach_mul_(ws, x)
        return _sum_squares(ws).sum()
    flat, ws = _workspace_flat(x, opmath(dtype), 0)
    if w is not None:
        _weighted_(ws, x, w, eta, dtype)
    else:
        torch._foreach_copy_(ws, x)
    return torch.dot(flat, flat)


def sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    totals, parts, order = [], [], []
    for dtype, (x, w) in _groups(xs, weights):
        tiles = _tiles([x, w]) if (w is not None or dtype == torch.float16) else None
        if tiles is None:
            per = _sq_norm_group(x, w, eta, dtype)
            totals.append(per.sum())
        else:  # CPU: one dot product per tile; per-tensor sums only when asked for
            totals.append(torch.stack([_sq_norm_tile(tx, tw, eta, dtype) for (tx, tw), _ in tiles]).sum())
            if per_tensor:
                per = torch.zeros(len(x), dtype=opmath(dtype), device=x[0].device)
                for (tx, tw), idx in tiles:  # gathered from the tiles in a fixed order
                    per.index_add_(0, idx, _sq_norm_group(tx, tw, eta, dtype))
        if per_tensor:
            parts.append(per)
            order.append(x)
    # mixed dtypes: in float64 when any input is float64
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in totals) else totals[0].dtype
    total = totals[0] if len(totals) == 1 else torch.stack([t.to(out_dtype) for t in totals]).sum()
    if not per_tensor:
        return total
    if len(parts) == 1:
        return total, parts[0]
    # put per-tensor results back in list order
    pos = {id(t): i for i, t in enumerate(xs)}
    per = torch.empty(len(xs), dtype=out_dtype, device=xs[0].device)
    for p, x in zip(parts, order):
        per[torch.tensor([pos[id(t)] for t in x], device=per.device)] = p.to(out_dtype)
    return total, per


def perturb_(params, grads, backup, scale, eta=None, mask=None):
    for dtype, (p, g, b, m) in _groups(params, grads, backup, mask):
        s_host = _host_float(scale, p)
        if s_host == 0.0:  # a zero scale drops the term: w stays as it is, whatever g holds
            if b is not None:
                torch._foreach_copy_(b, p)
            continue
        # on CPU the backup is taken tile by tile, so the update reads w from cache
        for tp, tg, tb, tm in _tiled([p, g, b, m]):
            if tb is not None:
                torch._foreach_copy_(tb, tp)
            if eta is None and tm is None and s_host is not None:
                # w + scale*g in one op (for bf16/fp16, torch computes the add in float32 and rounds once)
                _axpy_(tp, tg, s_host)
            else:
                _perturb_scratch_(tp, tg, tm, scale, s_host, eta, dtype)


def _perturb_scratch_(p, g, m, scale, s_host, eta, dtype) -> None:
    """w <- w + scale * T^2 g [* mask] through opmath scratch."""
    flat, ws = _workspace_flat(p, opmath(dtype), 0)
    if dtype in _LOW and eta == 0 and m is None and s_host is not None:
        # ASAM with eta 0, reduced precision: w + scale * (w g) w, five passes over the tile
        torch._foreach_copy_(ws, p)
        wg = _workspace(p, opmath(dtype), 1)
        torch._foreach_copy_(wg, g)
        torch._foreach_mul_(wg, ws)
        torch._foreach_addcmul_(ws, wg, ws, value=s_host)
        torch._foreach_copy_(p, ws)
        return
    if eta is not None:
        if eta:
            _t_(ws, p, eta)  # T at the incoming w
            torch._foreach_mul_(ws, ws)
        else:  # T^2 = w^2
            torch._foreach_copy_(ws, p)
            torch._foreach_mul_(ws, ws)
        torch._foreach_mul_(ws, _opm(g, dtype, 1))
    else:
        torch._foreach_copy_(ws, g)
    if m is not None:
        m1 = _workspace(p, opmath(dtype), 1)
        torch._foreach_copy_(m1, m)
        torch._foreach_mul_(ws, m1)
    if s_host is not None and dtype not in _LOW:
        _axpy_(p, ws, s_host)  # w + scale * (T^2 g): the scale rides on the update pass
        return
    _mul_(ws, scale if s_host is None else s_host)
    if s_host is None:  # a device scale of zero drops the term: w + (-0.0) == w bit for bit
        flat.masked_fill_(scale.to(flat.device) == 0, -0.0)
    _store_(p, ws, p, dtype)


def restore_(params, backup):
    for _, (p, b) in _groups(params, backup):
        torch._foreach_copy_(p, b)


def dot_norms(a, b):
    out = []
    for dtype, (x, y) in _groups(a, b):
        parts = [_dot_norms_scratch(tx, ty, dtype) for tx, ty in _tiled([x, y])]
        out.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
    return out[0] if len(out) == 1 else torch.stack([o.double() for o in out]).sum(0)


def _dot_norms_scratch(x, y, dtype) -> Tensor:
    flat, ws = _workspace_flat(x, opmath(dtype), 0)
    torch._foreach_copy_(ws, x)
    yy = _opm(y, dtype, 1)
    na = _sum_squares(ws).sum()
    nb = _sum_squares(yy).sum()
    torch._foreach_mul_(ws, yy)
    return torch.stack([flat.sum(), na, nb])


def _is_zero(c) -> bool:
    return not isinstance(c, Tensor) and c == 0


def combine_(g, saved, c1, c2):
    tensor_coef = isinstance(c1, Tensor) or isinstance(c2, Tensor)
    for dtype, (x, s) in _groups(g, saved):
        if dtype not in _LOW and not tensor_coef:
            if _is_zero(c1):
                torch._foreach_zero_(x)  # dropped: 0 * inf would be NaN
            else:
                _mul_(x, c1)
            if not _is_zero(c2):
                _axpy_(x, s, c2)
            continue
        for tx, ts in _tiled([x, s]):
            _combine_scratch_(tx, ts, c1, c2, dtype)


def _combine_scratch_(x, s, c1, c2, dtype) -> None:
    """c1*g + c2*saved in opmath, one rounding at the end; a zero coefficient drops its term."""
    flat, ws = _workspace_flat(x, opmath(dtype), 0)
    torch._foreach_copy_(ws, x)
    _mul_(ws, c1)
    if isinstance(c1, Tensor):
        flat.masked_fill_(c1 == 0, 0.0)
    elif c1 == 0:
        flat.zero_()
    if isinstance(c2, Tensor):
        flat2, ws2 = _workspace_flat(x, opmath(dtype), 1)
        torch._foreach_copy_(ws2, s)
        _mul_(ws2, c2)
        flat2.masked_fill_(c2 == 0, 0.0)
        torch._foreach_add_(ws, ws2)
    elif c2 != 0:
        _axpy_(ws, _opm(s, dtype, 1), c2)
    torch._foreach_copy_(x, ws)


def _skip_mask(found_inf: Optional[Tensor]) -> Optional[Tensor]:
    """0-d bool: True where the step is skipped (found_inf nonzero)."""
    return None if found_inf is None else found_inf != 0


def _pick(skip: Optional[Tensor], normal: float, skipped: float):
    """``normal``, or a 0-d device tensor that is ``skipped`` when the step is skipped (no host sync)."""
    if skip is None:
        return normal
    # float64, so that a float64 bucket sees exactly the Python number (cast down for others)
    return torch.where(skip, torch.tensor(skipped, dtype=torch.float64, device=skip.device), normal)


def _sanitized_grad(p, g, grad_coef, skip, dtype) -> tuple[Tensor, list[Tensor]]:
    """Opmath scratch (slot 0) holding grad_coef * g, zeroed when the step is skipped."""
    flat, d = _workspace_flat(p, opmath(dtype), 0)
    torch._foreach_copy_(d, g)
    if grad_coef is not None:
        _mul_(d, grad_coef)
    if skip is not None:
        flat.masked_fill_(skip, 0.0)  # g may hold inf/NaN; 0 keeps every state update a no-op
    return flat, d


def _store_delta_(p, flat: Tensor, delta: list[Tensor], b, skip, dtype) -> None:
    """w <- backup + delta; on a skipped step delta is -0.0, and x + (-0.0) == x bit for bit."""
    if skip is not None:
        flat.masked_fill_(skip, -0.0)
    _store_(p, delta, b, dtype)


#: On CPU tensors the skip flag is read on the host (there is no device to wait for), so a step
#: that is not skipped takes the short path below; on other devices the skip stays on the device.
#: Tests switch this off to check on CPU that the device path needs no host read.
HOST_BRANCH_ON_CPU = True


def _host_skip(found_inf: Optional[Tensor], params: Sequence[Tensor]) -> Optional[bool]:
    if found_inf is None:
        return False
    if HOST_BRANCH_ON_CPU and found_inf.device.type == "cpu" and params[0].device.type == "cpu":
        return bool(found_inf != 0)
    return None  # unknown on the host: decide on the device


def _host_float(s, params: Sequence[Tensor]) -> Optional[float]:
    """``s`` as a Python float when that costs no device sync (a number, or a CPU tensor on the
    host path), else None."""
    if not isinstance(s, Tensor):
        return float(s)
    if HOST_BRANCH_ON_CPU and s.device.type == "cpu" and params[0].device.type == "cpu":
        return float(s)
    return None


def _skipped_(params, backup, init_buffers) -> None:
    restore_(params, backup)
    if init_buffers is not None:
        torch._foreach_zero_(init_buffers)


def restore_sgd_(
    params, backup, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, init_momentum,
    grad_coef=None, found_inf=None,
):
    host = _host_skip(found_inf, params)
    if host:
        return _skipped_(params, backup, momentum_buffers if momentum and init_momentum else None)
    skip = None if host is False else _skip_mask(found_inf)
    for dtype, (p, b, g, buf) in _groups(params, backup, grads, momentum_buffers):
        if skip is None and HOST_BRANCH_ON_CPU and p[0].device.type == "cpu":
            # CPU: host scalars, torch.optim.SGD's own arithmetic (for bf16/fp16: each op in float32,
            # rounded to the dtype), the restore folded into the update of each large tensor
            coef = None if grad_coef is None else _host_float(grad_coef, p)
            _sgd_cpu_(p, b, g, buf, _host_float(lr, p), momentum, dampening, weight_decay, nesterov,
                      init_momentum, coef, dtype)
            continue
        if skip is None and dtype not in _LOW:
            _sgd_short_(p, b, g, buf, lr, momentum, dampening, weight_decay, nesterov, init_momentum, grad_coef, dtype)
            continue
        keep_buf = _pick(skip, float(momentum), 1.0)
        for tp, tb, tg, tbuf in _tiled([p, b, g, buf]):
            _sgd_scratch_(tp, tb, tg, tbuf, lr, momentum, dampening, weight_decay, nesterov, init_momentum,
                          grad_coef, skip, keep_buf, dtype)


def _sgd_scratch_(p, b, g, buf, lr, momentum, dampening, weight_decay, nesterov, init, grad_coef, skip, keep_buf,
                  dtype) -> None:
    """The general SGD step through opmath scratch: skip flag on the device, any dtype."""
    flat, d = _sanitized_grad(p, g, grad_coef, None, dtype)
    if weight_decay:
        _axpy_(d, _opm(b, dtype, 1), weight_decay)
    if skip is not None:
        flat.masked_fill_(skip, 0.0)
    if momentum:
        if init:
            torch._foreach_copy_(buf, d)  # zeros on a skipped step
        elif dtype in _LOW:
            bb = _opm(buf, dtype, 1)
            _mul_(bb, keep_buf)
            _axpy_(bb, d, 1.0 - float(dampening))
            torch._foreach_copy_(buf, bb)
        else:
            _mul_(buf, keep_buf)
            _axpy_(buf, d, 1.0 - float(dampening))
        if nesterov:
            _axpy_(d, _opm(buf, dtype, 1), momentum)
        else:
            torch._foreach_copy_(d, buf)
    _mul_(d, -lr)
    _store_delta_(p, flat, d, b, skip, dtype)


def _sgd_short_(p, b, g, buf, lr, momentum, dampening, weight_decay, nesterov, init, grad_coef, dtype) -> None:
    """Not skipped, in the parameter dtype: the fewest foreach passes (d is g itself unless it must change)."""
    d = g
    if grad_coef is not None or weight_decay or (momentum and nesterov):
        d = _workspace(p, dtype, 0)
        torch._foreach_copy_(d, g)
        if grad_coef is not None:
            _mul_(d, grad_coef)
        if weight_decay:
            _axpy_(d, b, weight_decay)
    if momentum:
        if init:
            torch._foreach_copy_(buf, d)
        else:
            torch._foreach_mul_(buf, float(momentum))
            _axpy_(buf, d, 1.0 - float(dampening))
        if nesterov:
            _axpy_(d, buf, momentum)
        else:
            d = buf
    torch._foreach_copy_(p, b)
    _axpy_(p, d, -lr)


#: On CPU, tensors of at least this many elements take per-tensor ``out=`` ops in restore_sgd_
#: (two or three passes instead of foreach's four); smaller ones stay in one foreach call.
CPU_OUT_MIN = 1 << 14


def _sgd_cpu_(p, b, g, buf, lr: float, momentum, dampening, weight_decay, nesterov, init, grad_coef, dtype) -> None:
    """CPU, not skipped, host scalars: w <- backup - lr * d in one op per large tensor, where
    d = momentum buffer (or the Nesterov direction) updated from grad_coef * g + weight_decay * backup."""
    big = [i for i, t in enumerate(p) if t.numel() >= CPU_OUT_MIN]
    if len(big) < len(p):
        small = [i for i, t in enumerate(p) if t.numel() < CPU_OUT_MIN]
        pick = lambda xs: None if xs is None else [xs[i] for i in small]  # noqa: E731
        _sgd_short_(pick(p), pick(b), pick(g), pick(buf), lr, momentum, dampening, weight_decay, nesterov, init,
                    grad_coef, dtype)
    if not big:
        return
    pb = [p[i] for i in big]
    need_d = grad_coef is not None or weight_decay or (momentum and nesterov)
    ws = _workspace(pb, dtype, 0) if need_d else None
    damp = float(dampening)
    for k, i in enumerate(big):
        src = g[i]
        if grad_coef is not None:
            src = torch.mul(src, grad_coef, out=ws[k])
        if weight_decay:
            src = torch.add(src, b[i], alpha=weight_decay, out=ws[k])
        upd = src
        if momentum:
            bf = buf[i]
            if init:
                bf.copy_(src)
            elif damp == 0.0:
                torch.add(src, bf, alpha=momentum, out=bf)  # buf <- d + momentum * buf
            else:
                bf.mul_(momentum).add_(src, alpha=1.0 - damp)
            upd = torch.add(src, bf, alpha=momentum, out=ws[k]) if nesterov else bf
        torch.add(b[i], upd, alpha=-lr, out=p[i])


def restore_adamw_(
    params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
    grad_coef=None, found_inf=None,
):
    if isinstance(step, Tensor):  # bias corrections on the device: no host value needed
        t = step.to(torch.float64)
        bc1 = 1.0 - beta1**t
        inv_bc2_sqrt = (1.0 - beta2**t).rsqrt()
    else:
        bc1 = 1.0 - beta1**step
        inv_bc2_sqrt = (1.0 - beta2**step) ** -0.5
    host = _host_skip(found_inf, params)
    if host:
        return _skipped_(params, backup, None)
    skip = None if host is False else _skip_mask(found_inf)
    w1 = _pick(skip, 1.0 - beta1, 0.0)
    keep_m = _pick(skip, beta1, 1.0)
    keep_v = _pick(skip, beta2, 1.0)
    w2 = _pick(skip, 1.0 - beta2, 0.0)
    for dtype, (p, b, g, m, v) in _groups(params, backup, grads, exp_avgs, exp_avg_sqs):
        for tp, tb, tg, tm, tv in _tiled([p, b, g, m, v]):
            _adamw_scratch_(tp, tb, tg, tm, tv, lr, eps, weight_decay, bc1, inv_bc2_sqrt, grad_coef, skip,
                            (keep_m, w1), (keep_v, w2), dtype)


def _adamw_scratch_(p, b, g, m, v, lr, eps, weight_decay, bc1, inv_bc2_sqrt, grad_coef, skip, mw, vw, dtype):
    flat, d = _sanitized_grad(p, g, grad_coef, skip, dtype)
    # moments stay in the parameter dtype, as torch.optim.AdamW keeps them
    for state, (keep, w) in ((m, mw), (v, vw)):
        if state is v:
            torch._foreach_mul_(d, d)  # g'^2; g' is not needed after m
        st = _opm(state, dtype, 1) if dtype in _LOW else state
        _mul_(st, keep)
        _axpy_(st, d, w)
        if st is not state:
            torch._foreach_copy_(state, st)
    torch._foreach_copy_(d, v)  # denominator: sqrt(v)/sqrt(bc2) + eps
    torch._foreach_sqrt_(d)
    _mul_(d, inv_bc2_sqrt)
    torch._foreach_add_(d, eps)
    torch._foreach_reciprocal_(d)
    torch._foreach_mul_(d, _opm(m, dtype, 1))  # m / denom
    _mul_(d, lr)
    _mul_(d, -1.0 / bc1)  # -lr/bc1 * m/denom
    w0 = _opm(b, dtype, 1)
    if isinstance(lr, Tensor) or weight_decay:
        _axpy_(d, w0, -lr * weight_decay)  # decoupled decay, accumulated in opmath
    _store_delta_(p, flat, d, b, skip, dtype)
