"""Restore fused with the base optimizer's update: ``w <- backup - update(g)``, states in place.

``restore_sgd_`` is torch.optim.SGD's update (momentum, dampening, nesterov, weight decay) and
``restore_adamw_`` torch.optim.AdamW's (Loshchilov & Hutter, ICLR 2019), both evaluated at the
restored weights w0 = backup, so restore and base step are one pass. fp32 math; every output
(w and each state) is rounded once. Byte models per element (b = bytes per element):

* SGD: read 2b (backup, g) + 1b (momentum buffer, after the first momentum step);
  write 1b (w) + 1b (momentum buffer, with momentum).
* AdamW: read 4b (backup, g, exp_avg, exp_avg_sq); write 3b (w, exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from sharpfused.backends import torch_ops

from . import table as tb
from .table import chunk_of, load, load_scalar, store, tensor_ptr


# ------------------------------------------------------------------------------------------- SGD
@triton.jit
def _restore_sgd_block(
    p_ptr,
    b_ptr,
    g_ptr,
    buf_ptr,
    offs,
    mask,
    lr,
    momentum,
    one_minus_dampening,
    weight_decay,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INIT: tl.constexpr,
    MASKED: tl.constexpr,
):
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    d = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_WD:
        d = d + weight_decay * w0
    if HAS_MOMENTUM:
        if INIT:
            buf = d
        else:
            buf = momentum * load(buf_ptr, offs, mask, MASKED).to(tl.float32) + one_minus_dampening * d
        store(buf_ptr, offs, buf, mask, MASKED)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    store(p_ptr, offs, w0 - lr * d, mask, MASKED)


@triton.jit
def _restore_sgd_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    lr_ptr,
    lr_val,
    momentum,
    one_minus_dampening,
    weight_decay,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    BUF_DT: tl.constexpr,
    LR_PTR: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INIT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """w <- w0 - lr*SGD(g) at w0 = backup. Bytes/element: read backup, g (+buf); write w (+buf)."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
    b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
    g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
    buf_ptr = p_ptr
    if HAS_MOMENTUM:
        buf_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, BUF_DT, ALIGNED)
    lr = load_scalar(lr_ptr, lr_val, LR_PTR)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _restore_sgd_block(
                p_ptr, b_ptr, g_ptr, buf_ptr, offs, mask, lr, momentum, one_minus_dampening, weight_decay,
                HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, False,
            )  # fmt: skip
        elif base < n:
            _restore_sgd_block(
                p_ptr, b_ptr, g_ptr, buf_ptr, offs, mask, lr, momentum, one_minus_dampening, weight_decay,
                HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, True,
            )  # fmt: skip


def restore_sgd_(
    params, backup, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, init_momentum
) -> None:
    """Restore fused with torch.optim.SGD's update, evaluated at the restored weights w0:

    d = g + wd*w0;  buf = d (first step) or momentum*buf + (1-dampening)*d;
    d = d + momentum*buf (nesterov) or buf;  w = w0 - lr*d.
    One launch per (device, dtype) group; float64 groups go to torch_ops.
    """
    has_momentum = bool(momentum)
    for native, _, (p, b, g, buf) in tb.groups(params, backup, grads, momentum_buffers if has_momentum else None):
        if not native:
            torch_ops.restore_sgd_(
                p, b, g, buf, lr, momentum, dampening, weight_decay, nesterov, init_momentum
            )  # fmt: skip
            continue
        tab = tb.table([p, b, g] + ([buf] if has_momentum else []))
        if tab.n_chunks == 0:
            continue
        lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
        tb.launch(
            _restore_sgd_kernel,
            tab,
            lr_p,
            lr_v,
            float(momentum),
            1.0 - float(dampening),
            float(weight_decay),
            P_DT=tb.tl_dtype(p[0].dtype),
            B_DT=tb.tl_dtype(b[0].dtype),
            G_DT=tb.tl_dtype(g[0].dtype),
            BUF_DT=tb.tl_dtype(buf[0].dtype) if has_momentum else tl.float32,
            LR_PTR=lr_is,
            HAS_WD=bool(weight_decay),
            HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov),
            INIT=bool(init_momentum),
        )


# ----------------------------------------------------------------------------------------- AdamW
@triton.jit
def _restore_adamw_block(
    p_ptr,
    b_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    offs,
    mask,
    decay,
    neg_step,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bc2_sqrt,
    MASKED: tl.constexpr,
):
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    g = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    m = load(m_ptr, offs, mask, MASKED).to(tl.float32)
    v = load(v_ptr, offs, mask, MASKED).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)  # lerp(m, g, 1 - beta1), as torch.optim.AdamW
    v = beta2 * v + one_minus_beta2 * (g * g)
    # correctly rounded sqrt and division (Triton's defaults are approximate on GPU): fp32 parity
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    store(m_ptr, offs, m, mask, MASKED)
    store(v_ptr, offs, v, mask, MASKED)
    store(p_ptr, offs, decay * w0 + neg_step * tl.div_rn(m, denom), mask, MASKED)


@triton.jit
def _restore_adamw_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    lr_ptr,
    lr_val,
    weight_decay,
    inv_bc1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bc2_sqrt,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    M_DT: tl.constexpr,
    V_DT: tl.constexpr,
    LR_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW at w0 = backup. Bytes/element: read backup, g, exp_avg, exp_avg_sq; write w, exp_avg, exp_avg_sq."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
    b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
    g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
    m_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, M_DT, ALIGNED)
    v_ptr = tensor_ptr(addrs_ptr, 4, n_tensors, t, V_DT, ALIGNED)
    lr = load_scalar(lr_ptr, lr_val, LR_PTR)
    decay = 1.0 - lr * weight_decay
    neg_step = -(lr * inv_bc1)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _restore_adamw_block(
                p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, neg_step,
                one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, False,
            )  # fmt: skip
        elif base < n:
            _restore_adamw_block(
                p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, neg_step,
                one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, True,
            )  # fmt: skip


def restore_adamw_(params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """Restore fused with torch.optim.AdamW's update (``step`` already incremented):

    w0 = backup; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    w = w0*(1 - lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    The bias corrections are computed on the host in double (``step`` is a host int).
    One launch per (device, dtype) group; float64 groups go to torch_ops.
    """
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for native, _, (p, b, g, m, v) in tb.groups(params, backup, grads, exp_avgs, exp_avg_sqs):
        if not native:
            torch_ops.restore_adamw_(p, b, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
            continue
        tab = tb.table([p, b, g, m, v])
        if tab.n_chunks == 0:
            continue
        lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
        tb.launch(
            _restore_adamw_kernel,
            tab,
            lr_p,
            lr_v,
            float(weight_decay),
            1.0 / bc1,
            1.0 - float(beta1),
            float(beta2),
            1.0 - float(beta2),
            float(eps),
            bc2_sqrt,
            P_DT=tb.tl_dtype(p[0].dtype),
            B_DT=tb.tl_dtype(b[0].dtype),
            G_DT=tb.tl_dtype(g[0].dtype),
            M_DT=tb.tl_dtype(m[0].dtype),
            V_DT=tb.tl_dtype(v[0].dtype),
            LR_PTR=lr_is,
        )
