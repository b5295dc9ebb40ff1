"""Fused forward+backward of BiSAM's lower bound of the 0-1 loss (Xie et al., ICML 2024).

Per sample with logits f in R^K and label y, margins F_j = f_j - f_y:

    loss = (1/mu) log sum_j exp(mu * phi(F_j))
    dloss/df_j = s_j phi'(F_j) - [j = y] sum_k s_k phi'(F_k),   s = softmax(mu * phi(F))

    log variant:  phi(x) = 1 - softplus(gamma - x), gamma = log(e - 1),  phi'(x) = sigmoid(gamma - x)
    tanh variant: phi(x) = tanh(a x),                                    phi'(x) = a (1 - tanh^2(a x))

One program per row, two sweeps over K in blocks: the first keeps an online log-sum-exp
(running max m, sum s = sum exp(z - m), and t = sum exp(z - m) phi') so that both the loss and
the label term sum_k s_k phi'_k = t/s are known after it; the second writes dlogits. Nothing
K-sized is kept besides dlogits itself.

Byte model per logit element (b = bytes per logit): read 2b (two sweeps), write 1b (dlogits);
without gradient: read 1b.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

GAMMA = math.log(math.e - 1.0)
VARIANTS = {"log": 0, "tanh": 1}


@triton.jit
def _phi(f, fy, a, gamma, VARIANT: tl.constexpr):
    x = f - fy
    if VARIANT == 0:
        u = gamma - x
        # softplus(u) = max(u, 0) + log(1 + exp(-|u|)), stable for large |u|
        sp = tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))
        phi = 1.0 - sp
        dphi = 1.0 / (1.0 + tl.exp(-u))
    else:
        v = a * x
        # tanh(v) = sign(v) (1 - 2 / (exp(2|v|) + 1)): no overflow, absolute error ~1 ulp of 1
        th = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(v)) + 1.0)
        th = tl.where(v < 0, -th, th)
        phi = th
        dphi = a * (1.0 - th * th)
    return phi, dphi


@triton.jit
def _bisam_lower_bound_kernel(
    X,
    Y,
    LOSS,
    DX,
    K,
    mu,
    a,
    gamma,
    grad_scale,
    VARIANT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * K
    y = tl.load(Y + row)
    fy = tl.load(x_row + y).to(tl.float32)
    m = float("-inf")
    s = 0.0
    t = 0.0
    # while loops, not range(0, K, BLOCK): Triton 3.6's interpreter cannot take a runtime bound in
    # range() (int() of a 1-element array). multiple_of gives the loop variable the divisibility
    # that range()'s induction variable had, so the loads vectorize as before (.ci/triton_aot.py)
    start = 0
    while start < K:
        offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        valid = offs < K
        f = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
        phi, dphi = _phi(f, fy, a, gamma, VARIANT)
        z = tl.where(valid, mu * phi, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * rescale + tl.sum(e, 0)
        t = t * rescale + tl.sum(e * dphi, 0)
        m = m_new
        start += BLOCK
    lse = m + tl.log(s)
    tl.store(LOSS + row, lse / mu)
    if WRITE_GRAD:
        label_term = t / s
        dx_row = DX + row * K
        start = 0
        while start < K:
            offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            valid = offs < K
            f = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
            phi, dphi = _phi(f, fy, a, gamma, VARIANT)
            d = tl.exp(mu * phi - lse) * dphi
            d = tl.where(offs == y, d - label_term, d)
            d = d * grad_scale
            if OUT_BF16:
                # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
                bits = d.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                out = tl.where(d != d, d.to(tl.bfloat16), out)  # keep NaN a NaN
            else:
                out = d.to(DX.dtype.element_ty)
            tl.store(dx_row + offs, out, mask=valid)
            start += BLOCK


def bisam_lower_bound_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    variant: str = "log",
    mu: float = 1.0,
    a: float = 0.1,
    grad_scale: float = 1.0,
    with_grad: bool = True,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch wrapper: per-sample loss (float32) and ``grad_scale * dloss/dlogits`` (logits' dtype).

    ``logits`` is (N, K), ``targets`` (N,) integer labels in [0, K).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    logits = logits.contiguous()
    targets = targets.contiguous()
    n, k = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    dx = torch.empty_like(logits) if with_grad else None
    if n == 0:
        return loss, dx
    if block is None:
        block = min(triton.next_power_of_2(max(k, 1)), 4096)
    _bisam_lower_bound_kernel[(n,)](
        logits,
        targets,
        loss,
        dx if dx is not None else logits,
        k,
        float(mu),
        float(a),
        GAMMA,
        float(grad_scale),
        VARIANT=VARIANTS[variant],
        WRITE_GRAD=with_grad,
        OUT_BF16=logits.dtype == torch.bfloat16,
        BLOCK=block,
    )
    return loss, dx


class BisamLowerBound(torch.autograd.Function):
    """Autograd wrapper: forward computes the (reduced) loss and keeps only dlogits for backward."""

    @staticmethod
    def forward(ctx, logits, targets, variant, mu, a, reduction, block):  # type: ignore[override]
        n = logits.shape[0]
        grad_scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
        loss, dx = bisam_lower_bound_fwd(
            logits, targets, variant, mu, a, grad_scale, with_grad=logits.requires_grad, block=block
        )
        ctx.reduction = reduction
        ctx.save_for_backward(dx if dx is not None else logits.new_empty(0))
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (dx,) = ctx.saved_tensors
        if ctx.reduction == "none":
            g = dx * grad_out.to(dx.dtype)[:, None]
        else:
            g = dx * grad_out.to(dx.dtype)
        return g, None, None, None, None, None, None
