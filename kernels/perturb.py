"""``perturb_``: backup <- w; w <- w + scale * T^2 * g (* mask), one pass over every tensor.

T = |w| + eta at the incoming w for ASAM (Kwon et al., ICML 2021), else 1 (SAM, Foret et al.,
ICLR 2021). Byte model per element (b = bytes per element): read 2b (w, g; +1 mask),
write 2b (w, backup; 1b without backup).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sharpfused.spec import NORM_EPS

from . import table as tb
from .table import chunk_of, load, load_scalar, store, tensor_ptr


@triton.jit
def _perturb_block(
    p_ptr,
    g_ptr,
    b_ptr,
    m_ptr,
    offs,
    mask,
    scale,
    eta,
    HAS_BACKUP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = load(p_ptr, offs, mask, MASKED)
    if HAS_BACKUP:
        store(b_ptr, offs, w, mask, MASKED)  # same dtype: the stored bits are w's bits
    wf = w.to(tl.float32)
    e = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if ADAPTIVE:
        t = tl.abs(wf) + eta
        e = (t * t) * e
    if HAS_MASK:
        e = e * load(m_ptr, offs, mask, MASKED).to(tl.float32)
    # fp32 math, one rounding; a zero scale keeps w (exactly representable) whatever g holds
    store(p_ptr, offs, tl.where(scale == 0, wf, wf + e * scale), mask, MASKED)


@triton.jit
def _perturb_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    scale_ptr,
    scale_val,
    eta_ptr,
    eta_val,
    nsq_ptr,
    P_DT: tl.constexpr,
    G_DT: tl.constexpr,
    B_DT: tl.constexpr,
    M_DT: tl.constexpr,
    SCALE_PTR: tl.constexpr,
    ETA_PTR: tl.constexpr,
    HAS_BACKUP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_NSQ: tl.constexpr,
    NORM_EPS: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """backup <- w; w <- w + scale*T^2*g*mask. Bytes/element: read w, g (+mask); write w (+backup).
    With HAS_NSQ the scale is ``scale * inv``, inv = 1/(sqrt(norm_sq) + eps), 0 when NaN."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
    g_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, G_DT, ALIGNED)
    b_ptr = p_ptr
    m_ptr = g_ptr
    if HAS_BACKUP:
        b_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, B_DT, ALIGNED)
        if HAS_MASK:
            m_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, M_DT, ALIGNED)
    elif HAS_MASK:
        m_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, M_DT, ALIGNED)
    scale = load_scalar(scale_ptr, scale_val, SCALE_PTR)
    if HAS_NSQ:  # each program recomputes it: one 4-byte load, as torch's three ops would round it
        inv = tl.div_rn(1.0, tl.sqrt_rn(tl.load(nsq_ptr).to(tl.float32)) + NORM_EPS)
        scale = tl.where(inv == inv, inv, 0.0) * scale
    eta = load_scalar(eta_ptr, eta_val, ETA_PTR)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _perturb_block(p_ptr, g_ptr, b_ptr, m_ptr, offs, mask, scale, eta, HAS_BACKUP, HAS_MASK, ADAPTIVE, False)
        elif base < n:
            _perturb_block(p_ptr, g_ptr, b_ptr, m_ptr, offs, mask, scale, eta, HAS_BACKUP, HAS_MASK, ADAPTIVE, True)


def perturb_(params, grads, backup, scale, eta=None, mask=None, norm_sq=None) -> None:
    """``backup <- w`` (skipped when ``backup`` is None), then ``w <- w + scale * T^2 * g [* mask]``.

    One launch for the group (the dispatcher routes what :func:`.table.supports` refuses).
    """
    p, g, b, m = params, grads, backup, mask
    lists = [p, g] + ([b] if b is not None else []) + ([m] if m is not None else [])
    tab = tb.table(lists)
    if tab.n_chunks == 0:
        return
    s_ptr, s_val, s_is = tb.scalar(scale, tab.chunk_begin)
    e_ptr, e_val, e_is = tb.scalar(0.0 if eta is None else eta, tab.chunk_begin)
    tb.launch(
        _perturb_kernel,
        tab,
        s_ptr,
        s_val,
        e_ptr,
        e_val,
        tab.chunk_begin if norm_sq is None else norm_sq,  # a dummy pointer when unused
        P_DT=tb.tl_dtype(p[0].dtype),
        G_DT=tb.tl_dtype(g[0].dtype),
        B_DT=tb.tl_dtype(b[0].dtype) if b is not None else tl.float32,
        M_DT=tb.tl_dtype(m[0].dtype) if m is not None else tl.float32,
        SCALE_PTR=s_is,
        ETA_PTR=e_is,
        HAS_BACKUP=b is not None,
        HAS_MASK=m is not None,
        ADAPTIVE=eta is not None,
        HAS_NSQ=norm_sq is not None,
        NORM_EPS=NORM_EPS,
    )
