"""Restore fused with the base optimizer's update: ``w <- backup - update(g)``, states in place.

``restore_sgd_`` is torch.optim.SGD's update (momentum, dampening, nesterov, weight decay),
``restore_adamw_`` torch.optim.AdamW's (Loshchilov & Hutter, ICLR 2019) or, with
``decoupled=False``, torch.optim.Adam's (L2 weight decay: a constexpr switch of the same kernel),
and ``restore_rmsprop_`` torch.optim.RMSprop's (not centered), all evaluated at the restored
weights w0 = backup, so restore and base step are one pass. fp32 math; every output
(w and each state) is rounded once. The gradient is first multiplied by ``grad_coef`` (GradScaler
unscale, clipping) when given. ``found_inf`` (a 0-d device tensor) is read once per program: when
nonzero the program only copies the backup's bits into w (a skipped step, decided on the device,
no host sync), never reads the gradient and leaves every state alone -- except that an SGD
``init_momentum`` step writes zeros into the momentum buffer. Byte models per element
(b = bytes per element):

* SGD: read 2b (backup, g) + 1b (momentum buffer, after the first momentum step);
  write 1b (w) + 1b (momentum buffer, with momentum).
* AdamW / Adam: read 4b (backup, g, exp_avg, exp_avg_sq); write 3b (w, exp_avg, exp_avg_sq).
* RMSprop: read 3b (backup, g, square_avg) + 1b (momentum buffer, with momentum); write 2b
  (w, square_avg) + 1b (momentum buffer).
* A skipped step (either): read 1b (backup); write 1b (w) (+1b zeros into the SGD momentum
  buffer on an ``init_momentum`` step).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from . import table as tb
from .table import chunk_of, load, load_scalar, store, tensor_ptr


# ------------------------------------------------------------------------------------------ shared
@triton.jit
def _copy_block(dst_ptr, src_ptr, offs, mask, MASKED: tl.constexpr):
    """dst <- src: raw bits when both are the same integer type (bit-exact), else rounded once."""
    x = load(src_ptr, offs, mask, MASKED)
    if x.dtype != dst_ptr.dtype.element_ty:
        x = x.to(tl.float32)
    store(dst_ptr, offs, x, mask, MASKED)


@triton.jit
def _skipped_step(
    addrs_ptr, n_tensors, t, start, n, buf_ptr,
    PB_DT: tl.constexpr, BB_DT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, INIT: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """w <- backup bit for bit (lists 0 and 1 of the table); zeros into ``buf_ptr`` on an INIT
    momentum step. Bytes/element: read backup, write w (+ buf)."""
    pb_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, PB_DT, ALIGNED)
    bb_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, BB_DT, ALIGNED)
    for i in range(0, CHUNK, BLOCK):
        base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if base + BLOCK <= n:
            _copy_block(pb_ptr, bb_ptr, offs, mask, False)
            if HAS_MOMENTUM:
                if INIT:
                    store(buf_ptr, offs, tl.zeros([BLOCK], tl.float32), mask, False)
        elif base < n:
            _copy_block(pb_ptr, bb_ptr, offs, mask, True)
            if HAS_MOMENTUM:
                if INIT:
                    store(buf_ptr, offs, tl.zeros([BLOCK], tl.float32), mask, True)


def _bits_dtypes(p: torch.dtype, b: torch.dtype):
    """(PB_DT, BB_DT) for the skipped-step copy: same-width integers when the dtypes agree."""
    if p == b:
        return tb.BITS[p], tb.BITS[b]
    return tb.tl_dtype(p), tb.tl_dtype(b)


def _found_inf(found_inf, dummy: torch.Tensor):
    """``(ptr, HAS_FOUND_INF)``: the 0-d flag as a 1-element device tensor (bool read as bytes)."""
    if found_inf is None:
        return dummy, False
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise ValueError("found_inf must be None or a one-element tensor")
    f = found_inf.detach().to(dummy.device).reshape(1)
    if f.dtype == torch.bool:
        f = f.view(torch.uint8)
    return f, True


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
    coef,
    HAS_COEF: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INIT: tl.constexpr,
    MASKED: tl.constexpr,
):
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    d = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_COEF:
        d = d * coef
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
    coef_ptr,
    coef_val,
    found_ptr,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    BUF_DT: tl.constexpr,
    PB_DT: tl.constexpr,
    BB_DT: tl.constexpr,
    LR_PTR: tl.constexpr,
    COEF_PTR: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INIT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """w <- w0 - lr*SGD(coef*g) at w0 = backup. Bytes/element: read backup, g (+buf); write w (+buf).
    Skipped step (found_inf != 0): read backup, write w (+zeros into buf on an INIT step)."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    buf_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
    if HAS_MOMENTUM:
        buf_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, BUF_DT, ALIGNED)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_ptr) != 0  # once per program, any dtype; nonzero (NaN too) skips
    if skip:
        _skipped_step(
            addrs_ptr, n_tensors, t, start, n, buf_ptr, PB_DT, BB_DT, HAS_MOMENTUM, INIT, ALIGNED, CHUNK, BLOCK
        )
    else:
        p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
        b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
        g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
        lr = load_scalar(lr_ptr, lr_val, LR_PTR)
        coef = 1.0
        if HAS_COEF:
            coef = load_scalar(coef_ptr, coef_val, COEF_PTR)
        for i in range(0, CHUNK, BLOCK):
            base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            if base + BLOCK <= n:
                _restore_sgd_block(
                    p_ptr, b_ptr, g_ptr, buf_ptr, offs, mask, lr, momentum, one_minus_dampening, weight_decay,
                    coef, HAS_COEF, HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, False,
                )  # fmt: skip
            elif base < n:
                _restore_sgd_block(
                    p_ptr, b_ptr, g_ptr, buf_ptr, offs, mask, lr, momentum, one_minus_dampening, weight_decay,
                    coef, HAS_COEF, HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, True,
                )  # fmt: skip


def restore_sgd_(
    params, backup, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, init_momentum,
    grad_coef=None, found_inf=None,
) -> None:  # fmt: skip
    """Restore fused with torch.optim.SGD's update, evaluated at the restored weights w0:

    g' = grad_coef*g;  d = g' + wd*w0;  buf = d (first step) or momentum*buf + (1-dampening)*d;
    d = d + momentum*buf (nesterov) or buf;  w = w0 - lr*d.
    ``found_inf`` nonzero (0-d device tensor): w = w0 bit-exactly, buffers kept (zeros on an
    ``init_momentum`` step), decided in the kernel. One launch per (device, dtype) group either
    way (one group per call: the dispatcher sends what supports() refuses to the torch backend).
    """
    has_momentum = bool(momentum)
    p, b, g, buf = params, backup, grads, momentum_buffers if has_momentum else None
    tab = tb.table([p, b, g] + ([buf] if has_momentum else []))
    if tab.n_chunks == 0:
        return
    lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
    coef_p, coef_v, coef_is = tb.scalar(1.0 if grad_coef is None else grad_coef, tab.chunk_begin)
    found_p, has_found = _found_inf(found_inf, tab.chunk_begin)
    pb_dt, bb_dt = _bits_dtypes(p[0].dtype, b[0].dtype)
    tb.launch(
        _restore_sgd_kernel,
        tab,
        lr_p,
        lr_v,
        float(momentum),
        1.0 - float(dampening),
        float(weight_decay),
        coef_p,
        coef_v,
        found_p,
        P_DT=tb.tl_dtype(p[0].dtype),
        B_DT=tb.tl_dtype(b[0].dtype),
        G_DT=tb.tl_dtype(g[0].dtype),
        BUF_DT=tb.tl_dtype(buf[0].dtype) if has_momentum else tl.float32,
        PB_DT=pb_dt,
        BB_DT=bb_dt,
        LR_PTR=lr_is,
        COEF_PTR=coef_is,
        HAS_COEF=grad_coef is not None,
        HAS_FOUND_INF=has_found,
        HAS_WD=bool(weight_decay),
        HAS_MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov),
        INIT=bool(init_momentum),
    )


# ----------------------------------------------------------------------------------------- AdamW
@triton.jit
def _bias_corrections(step_ptr, beta1_hi, beta1_lo, beta2_hi, beta2_lo):
    """``(1/(1 - beta1^t), sqrt(1 - beta2^t))`` in fp32 from the step count ``t`` on the device.

    fp64 throughout (beta = hi + lo, two fp32 halves, to ~2^-48), beta^t by squaring -- exact
    multiplications only, no pow/exp whose GPU accuracy varies -- so the values round to the same
    fp32 as the host's double-precision ones (up to a rare last-bit tie).
    """
    k = tl.load(step_ptr).to(tl.int64)  # the step count is integral
    b1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
    b2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
    pw1 = tl.full([], 1.0, tl.float64)
    pw2 = tl.full([], 1.0, tl.float64)
    while k > 0:
        odd = (k & 1) != 0
        pw1 = tl.where(odd, pw1 * b1, pw1)
        pw2 = tl.where(odd, pw2 * b2, pw2)
        b1 = b1 * b1
        b2 = b2 * b2
        k = k >> 1
    inv_bc1 = (1.0 / (1.0 - pw1)).to(tl.float32)  # f64 division is IEEE (div.rn.f64) on the GPU
    bc2_sqrt = tl.sqrt(1.0 - pw2).to(tl.float32)  # f64 sqrt is sqrt.rn.f64
    return inv_bc1, bc2_sqrt


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
    coef,
    weight_decay,
    HAS_COEF: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MASKED: tl.constexpr,
):
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    g = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_COEF:
        g = g * coef
    if not DECOUPLED:  # torch.optim.Adam's L2 decay: g' = g + wd*w0
        g = g + weight_decay * w0
    m = load(m_ptr, offs, mask, MASKED).to(tl.float32)
    v = load(v_ptr, offs, mask, MASKED).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)  # lerp(m, g, 1 - beta1), as torch.optim.AdamW
    v = beta2 * v + one_minus_beta2 * (g * g)
    # correctly rounded sqrt and division (Triton's defaults are approximate on GPU): fp32 parity
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    store(m_ptr, offs, m, mask, MASKED)
    store(v_ptr, offs, v, mask, MASKED)
    if DECOUPLED:
        w = decay * w0 + neg_step * tl.div_rn(m, denom)
    else:
        w = w0 + neg_step * tl.div_rn(m, denom)
    store(p_ptr, offs, w, mask, MASKED)


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
    step_ptr,
    beta1_hi,
    beta1_lo,
    beta2_hi,
    beta2_lo,
    coef_ptr,
    coef_val,
    found_ptr,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    M_DT: tl.constexpr,
    V_DT: tl.constexpr,
    PB_DT: tl.constexpr,
    BB_DT: tl.constexpr,
    LR_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr,
    COEF_PTR: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    DECOUPLED: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """AdamW(coef*g) (DECOUPLED) or Adam with L2 decay at w0 = backup. Bytes/element: read backup, g, exp_avg, exp_avg_sq; write w,
    exp_avg, exp_avg_sq. Skipped step (found_inf != 0): read backup, write w."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_ptr) != 0  # once per program, any dtype; nonzero (NaN too) skips
    if skip:
        _skipped_step(addrs_ptr, n_tensors, t, start, n, lr_ptr, PB_DT, BB_DT, False, False, ALIGNED, CHUNK, BLOCK)
    else:
        p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
        b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
        g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
        m_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, M_DT, ALIGNED)
        v_ptr = tensor_ptr(addrs_ptr, 4, n_tensors, t, V_DT, ALIGNED)
        lr = load_scalar(lr_ptr, lr_val, LR_PTR)
        if STEP_PTR:
            inv_bc1, bc2_sqrt = _bias_corrections(step_ptr, beta1_hi, beta1_lo, beta2_hi, beta2_lo)
        coef = 1.0
        if HAS_COEF:
            coef = load_scalar(coef_ptr, coef_val, COEF_PTR)
        decay = 1.0 - lr * weight_decay
        neg_step = -(lr * inv_bc1)
        for i in range(0, CHUNK, BLOCK):
            base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            if base + BLOCK <= n:
                _restore_adamw_block(
                    p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, neg_step,
                    one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, coef, weight_decay, HAS_COEF, DECOUPLED,
                    False,
                )  # fmt: skip
            elif base < n:
                _restore_adamw_block(
                    p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, neg_step,
                    one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, coef, weight_decay, HAS_COEF, DECOUPLED,
                    True,
                )  # fmt: skip


def _fp32_halves(x: float) -> tuple[float, float]:
    """``x = hi + lo`` with hi the nearest fp32 and lo the remainder (rounded to fp32 at launch)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def restore_adamw_(
    params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
    grad_coef=None, found_inf=None, decoupled=True,
) -> None:  # fmt: skip
    """Restore fused with torch.optim.AdamW's update, or torch.optim.Adam's (L2 weight decay)
    with ``decoupled=False`` (``step`` already counts this step):

    g' = grad_coef*g (+ wd*w0 when not decoupled); w0 = backup; m = b1*m + (1-b1)*g';
    v = b2*v + (1-b2)*g'^2; w = w0*(1 - lr*wd when decoupled) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    The bias corrections are computed on the host in double for an int ``step``, and in the
    kernel (fp64, no host sync) for a 0-d device tensor. ``found_inf`` nonzero: w = w0
    bit-exactly, m and v untouched, decided in the kernel. One launch per (device, dtype) group;
    one group per call (the dispatcher sends what supports() refuses to the torch backend).
    """
    step_is = isinstance(step, torch.Tensor)
    if step_is:
        inv_bc1, bc2_sqrt = 1.0, 1.0  # unused: the kernel computes them from the device step
        if step.numel() != 1:
            raise ValueError(f"step must be an int or a one-element tensor, got shape {tuple(step.shape)}")
    else:
        inv_bc1 = 1.0 / (1.0 - beta1**step)
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
    b1_hi, b1_lo = _fp32_halves(float(beta1))
    b2_hi, b2_lo = _fp32_halves(float(beta2))
    p, b, g, m, v = params, backup, grads, exp_avgs, exp_avg_sqs
    tab = tb.table([p, b, g, m, v])
    if tab.n_chunks == 0:
        return
    lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
    step_p = step.detach().to(tab.chunk_begin.device).reshape(1) if step_is else tab.chunk_begin
    coef_p, coef_v, coef_is = tb.scalar(1.0 if grad_coef is None else grad_coef, tab.chunk_begin)
    found_p, has_found = _found_inf(found_inf, tab.chunk_begin)
    pb_dt, bb_dt = _bits_dtypes(p[0].dtype, b[0].dtype)
    tb.launch(
        _restore_adamw_kernel,
        tab,
        lr_p,
        lr_v,
        float(weight_decay),
        inv_bc1,
        1.0 - float(beta1),
        float(beta2),
        1.0 - float(beta2),
        float(eps),
        bc2_sqrt,
        step_p,
        b1_hi,
        b1_lo,
        b2_hi,
        b2_lo,
        coef_p,
        coef_v,
        found_p,
        P_DT=tb.tl_dtype(p[0].dtype),
        B_DT=tb.tl_dtype(b[0].dtype),
        G_DT=tb.tl_dtype(g[0].dtype),
        M_DT=tb.tl_dtype(m[0].dtype),
        V_DT=tb.tl_dtype(v[0].dtype),
        PB_DT=pb_dt,
        BB_DT=bb_dt,
        LR_PTR=lr_is,
        STEP_PTR=step_is,
        COEF_PTR=coef_is,
        HAS_COEF=grad_coef is not None,
        HAS_FOUND_INF=has_found,
        DECOUPLED=bool(decoupled) or not weight_decay,  # no decay: the two rules are one
    )


# --------------------------------------------------------------------------------------- RMSprop
@triton.jit
def _restore_rmsprop_block(
    p_ptr,
    b_ptr,
    g_ptr,
    v_ptr,
    buf_ptr,
    offs,
    mask,
    neg_lr,
    alpha,
    one_minus_alpha,
    eps,
    weight_decay,
    momentum,
    coef,
    HAS_COEF: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    MASKED: tl.constexpr,
):
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    g = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_COEF:
        g = g * coef
    if HAS_WD:
        g = g + weight_decay * w0
    v = load(v_ptr, offs, mask, MASKED).to(tl.float32)
    v = v * alpha + (one_minus_alpha * g) * g  # torch's mul_(alpha).addcmul_(g, g, value=1-alpha)
    store(v_ptr, offs, v, mask, MASKED)
    # correctly rounded sqrt and division (Triton's defaults are approximate on GPU): fp32 parity
    d = tl.div_rn(g, tl.sqrt_rn(v) + eps)
    if HAS_MOMENTUM:
        d = momentum * load(buf_ptr, offs, mask, MASKED).to(tl.float32) + d
        store(buf_ptr, offs, d, mask, MASKED)
    store(p_ptr, offs, w0 + neg_lr * d, mask, MASKED)


@triton.jit
def _restore_rmsprop_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    lr_ptr,
    lr_val,
    alpha,
    one_minus_alpha,
    eps,
    weight_decay,
    momentum,
    coef_ptr,
    coef_val,
    found_ptr,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    V_DT: tl.constexpr,
    BUF_DT: tl.constexpr,
    PB_DT: tl.constexpr,
    BB_DT: tl.constexpr,
    LR_PTR: tl.constexpr,
    COEF_PTR: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """RMSprop(coef*g) at w0 = backup. Bytes/element: read backup, g, square_avg (+buf); write w,
    square_avg (+buf). Skipped step (found_inf != 0): read backup, write w."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_ptr) != 0  # once per program, any dtype; nonzero (NaN too) skips
    if skip:
        _skipped_step(addrs_ptr, n_tensors, t, start, n, lr_ptr, PB_DT, BB_DT, False, False, ALIGNED, CHUNK, BLOCK)
    else:
        p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
        b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
        g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
        v_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, V_DT, ALIGNED)
        buf_ptr = v_ptr
        if HAS_MOMENTUM:
            buf_ptr = tensor_ptr(addrs_ptr, 4, n_tensors, t, BUF_DT, ALIGNED)
        neg_lr = -load_scalar(lr_ptr, lr_val, LR_PTR)
        coef = 1.0
        if HAS_COEF:
            coef = load_scalar(coef_ptr, coef_val, COEF_PTR)
        for i in range(0, CHUNK, BLOCK):
            base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            if base + BLOCK <= n:
                _restore_rmsprop_block(
                    p_ptr, b_ptr, g_ptr, v_ptr, buf_ptr, offs, mask, neg_lr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, coef, HAS_COEF, HAS_WD, HAS_MOMENTUM, False,
                )  # fmt: skip
            elif base < n:
                _restore_rmsprop_block(
                    p_ptr, b_ptr, g_ptr, v_ptr, buf_ptr, offs, mask, neg_lr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, coef, HAS_COEF, HAS_WD, HAS_MOMENTUM, True,
                )  # fmt: skip


def restore_rmsprop_(
    params, backup, grads, square_avgs, momentum_buffers, lr, alpha, eps, weight_decay, momentum,
    grad_coef=None, found_inf=None,
) -> None:  # fmt: skip
    """Restore fused with torch.optim.RMSprop's update (not centered) at w0 = backup:

    g' = grad_coef*g + wd*w0; v = alpha*v + (1-alpha)*g'^2; avg = sqrt(v) + eps;
    momentum > 0: buf = momentum*buf + g'/avg, w = w0 - lr*buf; else w = w0 - lr*g'/avg.
    ``found_inf`` nonzero: w = w0 bit-exactly, v and buf untouched, decided in the kernel. One
    launch per call (one group: the dispatcher sends what supports() refuses to the torch backend).
    """
    has_momentum = momentum > 0
    bufs = momentum_buffers if has_momentum else None
    p, b, g, v, buf = params, backup, grads, square_avgs, bufs
    tab = tb.table([p, b, g, v] + ([buf] if has_momentum else []))
    if tab.n_chunks == 0:
        return
    lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
    coef_p, coef_v, coef_is = tb.scalar(1.0 if grad_coef is None else grad_coef, tab.chunk_begin)
    found_p, has_found = _found_inf(found_inf, tab.chunk_begin)
    pb_dt, bb_dt = _bits_dtypes(p[0].dtype, b[0].dtype)
    tb.launch(
        _restore_rmsprop_kernel,
        tab,
        lr_p,
        lr_v,
        float(alpha),
        1.0 - float(alpha),
        float(eps),
        float(weight_decay),
        float(momentum),
        coef_p,
        coef_v,
        found_p,
        P_DT=tb.tl_dtype(p[0].dtype),
        B_DT=tb.tl_dtype(b[0].dtype),
        G_DT=tb.tl_dtype(g[0].dtype),
        V_DT=tb.tl_dtype(v[0].dtype),
        BUF_DT=tb.tl_dtype(buf[0].dtype) if has_momentum else tl.float32,
        PB_DT=pb_dt,
        BB_DT=bb_dt,
        LR_PTR=lr_is,
        COEF_PTR=coef_is,
        HAS_COEF=grad_coef is not None,
        HAS_FOUND_INF=has_found,
        HAS_WD=bool(weight_decay),
        HAS_MOMENTUM=has_momentum,
    )
