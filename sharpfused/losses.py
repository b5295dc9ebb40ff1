"""Losses used by sharpness-aware algorithms: BiSAM's lower bound of the 0-1 loss."""

from __future__ import annotations

import importlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

GAMMA = math.log(math.e - 1.0)
_DEFAULT_MU = {"log": 1.0, "tanh": 10.0}


def _kernel_module():
    try:
        return importlib.import_module("sharpfused.kernels.bisam_loss"), None
    except Exception as exc:  # no triton, or a toolchain that fails to load
        return None, f"{type(exc).__name__}: {exc}"


def _triton_why_not(device: torch.device) -> Optional[str]:
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "the Triton kernel runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)"
    _, why = _kernel_module()
    return why


def bisam_lower_bound_torch(logits: Tensor, targets: Tensor, variant: str = "log", mu: float = 1.0, a: float = 0.1) -> Tensor:
    """Per-sample lower bound in eager PyTorch (the reference the kernel is tested against).

    Computed in float32 (float64 for float64 logits); returns the per-sample values.
    """
    f = logits.double() if logits.dtype == torch.float64 else logits.float()
    margins = f - f.gather(1, targets[:, None])
    if variant == "log":
        phi = 1.0 - F.softplus(GAMMA - margins)
    else:
        phi = torch.tanh(a * margins)
    return torch.logsumexp(mu * phi, dim=1) / mu


def bisam_lower_bound(
    logits: Tensor,
    targets: Tensor,
    variant: str = "log",
    mu: Optional[float] = None,
    a: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""BiSAM's lower bound of the 0-1 loss, ascended by the maximizing player (Xie et al.,
    "Improving SAM Requires Rethinking its Optimization Formulation", ICML 2024).

    For logits :math:`f \in R^K` of a sample with label :math:`y` and margins
    :math:`F_j = f_j - f_y` (:math:`F_y = 0` included):

    .. math::
        Q = \frac{1}{\mu} \log \sum_j \exp(\mu\, \phi(F_j)),\qquad
        \phi_{log}(x) = 1 - \log(1 + e^{\gamma - x}),\ \gamma = \log(e - 1),\qquad
        \phi_{tanh}(x) = \tanh(a x)

    Defaults are the authors': ``variant="log"`` with ``mu=1``; ``variant="tanh"`` with
    ``mu=10``, ``a=0.1``. ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"`` (per sample).

    ``backend="auto"`` uses the fused Triton kernel (``kernels/bisam_loss.py``: logits ->
    loss and dlogits in one launch, nothing K-sized kept but dlogits) on CUDA tensors when
    Triton is available, and eager PyTorch otherwise; ``"torch"``/``"triton"`` force one.
    The loss is float32 (float64 for float64 logits on the torch path); the gradient has the
    logits' dtype.
    """
    if variant not in _DEFAULT_MU:
        raise ValueError(f"variant must be 'log' or 'tanh', got {variant!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    mu = _DEFAULT_MU[variant] if mu is None else mu
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu must be a finite number > 0, got {mu}")
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise ValueError(f"a must be a finite number > 0, got {a}")
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be (N, K) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if backend == "auto":
        use_triton = logits.device.type == "cuda" and _triton_why_not(logits.device) is None
    elif backend == "triton":
        why = _triton_why_not(logits.device)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run on {logits.device}: {why}")
        use_triton = True
    else:
        use_triton = False
    if use_triton:
        mod, _ = _kernel_module()
        return mod.BisamLowerBound.apply(logits, targets, variant, float(mu), float(a), reduction, None)
    per = bisam_lower_bound_torch(logits, targets, variant, mu, a)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per
