"""``sq_norm``: sum_i sum((T_i * x_i)^2), T = |w| + eta (ASAM) or 1, deterministic, no atomics.

Stage 1 (one launch per table piece): each program sums its chunk into one fp32 partial.
Stage 2 (one launch): one program sums every partial in a fixed order into the total; with
``per_tensor`` one more launch, one program per tensor summing that tensor's partials. The total
has the same bits either way. Same input, same bits.
Byte model per element: read 1b (x), 2b with the ASAM weight w; the partials are 4 bytes per
CHUNK elements, negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import table as tb
from .table import chunk_of, load, load_scalar, tensor_ptr

#: partials summed per loop iteration of the per-tensor stage
REDUCE_BLOCK = 1024


@triton.jit
def _sq_norm_block(x_ptr, w_ptr, offs, mask, eta, WEIGHTED: tl.constexpr, MASKED: tl.constexpr):
    x = load(x_ptr, offs, mask, MASKED).to(tl.float32)
    if WEIGHTED:
        x = (tl.abs(load(w_ptr, offs, mask, MASKED).to(tl.float32)) + eta) * x
    return x * x  # masked lanes loaded 0: they add 0


@triton.jit
def _sq_norm_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    partials_ptr,
    eta_ptr,
    eta_val,
    X_DT: tl.constexpr,
    W_DT: tl.constexpr,
    ETA_PTR: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[chunk] = sum over the chunk of ((|w|+eta)*x)^2. Bytes/element: read x (+w)."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    x_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, X_DT, ALIGNED)
    w_ptr = x_ptr
    if WEIGHTED:
        w_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, W_DT, ALIGNED)
    eta = load_scalar(eta_ptr, eta_val, ETA_PTR)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            acc += _sq_norm_block(x_ptr, w_ptr, offs, mask, eta, WEIGHTED, False)
        elif base < n:
            acc += _sq_norm_block(x_ptr, w_ptr, offs, mask, eta, WEIGHTED, True)
    tl.store(partials_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _sq_norm_per_tensor_kernel(partials_ptr, chunk_begin_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[t] = sum of tensor t's chunk partials, in a fixed order. Reads 4 bytes per chunk."""
    t = tl.program_id(0)
    lo = tl.load(chunk_begin_ptr + t)
    hi = tl.load(chunk_begin_ptr + t + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # a while loop, not range(lo, hi, BLOCK): Triton 3.6's interpreter cannot take a loaded bound
    # in range() (int() of a 1-element array); the compiled loop is the same scalar-bound sweep
    j = lo
    while j < hi:
        offs = j + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < hi, other=0.0)
        j += BLOCK
    tl.store(out_ptr + t, tl.sum(acc, axis=0))


@triton.jit
def _sq_norm_total_kernel(partials_ptr, n, out_ptr, BLOCK: tl.constexpr):
    """out = sum of the n partials, in a fixed order (one program). Reads 4 bytes per chunk."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    j = 0  # a while loop: Triton 3.6's interpreter takes no runtime bound in range() (see below)
    while j < n:
        offs = j + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < n, other=0.0)
        j += BLOCK
    tl.store(out_ptr, tl.sum(acc, axis=0))


def _sq_norms(x, w, eta, per_tensor: bool):
    """Stage 1, then stage 2: the 0-d fp32 total (and the per-tensor squared norms, 1-d)."""
    tab = tb.table([x] if w is None else [x, w])
    device = x[0].device
    partials = torch.empty(max(tab.n_chunks, 1), dtype=torch.float32, device=device)
    e_ptr, e_val, e_is = tb.scalar(eta, tab.chunk_begin)
    with tb.device_guard(device):
        for pc in tab.pieces:
            _sq_norm_kernel[(pc.n_chunks,)](
                pc.addrs,
                pc.numels,
                pc.chunk_tensor,
                pc.chunk_start,
                pc.n_tensors,
                partials[pc.chunk_base :],
                e_ptr,
                e_val,
                X_DT=tb.tl_dtype(x[0].dtype),
                W_DT=tb.tl_dtype(w[0].dtype) if w is not None else tl.float32,
                ETA_PTR=e_is,
                WEIGHTED=w is not None,
                ALIGNED=tab.aligned,
                CHUNK=tb.CHUNK,
                BLOCK=tb.BLOCK,
                num_warps=tb.NUM_WARPS,
            )
        total = torch.empty((), dtype=torch.float32, device=device)
        _sq_norm_total_kernel[(1,)](partials, tab.n_chunks, total, BLOCK=REDUCE_BLOCK, num_warps=4)
        if not per_tensor:
            return total
        per = torch.empty(len(x), dtype=torch.float32, device=device)
        _sq_norm_per_tensor_kernel[(len(x),)](partials, tab.chunk_begin, per, BLOCK=REDUCE_BLOCK, num_warps=4)
    return total, per


def sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    """Squared L2 norm ``sum_i sum((T_i * x_i)**2)`` with ``T_i = |w_i| + eta`` (ASAM) or 1.

    Returns a 0-d fp32 tensor; with ``per_tensor=True`` also the 1-d per-tensor squared norms.
    """
    return _sq_norms(xs, weights, eta, per_tensor)
