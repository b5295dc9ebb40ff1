"""Restore fused with the base optimizer's update: ``w <- backup - update(g)``, states in place.

``restore_sgd_`` is torch.optim.SGD's update (momentum, dampening, nesterov, weight decay),
``restore_adamw_`` torch.optim.AdamW's (Loshchilov & Hutter, ICLR 2019) or, with
``decoupled=False``, torch.optim.Adam's (L2 weight decay: a constexpr switch of the same kernel),
and ``restore_rmsprop_`` torch.optim.RMSprop's (not centered), all evaluated at the restored
weights w0 = backup, so restore and base step are one pass. One kernel, ``_restore_step_kernel``,
holds the chunk loop, the skip path and the scalars for all of them; the update is a per-block
function picked by the constexpr ``UPDATE`` (one compiled variant per update, as before), and a
base optimizer's step is its ``_*_block`` plus its wrapper's hyperparameters. fp32 math; every output
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
from .restore import copy_chunk
from .table import chunk_of, load, load_scalar, store, tensor_ptr


# ------------------------------------------------------------------------------------------ shared
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
    if HAS_MOMENTUM:  # INIT: SGD's first momentum step (the buffer becomes zeros)
        copy_chunk(pb_ptr, bb_ptr, buf_ptr, start, n, INIT, CHUNK, BLOCK)
    else:
        copy_chunk(pb_ptr, bb_ptr, buf_ptr, start, n, False, CHUNK, BLOCK)


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


@triton.jit
def _restored_grad(b_ptr, g_ptr, offs, mask, coef, weight_decay, HAS_COEF: tl.constexpr, HAS_WD: tl.constexpr,
                   MASKED: tl.constexpr):  # fmt: skip
    """(w0, g') at the restored weights w0 = backup: g' = coef*g, then + wd*w0 (L2 decay), in fp32."""
    w0 = load(b_ptr, offs, mask, MASKED).to(tl.float32)
    g = load(g_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_COEF:
        g = g * coef
    if HAS_WD:
        g = g + weight_decay * w0
    return w0, g


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
    w0, d = _restored_grad(b_ptr, g_ptr, offs, mask, coef, weight_decay, HAS_COEF, HAS_WD, MASKED)
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
    lists = [params, backup, grads] + ([momentum_buffers] if has_momentum else [])
    _launch(
        SGD, lists, lr, grad_coef, found_inf, (momentum, 1.0 - float(dampening), weight_decay),
        HAS_WD=bool(weight_decay), HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), INIT=bool(init_momentum),
    )  # fmt: skip


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
    w0, g = _restored_grad(b_ptr, g_ptr, offs, mask, coef, weight_decay, HAS_COEF, False, MASKED)
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
    hyper = (weight_decay, inv_bc1, 1.0 - float(beta1), beta2, 1.0 - float(beta2), eps, bc2_sqrt)
    _launch(
        ADAM, [params, backup, grads, exp_avgs, exp_avg_sqs], lr, grad_coef, found_inf, hyper,
        step=step if step_is else None, betas=(beta1, beta2),
        DECOUPLED=bool(decoupled) or not weight_decay,  # no decay: the two rules are one
    )  # fmt: skip


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
    w0, g = _restored_grad(b_ptr, g_ptr, offs, mask, coef, weight_decay, HAS_COEF, HAS_WD, MASKED)
    v = load(v_ptr, offs, mask, MASKED).to(tl.float32)
    v = v * alpha + (one_minus_alpha * g) * g  # torch's mul_(alpha).addcmul_(g, g, value=1-alpha)
    store(v_ptr, offs, v, mask, MASKED)
    # correctly rounded sqrt and division (Triton's defaults are approximate on GPU): fp32 parity
    d = tl.div_rn(g, tl.sqrt_rn(v) + eps)
    if HAS_MOMENTUM:
        d = momentum * load(buf_ptr, offs, mask, MASKED).to(tl.float32) + d
        store(buf_ptr, offs, d, mask, MASKED)
    store(p_ptr, offs, w0 + neg_lr * d, mask, MASKED)


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
    lists = [params, backup, grads, square_avgs] + ([momentum_buffers] if has_momentum else [])
    _launch(
        RMSPROP, lists, lr, grad_coef, found_inf, (alpha, 1.0 - float(alpha), eps, weight_decay, momentum),
        HAS_WD=bool(weight_decay), HAS_MOMENTUM=has_momentum,
    )  # fmt: skip


# ------------------------------------------------------------------------ the one restore-step kernel
SGD, ADAM, RMSPROP = 0, 1, 2  # UPDATE: the per-update block of _restore_step_kernel


@triton.jit
def _update_block(
    p_ptr, b_ptr, g_ptr, s1_ptr, s2_ptr, offs, mask, a0, a1, a2, coef, h0, h1, h2, h3, h4, h5,
    UPDATE: tl.constexpr, HAS_COEF: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, INIT: tl.constexpr, DECOUPLED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One block of the update (a constexpr switch: only one branch is compiled). a0..a2: the
    per-program scalars of _restore_step_kernel; h0..h5: the hyperparameters (see _launch's callers)."""
    if UPDATE == 0:  # SGD: a0 = lr; h0 momentum, h1 1 - dampening, h2 weight decay; s1 the buffer
        _restore_sgd_block(
            p_ptr, b_ptr, g_ptr, s1_ptr, offs, mask, a0, h0, h1, h2, coef,
            HAS_COEF, HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, MASKED,
        )  # fmt: skip
    elif UPDATE == 1:  # Adam(W): a0 1 - lr*wd, a1 -lr/bc1, a2 sqrt(bc2); h0 wd, h2 1-b1, h3 b2, h4 1-b2, h5 eps
        _restore_adamw_block(
            p_ptr, b_ptr, g_ptr, s1_ptr, s2_ptr, offs, mask, a0, a1, h2, h3, h4, h5, a2, coef, h0,
            HAS_COEF, DECOUPLED, MASKED,
        )  # fmt: skip
    else:  # RMSprop: a0 = -lr; h0 alpha, h1 1 - alpha, h2 eps, h3 weight decay, h4 momentum; s1 v, s2 buf
        _restore_rmsprop_block(
            p_ptr, b_ptr, g_ptr, s1_ptr, s2_ptr, offs, mask, a0, h0, h1, h2, h3, h4, coef,
            HAS_COEF, HAS_WD, HAS_MOMENTUM, MASKED,
        )  # fmt: skip


@triton.jit
def _restore_step_kernel(
    addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    n_tensors,
    lr_ptr,
    lr_val,
    coef_ptr,
    coef_val,
    found_ptr,
    step_ptr,
    h0,
    h1,
    h2,
    h3,
    h4,
    h5,
    h6,
    beta1_hi,
    beta1_lo,
    beta2_hi,
    beta2_lo,
    P_DT: tl.constexpr,
    B_DT: tl.constexpr,
    G_DT: tl.constexpr,
    S1_DT: tl.constexpr,
    S2_DT: tl.constexpr,
    PB_DT: tl.constexpr,
    BB_DT: tl.constexpr,
    UPDATE: tl.constexpr,
    LR_PTR: tl.constexpr,
    COEF_PTR: tl.constexpr,
    STEP_PTR: tl.constexpr,
    HAS_COEF: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_S1: tl.constexpr,
    HAS_S2: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    INIT: tl.constexpr,
    DECOUPLED: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """w <- w0 - update(coef*g) at w0 = backup, the states (table lists 3 and 4) in place; UPDATE
    picks SGD, Adam(W) or RMSprop. Bytes/element: read backup, g and each state; write w and each
    state (SGD: 2b+buf / 1b+buf; Adam: 4b / 3b; RMSprop: 3b+buf / 2b+buf). Skipped step
    (found_inf != 0): read backup, write w (+ zeros into SGD's buffer on an INIT step)."""
    t, start, n = chunk_of(chunk_tensor_ptr, chunk_start_ptr, numels_ptr, BLOCK)
    s1_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)  # never read unless HAS_S1
    s2_ptr = s1_ptr
    if HAS_S1:
        s1_ptr = tensor_ptr(addrs_ptr, 3, n_tensors, t, S1_DT, ALIGNED)
    if HAS_S2:
        s2_ptr = tensor_ptr(addrs_ptr, 4, n_tensors, t, S2_DT, ALIGNED)
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_ptr) != 0  # once per program, any dtype; nonzero (NaN too) skips
    if skip:  # INIT is SGD's first momentum step only
        _skipped_step(
            addrs_ptr, n_tensors, t, start, n, s1_ptr, PB_DT, BB_DT, HAS_MOMENTUM, INIT, ALIGNED, CHUNK, BLOCK
        )
    else:
        p_ptr = tensor_ptr(addrs_ptr, 0, n_tensors, t, P_DT, ALIGNED)
        b_ptr = tensor_ptr(addrs_ptr, 1, n_tensors, t, B_DT, ALIGNED)
        g_ptr = tensor_ptr(addrs_ptr, 2, n_tensors, t, G_DT, ALIGNED)
        lr = load_scalar(lr_ptr, lr_val, LR_PTR)
        coef = 1.0
        if HAS_COEF:
            coef = load_scalar(coef_ptr, coef_val, COEF_PTR)
        a0 = lr  # the per-program scalars of the update (SGD: lr)
        a1 = lr
        a2 = lr
        if UPDATE == 1:
            inv_bc1 = h1
            bc2_sqrt = h6
            if STEP_PTR:
                inv_bc1, bc2_sqrt = _bias_corrections(step_ptr, beta1_hi, beta1_lo, beta2_hi, beta2_lo)
            a0 = 1.0 - lr * h0  # decoupled decay
            a1 = -(lr * inv_bc1)  # the step size
            a2 = bc2_sqrt
        if UPDATE == 2:
            a0 = -lr
        for i in range(0, CHUNK, BLOCK):
            base = tl.multiple_of(start + i, BLOCK)  # chunk starts are multiples of CHUNK
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            if base + BLOCK <= n:
                _update_block(
                    p_ptr, b_ptr, g_ptr, s1_ptr, s2_ptr, offs, mask, a0, a1, a2, coef, h0, h1, h2, h3, h4, h5,
                    UPDATE, HAS_COEF, HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, DECOUPLED, False,
                )  # fmt: skip
            elif base < n:
                _update_block(
                    p_ptr, b_ptr, g_ptr, s1_ptr, s2_ptr, offs, mask, a0, a1, a2, coef, h0, h1, h2, h3, h4, h5,
                    UPDATE, HAS_COEF, HAS_WD, HAS_MOMENTUM, NESTEROV, INIT, DECOUPLED, True,
                )  # fmt: skip


_FLAGS = dict(HAS_WD=False, HAS_MOMENTUM=False, NESTEROV=False, INIT=False, DECOUPLED=False)


def _launch(update, lists, lr, grad_coef, found_inf, hyper, step=None, betas=(0.0, 0.0), **flags) -> None:
    """One launch of _restore_step_kernel over ``lists`` (w, backup, g, then the states) for
    ``update``: the scalars' encoding, the skip flag, the dtypes and the flags, written once."""
    tab = tb.table(lists)
    if tab.n_chunks == 0:
        return
    p, b = lists[0], lists[1]
    lr_p, lr_v, lr_is = tb.scalar(lr, tab.chunk_begin)
    coef_p, coef_v, coef_is = tb.scalar(1.0 if grad_coef is None else grad_coef, tab.chunk_begin)
    found_p, has_found = _found_inf(found_inf, tab.chunk_begin)
    step_p = tab.chunk_begin if step is None else step.detach().to(tab.chunk_begin.device).reshape(1)
    h = [float(x) for x in hyper] + [0.0] * (7 - len(hyper))
    b1_hi, b1_lo = _fp32_halves(float(betas[0]))
    b2_hi, b2_lo = _fp32_halves(float(betas[1]))
    pb_dt, bb_dt = _bits_dtypes(p[0].dtype, b[0].dtype)
    dts = [tb.tl_dtype(x[0].dtype) for x in lists] + [tl.float32] * (5 - len(lists))
    tb.launch(
        _restore_step_kernel,
        tab,
        lr_p,
        lr_v,
        coef_p,
        coef_v,
        found_p,
        step_p,
        *h,
        b1_hi,
        b1_lo,
        b2_hi,
        b2_lo,
        P_DT=dts[0],
        B_DT=dts[1],
        G_DT=dts[2],
        S1_DT=dts[3],
        S2_DT=dts[4],
        PB_DT=pb_dt,
        BB_DT=bb_dt,
        UPDATE=update,
        LR_PTR=lr_is,
        COEF_PTR=coef_is,
        STEP_PTR=step is not None,
        HAS_COEF=grad_coef is not None,
        HAS_FOUND_INF=has_found,
        HAS_S1=len(lists) > 3,
        HAS_S2=len(lists) > 4,
        **{**_FLAGS, **flags},
    )
