"""The primitives: the one dispatch point between algorithms and backends.

Every sharpness-aware algorithm in :mod:`sharpfused.optim` is written in these few
operations. Each has one signature and one meaning on every backend; a backend is a
module that defines all of them (see :data:`PRIMITIVES`).

Conventions shared by every backend:

* Lists hold tensors of one device. ``params``/``grads``/``backup``/state lists are
  parallel (same length, same shapes). Empty tensors are allowed, empty lists are not.
* Math is done in "opmath": float32 for bf16/fp16/fp32 inputs, float64 for float64.
  A result written to a low-precision tensor is rounded once, at the end.
* Scalars (``scale``, ``lr``, coefficients) may be Python numbers or 0-d tensors on
  the device; a step never calls ``.item()`` on a device tensor.
* Reductions are deterministic: a fixed partition, fixed order, no atomics.
* ``found_inf`` (the fused base steps): a 0-d device tensor, nonzero to skip the step on the
  device -- the weights are restored bit-exactly and no optimizer state changes; no host sync.

Byte models (b = bytes per parameter element, per element of the list):

==================  =====================================================  =====================
primitive           does                                                   traffic
==================  =====================================================  =====================
``sq_norm``         sum((T*x)^2), T = |w|+eta (ASAM) or 1                  read 1b (2b with w)
``perturb_``        backup <- w; w <- w + scale*T^2*g (*mask)              read 2b, write 2b
``restore_``        w <- backup, bit-exact                                 read 1b, write 1b
``dot_norms``       (<a,b>, |a|^2, |b|^2) in one pass                      read 2b
``combine_``        g <- c1*g + c2*saved                                   read 2b, write 1b
``restore_sgd_``    w <- backup - lr*SGD(g) (momentum, nesterov, wd)       read 2b (+1b), write 1b (+1b)
``restore_adamw_``  w <- AdamW(backup, g); moments updated                 read 4b, write 3b
==================  =====================================================  =====================
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

BACKENDS = ("torch", "triton", "cuda")
PRIMITIVES = (
    "sq_norm",
    "perturb_",
    "restore_",
    "dot_norms",
    "combine_",
    "restore_sgd_",
    "restore_adamw_",
)

_MODULES = {
    "torch": "sharpfused.backends.torch_ops",
    "triton": "sharpfused.kernels",
    "cuda": "sharpfused.backends.cuda_ops",
}
_loaded: dict[str, ModuleType] = {}
_why_not: dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _why_not:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # ImportError, or a toolchain that fails to load
        _why_not[name] = f"{type(exc).__name__}: {exc}"
        return None
    missing = [p for p in PRIMITIVES if not hasattr(mod, p)]
    if missing:
        _why_not[name] = f"module {_MODULES[name]} lacks {', '.join(missing)}"
        return None
    _loaded[name] = mod
    return mod


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
    if name != "torch":
        if device.type == "cpu" and not (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            return (
                f"backend {name!r} runs on CUDA tensors only"
                + (" (or on CPU with TRITON_INTERPRET=1 set before triton is imported)" if name == "triton" else "")
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend {name!r} does not support device type {device.type!r}"
    if _load(name) is None:
        return f"backend {name!r} is not available: {_why_not[name]}"
    return None


def resolve(name: str, device: torch.device) -> str:
    """Resolve ``"auto"`` (cuda > triton > torch on CUDA, torch elsewhere) and check availability.

    Raises ValueError naming the backend and the reason when it cannot run on ``device``.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            for cand in ("cuda", "triton"):
                if unavailable_reason(cand, device) is None:
                    return cand
        return "torch"
    why = unavailable_reason(name, device)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot run on {device}: {why}")
    return name


def backend_module(name: str) -> ModuleType:
    mod = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not available: {_why_not.get(name, 'unknown backend')}")
    return mod


# ---------------------------------------------------------------------------------------
# The primitives. Each forwards to the backend module of the same name; while
# torch.compile traces, to the custom op of the same name (sharpfused.library), which the
# graph keeps as one opaque node that runs the same backend function.
# ---------------------------------------------------------------------------------------


def sq_norm(
    xs: Sequence[Tensor],
    weights: Optional[Sequence[Tensor]] = None,
    eta: float = 0.0,
    per_tensor: bool = False,
    *,
    backend: str = "torch",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Squared L2 norm ``sum_i sum((T_i * x_i)**2)`` with ``T_i = |w_i| + eta`` (ASAM) or 1.

    Returns a 0-d opmath tensor on the list's device; with ``per_tensor=True`` also a
    1-d tensor of each tensor's squared norm. Non-finite inputs give a non-finite result.
    """
    if torch.compiler.is_compiling():
        return library.sq_norm(xs, weights, eta, per_tensor, backend=backend)
    return _loaded.get(backend, backend_module(backend)).sq_norm(xs, weights, eta, per_tensor)


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backup: Optional[Sequence[Tensor]],
    scale: Scalar,
    eta: Optional[float] = None,
    mask: Optional[Sequence[Tensor]] = None,
    *,
    backend: str = "torch",
) -> None:
    """``backup <- w`` (skipped when ``backup`` is None), then ``w <- w + scale * T^2 * g [* mask]``.

    ``T = |w| + eta`` (evaluated at the incoming w) when ``eta`` is not None, else 1. A scale
    equal to zero drops the term: w keeps its bits even where g is inf or NaN (the optimizers
    pass scale 0 when the gradient norm is not finite, so the next forward sees finite weights).
    """
    if torch.compiler.is_compiling():
        return library.perturb_(params, grads, backup, scale, eta, mask, backend=backend)
    _loaded.get(backend, backend_module(backend)).perturb_(params, grads, backup, scale, eta, mask)


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor], *, backend: str = "torch") -> None:
    """``w <- backup``, bit-exact."""
    if torch.compiler.is_compiling():
        return library.restore_(params, backup, backend=backend)
    _loaded.get(backend, backend_module(backend)).restore_(params, backup)


def dot_norms(a: Sequence[Tensor], b: Sequence[Tensor], *, backend: str = "torch") -> Tensor:
    """``(<a,b>, |a|^2, |b|^2)`` over all tensors, as one 1-d opmath tensor of 3 entries."""
    if torch.compiler.is_compiling():
        return library.dot_norms(a, b, backend=backend)
    return _loaded.get(backend, backend_module(backend)).dot_norms(a, b)


def combine_(
    g: Sequence[Tensor], saved: Sequence[Tensor], c1: Scalar, c2: Scalar, *, backend: str = "torch"
) -> None:
    """``g <- c1 * g + c2 * saved``; a coefficient equal to zero drops its term entirely.

    So a non-finite input behind a zero coefficient never reaches the output: with device
    coefficients chosen by a skip flag (``torch.where(skip, 1, c1)``, ``torch.where(skip, 0, c2)``)
    an algorithm keeps its state unchanged on a skipped step without a host sync.
    """
    dev = g[0].device if g else None
    c1 = c1.to(dev) if isinstance(c1, Tensor) and c1.device != dev else c1
    c2 = c2.to(dev) if isinstance(c2, Tensor) and c2.device != dev else c2
    if torch.compiler.is_compiling():
        return library.combine_(g, saved, c1, c2, backend=backend)
    _loaded.get(backend, backend_module(backend)).combine_(g, saved, c1, c2)


def restore_sgd_(
    params: Sequence[Tensor],
    backup: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Tensor]],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    init_momentum: bool,
    grad_coef: Optional[Scalar] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "torch",
) -> None:
    """Restore fused with torch.optim.SGD's update, evaluated at the restored weights w0:

    g' = grad_coef*g;  d = g' + wd*w0;  buf = d (first step) or momentum*buf + (1-dampening)*d;
    d = d + momentum*buf (nesterov) or buf;  w = w0 - lr*d.
    ``momentum_buffers`` is None when momentum == 0; ``init_momentum`` marks the first step.
    ``grad_coef`` (unscale and clip factor) multiplies g first. ``found_inf``: a 0-d device
    tensor; where nonzero the step is skipped on the device: w = w0 bit-exactly and the
    momentum buffers keep their values (on an ``init_momentum`` step they become zeros).
    """
    if torch.compiler.is_compiling():
        return library.restore_sgd_(
            params, backup, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, init_momentum=init_momentum, grad_coef=grad_coef,
            found_inf=found_inf, backend=backend,
        )
    _loaded.get(backend, backend_module(backend)).restore_sgd_(
        params, backup, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, init_momentum,
        grad_coef, found_inf,
    )


def restore_adamw_(
    params: Sequence[Tensor],
    backup: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: Scalar,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_coef: Optional[Scalar] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "torch",
) -> None:
    """Restore fused with torch.optim.AdamW's update (``step`` already counts this step):

    g' = grad_coef*g; w0 = backup; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2;
    w = w0*(1 - lr*wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    ``step`` is an int or a 0-d device tensor (bias corrections then computed on the device, so
    the call needs no host value and can be captured in a CUDA graph). ``found_inf``: a 0-d
    device tensor; where nonzero the step is skipped: w = w0 bit-exactly, m and v unchanged.
    """
    if torch.compiler.is_compiling():
        return library.restore_adamw_(
            params, backup, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, grad_coef=grad_coef, found_inf=found_inf, backend=backend,
        )
    _loaded.get(backend, backend_module(backend)).restore_adamw_(
        params, backup, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, grad_coef, found_inf
    )


from . import library  # noqa: E402  (imports ops back: the custom ops call backend_module)
