"""``combine_``: g <- c1*g + c2*saved (GSAM, XSAM, LookSAM and BSAM reduce to it).

A coefficient equal to zero drops its term entirely, so an inf/NaN behind it never reaches the
output (0*inf would be NaN); the test is in the kernel, on runtime (possibly device) scalars, so
no host sync. fp32 math, one rounding. Byte model per element: read 2b (g, saved), write 1b (g).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table as tb
from .table import chunk_of, load, load_scalar, store, tensor_ptr


@triton.jit
def _combine_block(g_ptr, s_ptr, offs, mask, c1, c2, MASKED: tl.constexpr):
    g = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    s = load(s_ptr, offs, mask, MASKED).to(tl.float32)
    # where(c1 == 0, 0, c1*g) + where(c2 == 0, 0, c2*s), written so that c1*g + t2 may still
    # contract to one fma; "t2 + 0.0" gives the +0 that "0 + t2" would (t2 == -0)
    t2 = tl.where(c2 == 0, 0.0, c2 * s)
    store(g_ptr, offs, tl.where(c1 == 0, t2 + 0.0, c1 * g + t2), mask, MASKED)


@triton.jit
def _combine_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    c1_ptr,
    c1_val,
    c2_ptr,
    c2_val,
    G_DT: tl.constexpr,
    S_DT: tl.constexpr,
    C1_PTR: tl.constexpr,
    C2_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """g <- c1*g + c2*saved, a zero coefficient dropping its term. Bytes/element: read g, saved; write g."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    g_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, G_DT, ALIGNED)
    s_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, S_DT, ALIGNED)
    c1 = load_scalar(c1_ptr, c1_val, C1_PTR)
    c2 = load_scalar(c2_ptr, c2_val, C2_PTR)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _combine_block(g_ptr, s_ptr, offs, mask, c1, c2, False)
        elif base < n:
            _combine_block(g_ptr, s_ptr, offs, mask, c1, c2, True)


def combine_(g, saved, c1, c2) -> None:
    """``g <- c1 * g + c2 * saved`` (c1, c2 numbers or 0-d device tensors); a coefficient equal to
    zero drops its term (inf/NaN behind it never reaches g). One launch for the group."""
    x, s = g, saved
    tab = tb.table([x, s])
    if tab.n_chunks == 0:
        return
    p1, v1, i1 = tb.scalar(c1, tab.chunk_begin)
    p2, v2, i2 = tb.scalar(c2, tab.chunk_begin)
    tb.launch(
        _combine_kernel,
        tab,
        p1,
        v1,
        p2,
        v2,
        G_DT=tb.tl_dtype(x[0].dtype),
        S_DT=tb.tl_dtype(s[0].dtype),
        C1_PTR=i1,
        C2_PTR=i2,
    )
