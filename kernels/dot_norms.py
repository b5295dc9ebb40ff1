"""``dot_norms``: (<a,b>, |a|^2, |b|^2) over every tensor in one pass, deterministic, no atomics.

Stage 1: each program writes its chunk's three fp32 partial sums into a ``[3, n_chunks]`` tensor;
stage 2: a torch sum over that fixed-size tensor. Byte model per element: read 2b (a, b).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import table as tb
from .table import chunk_of, load, tensor_ptr


@triton.jit
def _dot_norms_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    partials_ptr,
    stride,
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[:, chunk] = (sum a*b, sum a*a, sum b*b) over the chunk. Bytes/element: read a, b."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    a_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, A_DT, ALIGNED)
    b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
    ab = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            a = load(a_ptr, offs, mask, False).to(tl.float32)
            b = load(b_ptr, offs, mask, False).to(tl.float32)
            ab += a * b
            aa += a * a
            bb += b * b
        elif base < n:
            a = load(a_ptr, offs, mask, True).to(tl.float32)
            b = load(b_ptr, offs, mask, True).to(tl.float32)
            ab += a * b
            aa += a * a
            bb += b * b
    c = tl.program_id(0)
    tl.store(partials_ptr + c, tl.sum(ab, axis=0))
    tl.store(partials_ptr + stride + c, tl.sum(aa, axis=0))
    tl.store(partials_ptr + 2 * stride + c, tl.sum(bb, axis=0))


def _group(x, y) -> torch.Tensor:
    tab = tb.table([x, y])
    partials = torch.zeros(3, max(tab.n_chunks, 1), dtype=torch.float32, device=x[0].device)
    stride = partials.shape[1]
    with tb.device_guard(x[0].device):
        for pc in tab.pieces:
            _dot_norms_kernel[(pc.n_chunks,)](
                pc.addrs,
                pc.numels,
                pc.chunk_tensor,
                pc.chunk_start,
                pc.n_tensors,
                partials[:, pc.chunk_base :],
                stride,
                A_DT=tb.tl_dtype(x[0].dtype),
                B_DT=tb.tl_dtype(y[0].dtype),
                ALIGNED=tab.aligned,
                CHUNK=tb.CHUNK,
                BLOCK=tb.BLOCK,
                num_warps=tb.NUM_WARPS,
            )
    return partials.sum(dim=1)


def dot_norms(a, b) -> torch.Tensor:
    """``(<a,b>, |a|^2, |b|^2)`` over all tensors, as one 1-d opmath tensor of 3 entries.

    fp32, for one (device, dtype) group: the dispatcher joins several groups' results and sends
    float64 groups to the torch backend.
    """
    return _group(a, b)
