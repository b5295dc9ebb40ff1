"""The ``torch`` backend: every primitive as a few ``torch._foreach_*`` calls per (device, dtype).

Tiles and scratch. A primitive that needs opmath scratch (float32, or float64 for float64
inputs) cuts its lists into tiles of at most ``tile_size(device)`` elements (``CPU_TILE`` on CPU,
``DEVICE_TILE`` elsewhere) and runs its foreach ops tile by tile over scratch slots of that many
elements, allocated once per (device, dtype, slot) and reused: a step allocates nothing after its
first call, and the scratch is a fixed amount whatever the model -- at most three opmath slots
and one slot in the parameter dtype per (device, dtype) in use: on CPU at most 4 MiB for an
fp32, bf16 or fp16 model (1 MiB slots, cache-sized, so the scratch passes cost no memory
traffic; 1-2 MiB in the usual steps), 6 MiB more for float64; 16 MiB per float32 slot on other
devices. A contiguous tensor is cut into 1-D views at any element (a tile packs several
tensors); a non-contiguous one (channels_last) along its leading dims. In fp32/fp64, elementwise
results are the bits of an untiled run.

No cache holds a caller's tensor. The tile plans are cached by the lists' shapes and contiguity
and hold only sizes; the views of the caller's tensors (gradients, weights) are made per call and
dropped when it returns, so a freed gradient is freed, and a new tensor at a freed address can
never meet a stale view. The other caches hold only views of the module's own scratch.

Scalars stay in opmath: no op whose output is bf16/fp16 takes a scalar that torch would round to
that dtype first (``_foreach_mul_(xs, number)``, ``add(..., alpha=)`` and ``add(number)`` do;
``mul_(number)``, a product with a 0-d CPU float32 tensor and ``addcmul(..., value=)`` do not), so
a radius rho/||g|| of 1e-9 reaches an fp16 weight as 1e-9. Low-precision results are computed in
opmath and rounded once, when written back; optimizer states (AdamW's moments, SGD's momentum
buffer) are kept in the parameter dtype, as torch.optim keeps them, and the update uses this
step's opmath values, as the Triton and CUDA kernels do.

On CPU two more things differ, both measured with bench/run.py (bench/NOTES.md):

* bfloat16 sums of squares use torch's bf16 kernels (ASAM's T*x rounded to bf16; float32
  accumulation, each tensor's norm rounded to bf16; see ``_sq_norm_group``, ``_sq_norm_tile``).
  fp16 keeps the exact path: its norm could overflow.
* Restore fused into SGD. ``w <- backup - lr * d`` is one ``out=`` op per large tensor (per
  tile-sized piece of it when d needs scratch; foreach has no ``out=``), saving the separate
  restore pass; bf16/fp16 round each op to the dtype as torch.optim.SGD does (its scalars in
  float32).
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..spec import NORM_EPS
from . import upload

_LOW = (torch.float16, torch.bfloat16)

#: Elements per tile on CPU (an opmath scratch slot of 1 MiB in float32: cache-sized).
CPU_TILE = 1 << 18
#: Elements per tile on other devices (16 MiB per float32 slot; fewer launches per step).
DEVICE_TILE = 1 << 22
#: A pass that needs no scratch and is tiled on CPU only so that a second read of a tile comes
#: from cache (perturb_'s backup copy, then the update) takes tiles this many times larger:
#: fewer views to make per call.
CPU_PASS_TILES = 4
_SCRATCH: dict[tuple, Tensor] = {}  # (device, dtype, slot) -> tile_size elements
# views of a scratch slot shaped like a tile's tensors: (device, dtype, slot, shapes) -> (flat, views)
_SCRATCH_VIEWS: OrderedDict[tuple, tuple[Tensor, list[Tensor]]] = OrderedDict()
_MAX_SCRATCH_VIEWS = 1 << 15  # views kept in all (Python objects only: no memory of their own)
_scratch_views_held = 0
# tile plans: (device, tile size, shapes, contiguity) -> _Plan (sizes only, never a tensor)
_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_MAX_PLANS = 64
_ONES: dict[tuple, Tensor] = {}  # (device, dtype) -> a 0-d 1 (addcmul's value= keeps a scalar in opmath)
#: calls that needed more scratch than a tile (none: every primitive tiles; a test checks it)
untiled_scratch_calls = 0


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_size(device: torch.device) -> int:
    return CPU_TILE if device.type == "cpu" else DEVICE_TILE


def clear_caches() -> None:
    """Drop every cache and scratch slot of this module (they are rebuilt on the next call)."""
    global _scratch_views_held
    _SCRATCH.clear()
    _SCRATCH_VIEWS.clear()
    _scratch_views_held = 0
    _PLANS.clear()
    _ONES.clear()


def _views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    views, off = [], 0
    for t in like:
        views.append(flat[off : off + t.numel()].view(t.shape))
        off += t.numel()
    return views


def _scratch_base(dev: torch.device, dtype: torch.dtype, slot: int, size: int = 0) -> Tensor:
    """The 1-D scratch slot ``(dev, dtype, slot)``: a tile's elements, or ``size`` when larger."""
    global _scratch_views_held
    size = max(size, tile_size(dev))
    base = _SCRATCH.get((dev, dtype, slot))
    if base is None or base.numel() < size:
        if base is not None:  # views of the old slot would keep it alive: drop them
            for k in [k for k in _SCRATCH_VIEWS if k[:3] == (dev, dtype, slot)]:
                _scratch_views_held -= len(_SCRATCH_VIEWS.pop(k)[1])
        base = _SCRATCH[(dev, dtype, slot)] = torch.empty(size, dtype=dtype, device=dev)
    return base


def _scratch_flat(like: Sequence[Tensor], dtype: torch.dtype, slot: int, n: int) -> tuple[Tensor, list[Tensor]]:
    """Views of the shared scratch slot (for lists of at most a tile's elements, as a tile is)."""
    global _scratch_views_held
    dev = like[0].device
    base = _scratch_base(dev, dtype, slot)
    key = (dev, dtype, slot, tuple(t.shape for t in like))
    hit = _SCRATCH_VIEWS.get(key)
    if hit is not None:
        _SCRATCH_VIEWS.move_to_end(key)
        return hit
    flat = base[:n]
    hit = _SCRATCH_VIEWS[key] = (flat, _views(flat, like))
    _scratch_views_held += len(like)
    while _scratch_views_held > _MAX_SCRATCH_VIEWS and len(_SCRATCH_VIEWS) > 1:
        _scratch_views_held -= len(_SCRATCH_VIEWS.popitem(last=False)[1][1])
    return hit


def _workspace_flat(like: Sequence[Tensor], dtype: torch.dtype, slot: int = 0) -> tuple[Tensor, list[Tensor]]:
    global untiled_scratch_calls
    n = sum(t.numel() for t in like)
    if n <= tile_size(like[0].device):
        return _scratch_flat(like, dtype, slot, n)
    # never reached by the primitives, which tile every list that needs scratch: a temporary,
    # freed after the call (a cached parameter-sized workspace would be memory the contract forbids)
    untiled_scratch_calls += 1
    flat = torch.empty(n, dtype=dtype, device=like[0].device)
    return flat, _views(flat, like)


def _workspace(like: Sequence[Tensor], dtype: torch.dtype, slot: int = 0) -> list[Tensor]:
    """Scratch tensors shaped like ``like`` (a tile: views of one fixed scratch slot, reused).

    Contents are garbage and valid until the next primitive call. Slots 0, 1 and 2 are
    independent scratch lists for operations that need several opmath operands at once.
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


def _one(t: Tensor) -> Tensor:
    """A 0-d 1 of ``t``'s dtype and device (cached)."""
    key = (t.device, t.dtype)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=t.dtype, device=t.device)
    return one


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


def _cut(shape: Sequence[int], dim: int, room: int):
    """Narrowings ``((dim, start, length), ...)`` that cut a tensor of ``shape`` along its leading
    dims into pieces of at most ``room`` elements, each as many whole rows of ``dim`` as fit."""
    inner = math.prod(shape[dim + 1 :])
    if inner <= room:
        k = max(1, room // inner)
        for s in range(0, shape[dim], k):
            yield ((dim, s, min(k, shape[dim] - s)),)
    else:
        for s in range(shape[dim]):
            for rest in _cut(shape, dim + 1, room):
                yield ((dim, s, 1),) + rest


class _Plan:
    """How a list of tensors is cut into tiles: sizes only, so it can be shared by any lists of
    these shapes and layouts. ``tiles[k]`` lists the pieces of tile k: ``(0, i, None)`` tensor i
    whole, ``(1, i, j)`` the j-th 1-D piece of contiguous tensor i (``splits[i]`` holds the sizes),
    ``(2, i, narrowings)`` a piece of non-contiguous tensor i; ``index[k]`` each piece's tensor."""

    __slots__ = ("tiles", "index", "splits")

    def __init__(self, shapes: Sequence[torch.Size], flat_ok: Sequence[bool], size: int) -> None:
        self.tiles: list[list[tuple]] = []
        self.index: list[tuple[int, ...]] = []
        self.splits: dict[int, list[int]] = {}
        cur: list[tuple] = []
        idx: list[int] = []
        used = 0

        def close() -> None:
            nonlocal cur, idx, used
            if cur:
                self.tiles.append(cur)
                self.index.append(tuple(idx))
            cur, idx, used = [], [], 0

        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if n == 0:
                continue
            if n <= size - used:  # the whole tensor fits the open tile
                cur.append((0, i, None))
                idx.append(i)
                used += n
            elif flat_ok[i]:  # 1-D pieces: the first fills the open tile
                sizes = self.splits[i] = []
                a = 0
                while a < n:
                    b = min(n, a + size - used)
                    cur.append((1, i, len(sizes)))
                    idx.append(i)
                    sizes.append(b - a)
                    used += b - a
                    a = b
                    if used == size:
                        close()
            else:  # along the leading dims; a tile holds at most one piece of a tensor
                for spec in _cut(shape, 0, size):
                    m = math.prod(ln for _, _, ln in spec) * math.prod(shape[spec[-1][0] + 1 :])
                    if used + m > size or (idx and idx[-1] == i):
                        close()
                    cur.append((2, i, spec))
                    idx.append(i)
                    used += m
            if used == size:
                close()
        close()


def _tiles(
    lists: Sequence[Optional[Sequence[Tensor]]], size: Optional[int] = None
) -> Optional[list[tuple[list, tuple[int, ...]]]]:
    """Parallel lists cut into tiles of at most ``size`` (default ``tile_size``) elements: per tile,
    (the parallel sublists -- None for an absent list -- and the index of each piece's tensor).
    The views are made here, per call, from a cached plan. None when every tensor is empty."""
    first = lists[0]
    size = size or tile_size(first[0].device)
    present = [lst for lst in lists if lst is not None]
    contig = tuple(tuple(t.is_contiguous() for t in lst) for lst in present)
    shapes = tuple(t.shape for t in first)
    key = (first[0].device, size, shapes, contig)
    plan = _PLANS.get(key)
    if plan is None:
        flat_ok = [all(c[i] for c in contig) for i in range(len(first))]
        plan = _PLANS[key] = _Plan(shapes, flat_ok, size)
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    if not plan.tiles:
        return None
    parts = [
        None if lst is None else {i: lst[i].view(-1).split_with_sizes(sz) for i, sz in plan.splits.items()}
        for lst in lists
    ]
    return [
        (
            [
                None
                if lst is None
                else [
                    lst[i] if kind == 0 else split[i][arg] if kind == 1 else _narrowed(lst[i], shapes[i], arg)
                    for kind, i, arg in pieces
                ]
                for lst, split in zip(lists, parts)
            ],
            index,
        )
        for pieces, index in zip(plan.tiles, plan.index)
    ]


def _narrowed(t: Tensor, shape: torch.Size, spec: tuple) -> Tensor:
    """The piece ``spec`` (narrowings, see ``_cut``) of ``t``, a tensor of ``shape``."""
    if t.shape != shape:
        raise ValueError(f"parallel lists differ in shape: {tuple(shape)} and {tuple(t.shape)}")
    for d, s, ln in spec:
        t = t.narrow(d, s, ln)
    return t


def _tiled(lists: Sequence[Optional[Sequence[Tensor]]], size: Optional[int] = None):
    """Yields the parallel sublists of each tile, or ``lists`` once when every tensor is empty."""
    tiles = _tiles(lists, size)
    if tiles is None:
        yield list(lists)
        return
    for sub, _ in tiles:
        yield sub


def _pieces(ts: Sequence[Optional[Tensor]], size: int):
    """Parallel pieces of at most ``size`` elements of the parallel tensors ``ts`` (None stays None)."""
    t0 = ts[0]
    if t0.numel() <= size:
        yield list(ts)
        return
    if all(t is None or t.is_contiguous() for t in ts):
        n = t0.numel()
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
        splits = [None if t is None else t.view(-1).split_with_sizes(sizes) for t in ts]
        for k in range(len(sizes)):
            yield [None if sp is None else sp[k] for sp in splits]
        return
    for spec in _cut(t0.shape, 0, size):
        out = []
        for t in ts:
            if t is not None:
                for d, s, ln in spec:
                    t = t.narrow(d, s, ln)
            out.append(t)
        yield out


def _mul_(xs: list[Tensor], s) -> None:
    """xs <- xs * s, s a number or a 0-d tensor, taken in opmath (a bf16/fp16 ``xs`` only on the
    CPU: a product with a 0-d CPU float32 tensor reads it unrounded, a foreach product with a
    number would round it to the dtype)."""
    if isinstance(s, Tensor):
        torch._foreach_mul_(xs, s.to(opmath(xs[0].dtype)))
    elif s != 1:
        if xs[0].dtype in _LOW and xs[0].device.type == "cpu":
            torch._foreach_mul_(xs, torch.tensor(float(s), dtype=torch.float32))
        else:
            torch._foreach_mul_(xs, float(s))


def _axpy_(ws: list[Tensor], x: Sequence[Tensor], s) -> None:
    """ws <- ws + s * x (s a number or a 0-d tensor; x of ws's dtype), s taken in opmath.

    For a bf16/fp16 ``ws`` (with a number s) this is ``addcmul(ws, x, 1, value=s)``: computed in
    float32 and rounded once, where ``add(alpha=s)`` would first round s itself to the dtype."""
    if isinstance(s, Tensor):
        if ws[0].dtype in _LOW:
            if s.device.type != "cpu":
                raise RuntimeError("internal: a device scalar with bf16/fp16 tensors must go through opmath scratch")
            s = float(s)
        else:
            torch._foreach_addcmul_(ws, x, [s.to(ws[0].dtype)] * len(ws))
            return
    if ws[0].dtype in _LOW:
        torch._foreach_addcmul_(ws, x, [_one(ws[0])] * len(ws), value=float(s))
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
    """Sum of squares of one tile: T*x into the scratch, then one dot product."""
    if dtype == torch.bfloat16 and w is not None and x[0].device.type == "cpu":
        # torch's bf16 arithmetic, as for the unweighted bf16 norm (_sq_norm_group): T*x rounded
        # to bf16, each norm accumulated in float32 and rounded to bf16
        ws = _workspace(x, dtype, 0)
        torch._foreach_copy_(ws, w)
        if eta:
            torch._foreach_abs_(ws)
            one = [_one(ws[0])] * len(ws)
            torch._foreach_addcmul_(ws, one, one, value=float(eta))  # |w| + eta, eta unrounded
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
        # scratch needed: ASAM's T*x, an fp16 list (exact path), a bf16 list off the CPU (float32 copy)
        scratch = w is not None or dtype == torch.float16 or (dtype == torch.bfloat16 and x[0].device.type != "cpu")
        tiles = _tiles([x, w]) if scratch else None
        if tiles is None:  # the list itself (opmath, or bf16 on CPU), or every tensor empty
            per = _sq_norm_group(x, w, eta, dtype)
            totals.append(per.sum())
        else:  # one dot product per tile; per-tensor sums only when asked for
            totals.append(torch.stack([_sq_norm_tile(tx, tw, eta, dtype) for (tx, tw), _ in tiles]).sum())
            if per_tensor:
                per = torch.zeros(len(x), dtype=opmath(dtype), device=x[0].device)
                for (tx, tw), idx in tiles:  # gathered from the tiles in a fixed order (an index once per tile)
                    per.index_add_(0, upload(idx, per.device), _sq_norm_group(tx, tw, eta, dtype))
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
        per[upload([pos[id(t)] for t in x], per.device)] = p.to(out_dtype)
    return total, per


def _sqrt_rn(x: Tensor) -> Tensor:
    """``sqrt(x)`` correctly rounded in x's dtype. torch's CPU sqrt is not (up to an ulp off, float32
    and float64 alike); on CPU the value is read on the host for free and taken in double (exact for
    float32 after the rounding, exact for float64); on a GPU torch's sqrt is the IEEE one. (With
    HOST_BRANCH_ON_CPU off, the device path on CPU: float32 through torch's double sqrt.)"""
    if x.device.type != "cpu":
        return x.sqrt()
    if not HOST_BRANCH_ON_CPU:
        return x.double().sqrt().to(x.dtype) if x.dtype != torch.float64 else x.sqrt()
    v = float(x)
    return torch.tensor(math.sqrt(v) if v >= 0 else math.nan, dtype=torch.float64).to(x.dtype).reshape(x.shape)


def inverse_norm_scale(scale, norm_sq: Tensor, dtype: Optional[torch.dtype] = None):
    """``scale * inv``, ``inv = 1 / (sqrt(norm_sq) + NORM_EPS)`` and 0 where that is NaN (a
    non-finite or negative norm): what every backend's ``perturb_`` computes from ``norm_sq``,
    in this order and in the opmath of ``dtype`` (the parameters'; default: norm_sq's own), each
    operation correctly rounded (1/inf is 0 already). Three device ops on this backend, folded
    into the kernel on the others."""
    n = norm_sq.reshape(()).to(opmath(dtype or norm_sq.dtype))
    inv = torch.nan_to_num((_sqrt_rn(n) + NORM_EPS).reciprocal(), nan=0.0)
    return inv * scale


def perturb_(params, grads, backup, scale, eta=None, mask=None, norm_sq=None):
    if norm_sq is not None:
        scale = inverse_norm_scale(scale, norm_sq, params[0].dtype)
    for dtype, (p, g, b, m) in _groups(params, grads, backup, mask):
        s_host = _host_float(scale, p)
        if s_host == 0.0:  # a zero scale drops the term: w stays as it is, whatever g holds
            if b is not None:
                torch._foreach_copy_(b, p)
            continue
        # on CPU the backup is taken tile by tile, so the update reads w from cache
        plain = eta is None and m is None and s_host is not None  # no scratch: larger tiles, fewer views
        size = CPU_PASS_TILES * CPU_TILE if plain and p[0].device.type == "cpu" else None
        for tp, tg, tb, tm in _tiled([p, g, b, m], size):
            if tb is not None:
                torch._foreach_copy_(tb, tp)
            if plain:
                # w + scale*g in one op (bf16/fp16: computed in float32 with scale unrounded, rounded once)
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
        # saved aliasing g with c2 != 0: g must not be scaled in place before saved is read
        aliased = not _is_zero(c2) and any(map(operator.is_, x, s))
        if dtype not in _LOW and not tensor_coef and not aliased:
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
    return torch.where(skip, torch.full((), skipped, dtype=torch.float64, device=skip.device), normal)


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
        # the buffer is kept in the parameter dtype; the update uses its opmath value of this step
        if init:
            torch._foreach_copy_(buf, d)  # zeros on a skipped step
            bb = d
        elif dtype in _LOW:
            bb = _opm(buf, dtype, 1)
            _mul_(bb, keep_buf)
            _axpy_(bb, d, 1.0 - float(dampening))
            torch._foreach_copy_(buf, bb)
        else:
            bb = buf
            _mul_(buf, keep_buf)
            _axpy_(buf, d, 1.0 - float(dampening))
        if nesterov:
            _axpy_(d, bb, momentum)
        elif bb is not d:
            torch._foreach_copy_(d, bb)
    _mul_(d, -lr)
    _store_delta_(p, flat, d, b, skip, dtype)


def _sgd_short_(p, b, g, buf, lr, momentum, dampening, weight_decay, nesterov, init, grad_coef, dtype) -> None:
    """Not skipped, in the parameter dtype: the fewest foreach passes (d is g itself unless it must
    change; then d lives in a scratch tile, the lists taken tile by tile)."""
    need_d = grad_coef is not None or weight_decay or (momentum and nesterov)
    for tp, tb, tg, tbuf in _tiled([p, b, g, buf]) if need_d else [(p, b, g, buf)]:
        d = tg
        if need_d:
            d = _workspace(tp, dtype, 0)
            torch._foreach_copy_(d, tg)
            if grad_coef is not None:
                _mul_(d, grad_coef)
            if weight_decay:
                _axpy_(d, tb, weight_decay)
        if momentum:
            if init:
                torch._foreach_copy_(tbuf, d)
            else:
                _mul_(tbuf, float(momentum))
                _axpy_(tbuf, d, 1.0 - float(dampening))
            if nesterov:
                _axpy_(d, tbuf, momentum)
            else:
                d = tbuf
        torch._foreach_copy_(tp, tb)
        _axpy_(tp, d, -lr)


#: On CPU, tensors of at least this many elements take per-tensor ``out=`` ops in restore_sgd_
#: (two or three passes instead of foreach's four); smaller ones stay in one foreach call.
CPU_OUT_MIN = 1 << 14


def _sgd_cpu_(p, b, g, buf, lr: float, momentum, dampening, weight_decay, nesterov, init, grad_coef, dtype) -> None:
    """CPU, not skipped, host scalars: w <- backup - lr * d in one op per large tensor, where
    d = momentum buffer (or the Nesterov direction) updated from grad_coef * g + weight_decay * backup.
    When d is neither the buffer nor g itself it lives in a scratch slot of a float32 tile's bytes
    (2^18 float32, 2^19 bf16/fp16 elements): a larger tensor is then taken piece by piece, with no
    parameter-sized workspace. bf16/fp16 round each op to the dtype, as torch.optim.SGD does, but
    take their scalars in float32 (``addcmul(..., value=s)``; ``add(alpha=s)`` would round s first)."""
    big = [i for i, t in enumerate(p) if t.numel() >= CPU_OUT_MIN]
    if len(big) < len(p):
        small = [i for i, t in enumerate(p) if t.numel() < CPU_OUT_MIN]
        pick = lambda xs: None if xs is None else [xs[i] for i in small]  # noqa: E731
        _sgd_short_(pick(p), pick(b), pick(g), pick(buf), lr, momentum, dampening, weight_decay, nesterov, init,
                    grad_coef, dtype)
    if not big:
        return
    need_d = grad_coef is not None or weight_decay or (momentum and nesterov)
    damp = float(dampening)
    low = dtype in _LOW
    if low:
        one = _one(p[big[0]])

        def axpy(x: Tensor, y: Tensor, s: float, out: Tensor) -> Tensor:  # out <- x + s * y
            return torch.addcmul(x, y, one, value=s, out=out)
    else:

        def axpy(x: Tensor, y: Tensor, s: float, out: Tensor) -> Tensor:
            return torch.add(x, y, alpha=s, out=out)

    size = CPU_TILE * 4 // p[big[0]].element_size()
    base = _scratch_base(p[0].device, dtype, 0, size) if need_d else None
    for i in big:
        ts = [p[i], b[i], g[i], None if buf is None else buf[i]]
        for pp, bb, gg, bf in _pieces(ts, size) if need_d else (ts,):
            ws = base[: pp.numel()].view(pp.shape) if need_d else None
            src = gg
            if grad_coef is not None:
                src = torch.mul(src, grad_coef, out=ws)
            if weight_decay:
                src = axpy(src, bb, weight_decay, ws)
            upd = src
            if momentum:
                if init:
                    bf.copy_(src)
                elif damp == 0.0:
                    axpy(src, bf, momentum, bf)  # buf <- d + momentum * buf
                elif low:
                    bf.mul_(momentum).addcmul_(src, one, value=1.0 - damp)
                else:
                    bf.mul_(momentum).add_(src, alpha=1.0 - damp)
                upd = axpy(src, bf, momentum, ws) if nesterov else bf
            axpy(bb, upd, -lr, pp)


def restore_adamw_(
    params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
    grad_coef=None, found_inf=None, decoupled=True,
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
                            (keep_m, w1), (keep_v, w2), dtype, bool(decoupled))


def _adamw_scratch_(p, b, g, m, v, lr, eps, weight_decay, bc1, inv_bc2_sqrt, grad_coef, skip, mw, vw, dtype,
                    decoupled=True):
    if decoupled or not weight_decay:
        flat, d = _sanitized_grad(p, g, grad_coef, skip, dtype)
    else:  # torch.optim.Adam's L2 decay: g' = grad_coef*g + wd*w0, zeroed afterwards on a skipped step
        flat, d = _sanitized_grad(p, g, grad_coef, None, dtype)
        _axpy_(d, _opm(b, dtype, 1), weight_decay)
        if skip is not None:
            flat.masked_fill_(skip, 0.0)
    # The moments are kept in the parameter dtype, as torch.optim.AdamW keeps them, updated in
    # opmath (scratch slots 1 and 2 for bf16/fp16) and rounded once; the update uses this step's
    # opmath values, as the kernels do (fp16 would flush a small g^2 in v to zero: 1/eps steps).
    new = []
    for state, (keep, w), slot in ((m, mw, 1), (v, vw, 2)):
        if state is v:
            torch._foreach_mul_(d, d)  # g'^2; g' is not needed after m
        st = _opm(state, dtype, slot) if dtype in _LOW else state
        _mul_(st, keep)
        _axpy_(st, d, w)
        if st is not state:
            torch._foreach_copy_(state, st)
        new.append(st)
    m_new, v_new = new
    torch._foreach_copy_(d, v_new)  # denominator: sqrt(v)/sqrt(bc2) + eps
    torch._foreach_sqrt_(d)
    _mul_(d, inv_bc2_sqrt)
    torch._foreach_add_(d, eps)
    torch._foreach_reciprocal_(d)
    torch._foreach_mul_(d, m_new)  # m / denom
    _mul_(d, lr)
    _mul_(d, -1.0 / bc1)  # -lr/bc1 * m/denom
    w0 = _opm(b, dtype, 1)  # slot 1 is free again
    if decoupled and (isinstance(lr, Tensor) or weight_decay):
        _axpy_(d, w0, -lr * weight_decay)  # decoupled decay, accumulated in opmath
    _store_delta_(p, flat, d, b, skip, dtype)


def restore_rmsprop_(
    params, backup, grads, square_avgs, momentum_buffers, lr, alpha, eps, weight_decay, momentum,
    grad_coef=None, found_inf=None,
):
    host = _host_skip(found_inf, params)
    if host:
        return _skipped_(params, backup, None)
    skip = None if host is False else _skip_mask(found_inf)
    keep_v = _pick(skip, alpha, 1.0)
    w_v = _pick(skip, 1.0 - alpha, 0.0)
    keep_buf = _pick(skip, momentum, 1.0)
    bufs = momentum_buffers if momentum > 0 else None
    for dtype, (p, b, g, v, buf) in _groups(params, backup, grads, square_avgs, bufs):
        for tp, tb, tg, tv, tbuf in _tiled([p, b, g, v, buf]):
            _rmsprop_scratch_(tp, tb, tg, tv, tbuf, lr, eps, weight_decay, grad_coef, skip, keep_v, w_v, keep_buf,
                              dtype)


def _rmsprop_scratch_(p, b, g, v, buf, lr, eps, weight_decay, grad_coef, skip, keep_v, w_v, keep_buf, dtype):
    """torch.optim.RMSprop's step (not centered) at w0 = backup through opmath scratch (slots 0-2);
    the states are kept in the parameter dtype, updated in opmath and rounded once."""
    flat, d = _sanitized_grad(p, g, grad_coef, None, dtype)  # g' = grad_coef*g (+ wd*w0)
    if weight_decay:
        _axpy_(d, _opm(b, dtype, 1), weight_decay)
    if skip is not None:
        flat.masked_fill_(skip, 0.0)
    low = dtype in _LOW
    st = _opm(v, dtype, 1) if low else v
    _mul_(st, keep_v)
    if isinstance(w_v, Tensor):  # the skip on the device: (1-alpha) or 0 as a device weight
        sq = _workspace(d, opmath(dtype), 2)
        torch._foreach_copy_(sq, d)
        torch._foreach_mul_(sq, d)
        _axpy_(st, sq, w_v)
    else:  # v*alpha + (1-alpha)*g'*g', torch's addcmul
        torch._foreach_addcmul_(st, d, d, value=float(w_v))
    if st is not v:
        torch._foreach_copy_(v, st)
    avg = _workspace(d, opmath(dtype), 2)
    torch._foreach_copy_(avg, st)
    torch._foreach_sqrt_(avg)
    torch._foreach_add_(avg, float(eps))
    torch._foreach_div_(d, avg)  # g'/avg
    if skip is not None:
        flat.masked_fill_(skip, 0.0)  # 0/0 where v = 0 and eps = 0: keeps the buffer as it is
    if buf is not None:
        bb = _opm(buf, dtype, 1) if low else buf
        _mul_(bb, keep_buf)
        torch._foreach_add_(bb, d)  # buf = momentum*buf + g'/avg
        if bb is not buf:
            torch._foreach_copy_(buf, bb)
        torch._foreach_copy_(d, bb)
    _mul_(d, -lr)
    _store_delta_(p, flat, d, b, skip, dtype)
