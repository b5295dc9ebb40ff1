"""The multi-tensor table: one launch walks every tensor of a list, whatever their number and sizes.

A list of ``n`` tensors is cut into chunks of :data:`CHUNK` elements (the last chunk of a tensor
may be short; an empty tensor has none). Each Triton program handles one chunk, found through:

* ``addrs``: int64 ``[L, n_local]``, the data address of tensor ``t`` of list ``l`` at ``l * n_local + t``
* ``numels``: int64 ``[n_local]``
* ``chunk_tensor``: int64 ``[n_chunks]``, the local tensor index of each chunk
* ``chunk_start``: int64 ``[n_chunks]``, the element offset of each chunk inside its tensor

the addresses in one device tensor, the other three (which depend on the numels only: the
*layout*) in another, shared by every table of the same numels. A table holds at most
:data:`TABLE_TENSORS` tensors and :data:`TABLE_CHUNKS` chunks; a longer list is split into several
such tables ("pieces"), each one launch. Chunks are numbered globally across pieces, so a
reduction writes one partial per chunk into one partials tensor whatever the number of pieces,
and ``chunk_begin`` (int64 ``[n + 1]``) gives each tensor's first global chunk.

Tables are cached, keyed by the device, the data addresses and the numels of every list (and the
module constants), and rebuilt only when one of those changes. A rebuild for new addresses (fresh
gradients every step, the default ``zero_grad(set_to_none=True)``) reuses the layout and uploads
only the addresses: one pinned, non-blocking copy (no host sync); ``STATS`` counts both. A table
holds addresses, never a tensor, so a hit is right whenever the key matches (a new tensor at a freed address included).
A table one of whose lists has been freed (gradients after ``zero_grad(set_to_none=True)``, a
flat buffer of a rebuilt bucket; watched through a weak reference to the storage of the list's
first tensor) is marked dead; the next table built evicts the dead ones. So the cache holds the
tables of live lists and of the lists used since the last build, rather than filling up to
``CACHE_SIZE`` as addresses change: memory stays flat. A dead table hit again (the allocator
handed the same addresses back, as CUDA's does) is used as it is and watched again.

Module constants are read at call time, so tests may lower them (``monkeypatch.setattr``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sharpfused.backends import upload
from sharpfused.lists import info

#: elements per program (a multiple of BLOCK)
CHUNK = 16384
#: elements per loop iteration of a program: 2048 fp32 over 8 warps is 2 x 16-byte accesses per thread
BLOCK = 2048
NUM_WARPS = 8
#: most tensors one launch's table holds; a longer list takes several launches
TABLE_TENSORS = 8192
#: most chunks one launch covers (CHUNK * TABLE_CHUNKS elements; keeps grids well inside limits)
TABLE_CHUNKS = 1 << 20
#: tables kept in the cache (a SAM step uses a handful: grads, params+grads+backup, ...)
CACHE_SIZE = 64

#: element types the kernels read and write; anything else (float64 included) goes to torch_ops
NATIVE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: mask element types a companion list may have (read as bytes: SSAM stores its mask as uint8)
MASKS = (torch.bool, torch.uint8)
#: same-width integer types, for bit-exact copies
BITS = {torch.float32: tl.int32, torch.bfloat16: tl.int16, torch.float16: tl.int16}


class Piece:
    """The table of one launch: a run of consecutive chunks and the tensors they touch."""

    __slots__ = ("addrs", "numels", "chunk_tensor", "chunk_start", "n_tensors", "n_chunks", "chunk_base")

    def __init__(self, addrs: Tensor, layout: Tensor, n_tensors: int, n_chunks: int, chunk_base: int) -> None:
        self.addrs = addrs
        self.numels = layout[:n_tensors]
        self.chunk_tensor = layout[n_tensors : n_tensors + n_chunks]
        self.chunk_start = layout[n_tensors + n_chunks :]
        self.n_tensors = n_tensors
        self.n_chunks = n_chunks
        self.chunk_base = chunk_base


class Table:
    """Every piece of one list-of-lists, plus what a per-tensor reduction needs."""

    __slots__ = ("pieces", "n_chunks", "chunk_begin", "aligned", "n_tensors")

    def __init__(self, pieces: list[Piece], n_chunks: int, chunk_begin: Tensor, aligned: bool, n_tensors: int) -> None:
        self.pieces = pieces
        self.n_chunks = n_chunks
        self.chunk_begin = chunk_begin
        self.aligned = aligned
        self.n_tensors = n_tensors


class Layout:
    """What a table holds besides addresses: it depends on the numels only (and the constants), so
    fresh gradients at new addresses (``zero_grad(set_to_none=True)``) reuse it and a rebuild
    uploads the addresses alone. ``pieces``: per piece (tensor indices, chunks, first global chunk,
    device view of numels / chunk_tensor / chunk_start); ``chunk_begin``: on the device."""

    __slots__ = ("pieces", "n_chunks", "chunk_begin", "device_memory")

    def __init__(self, pieces: list, n_chunks: int, chunk_begin: Tensor, device_memory: Tensor) -> None:
        self.pieces = pieces
        self.n_chunks = n_chunks
        self.chunk_begin = chunk_begin
        self.device_memory = device_memory


_CACHE: OrderedDict[tuple, Table] = OrderedDict()
#: layouts by (device, constants, numels): kept across address changes (a few per model)
_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()
#: counters the tests read: layouts built, address tables uploaded
STATS = {"layouts": 0, "uploads": 0}
#: keys of cached tables one of whose storages has been freed (evicted at the next build)
_DEAD: set[tuple] = set()
#: storage address -> (weak reference to the storage, keys of the cached tables that list it)
_WATCHED: dict[int, tuple[weakref.ref, set[tuple]]] = {}
#: key of a cached table -> the storage addresses it watches
_KEY_PTRS: dict[tuple, list[int]] = {}


def _storage_freed(ptr: int, ref: weakref.ref) -> None:
    entry = _WATCHED.get(ptr)
    if entry is not None and entry[0] is ref:
        del _WATCHED[ptr]
        _DEAD.update(entry[1])


def _watch(key: tuple, lists: Sequence[Sequence[Tensor]]) -> None:
    """Mark table ``key`` dead when the storage of a list's first tensor is freed (a weak reference:
    no tensor kept; a list is freed as a whole in practice, and one watch per list costs nothing)."""
    _DEAD.discard(key)
    ptrs = _KEY_PTRS[key] = []  # a list watched again keeps its (set) entry: nothing repeats
    for lst in lists:
        st = next((t.untyped_storage() for t in lst if t.numel()), None)
        if st is None or not st.data_ptr():
            continue  # nothing to free
        ptr = st.data_ptr()
        entry = _WATCHED.get(ptr)
        if entry is None or entry[0]() is not st:
            ref = weakref.ref(st, lambda r, ptr=ptr: _storage_freed(ptr, r))
            entry = _WATCHED[ptr] = (ref, set())
        entry[1].add(key)
        ptrs.append(ptr)


def clear_cache() -> None:
    """Drop every cached table (they are rebuilt on the next launch)."""
    _CACHE.clear()
    _LAYOUTS.clear()
    _DEAD.clear()
    _WATCHED.clear()
    _KEY_PTRS.clear()


def drop_tables() -> None:
    """Drop the address tables but keep the layouts: what new addresses for every list cost (the
    benchmark's fresh-gradients mode calls this every step, the worst case of a rebuild)."""
    for k in list(_CACHE):
        _evict(k)


def _evict(key: tuple) -> None:
    _CACHE.pop(key, None)
    _DEAD.discard(key)
    for ptr in _KEY_PTRS.pop(key, ()):
        entry = _WATCHED.get(ptr)
        if entry is not None:
            entry[1].discard(key)
            if not entry[1]:
                del _WATCHED[ptr]


def _layout(numels: list[int], device: torch.device) -> Layout:
    chunk, cap_t, cap_c = CHUNK, TABLE_TENSORS, TABLE_CHUNKS
    if chunk % BLOCK or BLOCK % 8:
        raise ValueError(f"CHUNK ({chunk}) must be a multiple of BLOCK ({BLOCK}), and BLOCK of 8")
    # segments of pieces: (tensor index, first chunk, number of chunks)
    pieces_segs: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    begin = [0]
    for i, n in enumerate(numels):
        nch = -(-n // chunk)
        begin.append(begin[-1] + nch)
        first = 0
        while first < nch:
            segs = pieces_segs[-1]
            if used == cap_c or len(segs) == cap_t:
                pieces_segs.append([])
                segs, used = pieces_segs[-1], 0
            take = min(nch - first, cap_c - used)
            segs.append((i, first, take))
            used += take
            first += take
    pieces_segs = [s for s in pieces_segs if s]
    host, shapes = [], []
    for segs in pieces_segs:  # host tensors: these int() reads are no device sync
        nums = torch.tensor([numels[s[0]] for s in segs], dtype=torch.int64)
        counts = torch.tensor([s[2] for s in segs], dtype=torch.int64)
        firsts = torch.tensor([s[1] for s in segs], dtype=torch.int64)
        local = torch.repeat_interleave(torch.arange(len(segs), dtype=torch.int64), counts)
        seg_start = torch.cumsum(counts, 0) - counts
        n_chunks = sum(s[2] for s in segs)
        within = torch.arange(n_chunks, dtype=torch.int64) - torch.repeat_interleave(seg_start, counts)
        starts = (within + torch.repeat_interleave(firsts, counts)) * chunk
        host.append(torch.cat([nums, local, starts]))
        shapes.append(([s[0] for s in segs], n_chunks))
    host.append(torch.tensor(begin, dtype=torch.int64))
    meta = upload(torch.cat(host), device)  # one copy per layout
    pieces, off, base = [], 0, 0
    for h, (idx, nc) in zip(host, shapes):
        pieces.append((idx, nc, base, meta[off : off + h.numel()]))
        off += h.numel()
        base += nc
    STATS["layouts"] += 1
    return Layout(pieces, begin[-1], meta[off:], meta)


def _build(lists: Sequence[Sequence[Tensor]], device: torch.device) -> Table:
    numels = [t.numel() for t in lists[0]]
    for lst in lists[1:]:
        for i, (t, n) in enumerate(zip(lst, numels)):
            if t.numel() != n:
                raise ValueError(f"parallel lists differ at tensor {i}: {n} and {t.numel()} elements")
    key = (device, CHUNK, BLOCK, TABLE_TENSORS, TABLE_CHUNKS, tuple(numels))
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = _layout(numels, device)
        while len(_LAYOUTS) > CACHE_SIZE:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    ptrs = [[t.data_ptr() for t in lst] for lst in lists]
    flat = [ptrs[li][i] for idx, _, _, _ in lay.pieces for li in range(len(lists)) for i in idx]
    addrs = upload(torch.tensor(flat, dtype=torch.int64), device)  # one copy per table
    STATS["uploads"] += 1
    pieces, off = [], 0
    for idx, nc, base, layout in lay.pieces:
        a = len(lists) * len(idx)
        pieces.append(Piece(addrs[off : off + a], layout, len(idx), nc, base))
        off += a
    aligned = all(p % 16 == 0 for row in ptrs for p in row)
    return Table(pieces, lay.n_chunks, lay.chunk_begin, aligned, len(numels))


def cached_tensors() -> list[Tensor]:
    """The device tensors the caches hold (address tables and layouts): for memory accounting."""
    out = [pc.addrs for tab in _CACHE.values() for pc in tab.pieces]
    return out + [lay.device_memory for lay in _LAYOUTS.values()]


def table(lists: Sequence[Sequence[Tensor]]) -> Table:
    """The (cached) table of parallel lists; rebuilt only when an address or a numel changes."""
    device = lists[0][0].device
    key = (
        device,
        CHUNK,
        BLOCK,
        TABLE_TENSORS,
        TABLE_CHUNKS,
        len(lists),
        *[i.ptrs + i.numels for i in map(info, lists)],
    )
    tab = _CACHE.get(key)
    if tab is None:
        for k in list(_DEAD):
            _evict(k)
        tab = _CACHE[key] = _build(lists, device)
        _watch(key, lists)
        while len(_CACHE) > CACHE_SIZE:
            _evict(next(iter(_CACHE)))
    else:
        _CACHE.move_to_end(key)
        if key in _DEAD:  # same addresses, new tensors: the table is right for them
            _watch(key, lists)
    return tab


# ---------------------------------------------------------------------------------------- support
def supports(name: str, lists: Sequence[Optional[Sequence[Tensor]]]) -> bool:
    """Whether the Triton kernels take one group of primitive ``name`` (its lists, None for an
    optional list not given): float32/bf16/fp16 lists -- bool/uint8 masks after the first --, each
    list of one dtype, one device, contiguous. The dispatcher sends the rest to the torch backend."""
    present = [lst for lst in lists if lst is not None]
    infos = [info(lst) for lst in present]  # kept by a Tensors list, else one scan
    if any(i.dtype is None or not i.contiguous for i in infos):
        return False
    dev = infos[0].device
    return (
        dev.type in ("cuda", "cpu")
        and all(i.device == dev for i in infos)
        and infos[0].dtype in NATIVE
        and all(i.dtype in NATIVE or i.dtype in MASKS for i in infos[1:])
    )


def tl_dtype(dtype: torch.dtype):
    """Triton element type of a list (bool masks are read as bytes)."""
    return tl.uint8 if dtype in MASKS else NATIVE[dtype]


def scalar(s, dummy: Tensor):
    """A per-step scalar as kernel arguments ``(ptr, value, IS_PTR)``: never a constexpr.

    A tensor is read inside the kernel (no host sync); a number is passed as a runtime fp32 arg.
    """
    if isinstance(s, Tensor):
        if s.numel() != 1:
            raise ValueError(f"a scalar tensor must have one element, got shape {tuple(s.shape)}")
        return s.detach().to(dummy.device).reshape(1), 0.0, True
    return dummy, float(s), False


def device_guard(device: torch.device):
    """Launch on the tensors' own GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- jit helpers
@triton.jit
def load_scalar(ptr, value, IS_PTR: tl.constexpr):
    """A per-step scalar in fp32: loaded from a device tensor, or the runtime value."""
    if IS_PTR:
        s = tl.load(ptr).to(tl.float32)
    else:
        s = value
    return s


@triton.jit
def chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK: tl.constexpr):
    """(local tensor index, first element, tensor numel) of this program's chunk."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.multiple_of(tl.load(chunk_start_ptr + c), BLOCK)
    n = tl.load(numels_ptr + t)
    return t, start, n


@triton.jit
def tensor_ptr(addrs_ptr, row, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``t`` of list ``row``; 16-byte aligned hint when every address is."""
    p = tl.load(addrs_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # the hint must sit on the pointer (not on the loaded integer) to reach the load
        # vectorizer: with it, full blocks compile to 16-byte ld/st.global.v4 (checked in the PTX)
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load(ptr, offs, mask, MASKED: tl.constexpr):
    """Full blocks load unmasked (vectorizable); the tail of a tensor is masked, zero-filled."""
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def round_bf16(x):
    """fp32 -> bf16, round to nearest even, NaN kept NaN (the rounding torch uses).

    Written out in integer ops so that the interpreter (which truncates in its own fp32 -> bf16
    cast) and the GPU give the same bits; a few integer ops are free in a memory-bound kernel.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store(ptr, offs, x, mask, MASKED: tl.constexpr):
    """Store ``x`` rounded once (to nearest even) to the element type of ``ptr``."""
    if ptr.dtype.element_ty == tl.bfloat16 and x.dtype == tl.float32:
        y = round_bf16(x)
    else:
        y = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, y, mask=mask)
    else:
        tl.store(ptr + offs, y)


def launch(kernel, tab: Table, *args, **meta) -> None:
    """Launch ``kernel`` once per piece of ``tab``: grid = the piece's chunks.

    The kernel's first five arguments are the piece's table
    (addrs, numels, chunk_tensor, chunk_start, n_tensors); ``args``/``meta`` follow.
    """
    device = tab.chunk_begin.device
    with device_guard(device):
        for pc in tab.pieces:
            kernel[(pc.n_chunks,)](
                pc.addrs,
                pc.numels,
                pc.chunk_tensor,
                pc.chunk_start,
                pc.n_tensors,
                *args,
                ALIGNED=tab.aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
                **meta,
            )
