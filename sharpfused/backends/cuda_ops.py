"""The ``cuda`` backend: every primitive as one or two multi-tensor CUDA launches per (device, dtype).

Wraps the compiled extension ``sharpfused._C`` (sources in ``csrc/``; built by ``setup.py`` or
at run time by :func:`sharpfused.build_extension`). One launch covers many tensors through a
table of addresses passed by value; reductions are two-stage and deterministic (no atomics).

Kernels run on contiguous float32, bfloat16, float16 and float64 tensors of one dtype per list
group, math in opmath (float32; float64 for float64); ``perturb_``'s mask may also be uint8 or
bool (SSAM stores a uint8 0/1 mask), read by the kernel as one byte per element. A (device,
dtype) group that the kernels cannot take -- a non-contiguous tensor, companion lists of another
dtype, another dtype -- is refused by :func:`supports`; the dispatcher (:mod:`sharpfused.ops`)
sends it to the torch backend, with the same results.

Per-step scalars (``scale``, ``lr``, ``c1``, ``c2``, ``eta`` and ``grad_coef``) given as tensors are moved to
the device in opmath and read there by the kernel; Python numbers are passed by value. The fused
base steps' ``found_inf`` and a tensor AdamW ``step`` go to the kernel as one float32 on the
device: a nonzero ``found_inf`` makes every block copy backup to w bit for bit and leave the
optimizer state alone, and the bias corrections are computed from the device step in the kernel.
Nothing calls ``.item()``, so a step can be captured in a CUDA graph.

Byte models (b = bytes per element): see :mod:`sharpfused.ops`; each kernel file in ``csrc/``
states its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..lists import info
from ..spec import NORM_EPS
from .torch_ops import opmath

_log = logging.getLogger("sharpfused")

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError as exc:  # a pure-Python install: say why once, at DEBUG, and let ops report it
    _log.debug(
        "sharpfused: CUDA extension sharpfused._C is absent (%s); the 'cuda' backend is unavailable. "
        "Build it with `pip install .` on a machine with nvcc and a CUDA torch, or sharpfused.build_extension().",
        exc,
    )
    raise ImportError(
        f"the CUDA extension sharpfused._C is not built ({exc}); install with nvcc and a CUDA build of torch, "
        "or call sharpfused.build_extension()"
    ) from exc

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_cuda(xs: Sequence[Tensor]) -> None:
    if not xs:
        raise ValueError("primitives take a non-empty list of tensors")
    if xs[0].device.type != "cuda":
        raise ValueError(f"the 'cuda' backend runs on CUDA tensors only, got a tensor on {xs[0].device}")


#: mask dtypes the perturb kernel reads as bytes (besides the parameter dtype)
_BYTE_MASKS = (torch.uint8, torch.bool)


def _fits(
    first: Sequence[Tensor], *others: Optional[Sequence[Tensor]], mask: Optional[Sequence[Tensor]] = None
) -> bool:
    """True when the kernels can take this group: one supported dtype, one device, contiguous; a
    ``mask`` list in that dtype or all uint8 or all bool."""
    head = info(first)  # kept by a Tensors list, else one scan
    dtype, device = head.dtype, head.device
    if dtype not in _KERNEL_DTYPES or not head.contiguous:
        return False
    lists = [(info(lst), dtype) for lst in others if lst is not None]
    if mask is not None:
        m = info(mask)
        lists.append((m, m.dtype if m.dtype in _BYTE_MASKS else dtype))
    return all(i.dtype == want and i.device == device and i.contiguous for i, want in lists)


def _scalar(s, dtype: torch.dtype, device: torch.device) -> tuple[Optional[Tensor], float]:
    """(device tensor or None, value): a tensor scalar stays on the device, in opmath; a CPU tensor
    (torch.optim allows a CPU tensor lr) is read on the host, free, rather than copied (a pageable
    host-to-device copy synchronizes the stream)."""
    if isinstance(s, Tensor):
        if s.device.type == "cpu" and device.type != "cpu":
            return None, float(s)
        return s.detach().to(device=device, dtype=opmath(dtype)).reshape(()), 0.0
    return None, float(s)


def _list(xs: Optional[Sequence[Tensor]]) -> Optional[list[Tensor]]:
    return None if xs is None else list(xs)


def supports(name: str, lists: Sequence[Optional[Sequence[Tensor]]]) -> bool:
    """Whether the kernels take one group of primitive ``name`` (the dispatcher sends the rest to
    the torch backend): see :func:`_fits`; perturb_'s mask (its fourth list) may be bytes."""
    if name == "perturb_":
        return _fits(*lists[:3], mask=lists[3])
    return _fits(*lists)


def sq_norm(xs, weights=None, eta=0.0, per_tensor=False):
    _check_cuda(xs)
    et, ev = _scalar(eta, xs[0].dtype, xs[0].device)
    total, per = _C.sq_norm(list(xs), _list(weights), et, ev)
    return (total, per) if per_tensor else total


def perturb_(params, grads, backup, scale, eta=None, mask=None, norm_sq=None):
    _check_cuda(params)
    dtype, dev = params[0].dtype, params[0].device
    st, sv = _scalar(scale, dtype, dev)
    et, ev = _scalar(0.0 if eta is None else eta, dtype, dev)
    nt = None if norm_sq is None else norm_sq.detach().to(device=dev, dtype=opmath(dtype)).reshape(())
    _C.perturb_(list(params), list(grads), _list(backup), st, sv, eta is not None, et, ev, _list(mask), nt, NORM_EPS)


def restore_(params, backup):
    _check_cuda(params)
    _C.restore_(list(params), list(backup))


def dot_norms(a, b):
    _check_cuda(a)
    return _C.dot_norms(list(a), list(b))


def combine_(g, saved, c1, c2):
    _check_cuda(g)
    dtype, dev = g[0].dtype, g[0].device
    t1, v1 = _scalar(c1, dtype, dev)
    t2, v2 = _scalar(c2, dtype, dev)
    _C.combine_(list(g), list(saved), t1, v1, t2, v2)


def _device_f32(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """A flag or count the kernel reads: one float32 on the device (no copy when it already is)."""
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(())


def _step_scalars(params, lr, grad_coef, found_inf) -> tuple:
    """The scalars every fused base step passes: (lr tensor, lr value, coef tensor, coef value,
    found_inf as one float32 on the device)."""
    dtype, dev = params[0].dtype, params[0].device
    lt, lv = _scalar(lr, dtype, dev)
    ct, cv = _scalar(1.0 if grad_coef is None else grad_coef, dtype, dev)
    return lt, lv, ct, cv, _device_f32(found_inf, dev)


def restore_sgd_(
    params,
    backup,
    grads,
    momentum_buffers,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    init_momentum,
    grad_coef=None,
    found_inf=None,
):
    _check_cuda(params)
    lt, lv, ct, cv, found = _step_scalars(params, lr, grad_coef, found_inf)
    bufs = _list(momentum_buffers) if momentum else None
    _C.restore_sgd_(
        list(params), list(backup), list(grads), bufs, lt, lv, float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(init_momentum), ct, cv, found,
    )  # fmt: skip


def restore_adamw_(
    params,
    backup,
    grads,
    exp_avgs,
    exp_avg_sqs,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_coef=None,
    found_inf=None,
    decoupled=True,
):
    _check_cuda(params)
    if isinstance(step, Tensor):  # the kernel computes the bias corrections from the device value
        bc1 = bc2_sqrt = 1.0
    else:  # bias corrections from the host step count, in float64 like torch_ops
        bc1 = 1.0 - beta1**step
        bc2_sqrt = (1.0 - beta2**step) ** 0.5
    lt, lv, ct, cv, found = _step_scalars(params, lr, grad_coef, found_inf)
    step_t = _device_f32(step if isinstance(step, Tensor) else None, params[0].device)
    _C.restore_adamw_(
        list(params), list(backup), list(grads), list(exp_avgs), list(exp_avg_sqs), lt, lv, float(beta1),
        float(beta2), float(eps), float(weight_decay), step_t, bc1, bc2_sqrt, ct, cv, found,
        bool(decoupled) or not weight_decay,  # no decay: the two rules are one
    )  # fmt: skip


def restore_rmsprop_(
    params,
    backup,
    grads,
    square_avgs,
    momentum_buffers,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    grad_coef=None,
    found_inf=None,
):
    _check_cuda(params)
    lt, lv, ct, cv, found = _step_scalars(params, lr, grad_coef, found_inf)
    bufs = _list(momentum_buffers) if momentum > 0 else None
    _C.restore_rmsprop_(
        list(params), list(backup), list(grads), list(square_avgs), bufs, lt, lv, float(alpha), float(eps),
        float(weight_decay), float(momentum), ct, cv, found,
    )  # fmt: skip
