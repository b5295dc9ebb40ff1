"""``restore_``: w <- backup, bit-exact. Byte model per element: read 1b (backup), write 1b (w).

When both lists have one dtype the copy moves the raw bits (same-width integers): no float
conversion can touch a NaN payload or a signed zero.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table as tb
from .table import chunk_of, load, store, tensor_ptr


@triton.jit
def _copy_block(dst_ptr, src_ptr, zero_ptr, offs, mask, ZERO: tl.constexpr, MASKED: tl.constexpr):
    """dst <- src: raw bits when both are the same integer type (bit-exact), else rounded once;
    with ZERO, zeros into ``zero_ptr`` too."""
    x = load(src_ptr, offs, mask, MASKED)
    if x.dtype != dst_ptr.dtype.element_ty:
        x = x.to(tl.float32)
    store(dst_ptr, offs, x, mask, MASKED)
    if ZERO:
        store(zero_ptr, offs, tl.zeros(x.shape, tl.float32), mask, MASKED)


@triton.jit
def copy_chunk(dst_ptr, src_ptr, zero_ptr, start, n, ZERO: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk of ``restore_``'s copy (full blocks unmasked); also the skipped fused step's."""
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _copy_block(dst_ptr, src_ptr, zero_ptr, offs, mask, ZERO, False)
        elif base < n:
            _copy_block(dst_ptr, src_ptr, zero_ptr, offs, mask, ZERO, True)


@triton.jit
def _restore_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """w <- backup. Bytes/element: read backup, write w."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
    b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
    copy_chunk(p_ptr, b_ptr, p_ptr, start, n, False, CHUNK, BLOCK)


def restore_(params, backup) -> None:
    """``w <- backup``, bit-exact. One launch for the group."""
    p, b = params, backup
    tab = tb.table([p, b])
    if tab.n_chunks == 0:
        return
    same = p[0].dtype == b[0].dtype
    tb.launch(
        _restore_kernel,
        tab,
        P_DT=tb.BITS[p[0].dtype] if same else tb.tl_dtype(p[0].dtype),
        B_DT=tb.BITS[b[0].dtype] if same else tb.tl_dtype(b[0].dtype),
    )
