"""The primitives as ``torch.library`` custom ops (namespace ``sharpfused``), so torch.compile sees them.

A compiled region (``torch.compile`` of a step, or of any function that calls
:mod:`sharpfused.ops`) cannot trace into the backends: they keep Python-side caches
(workspaces, multi-tensor tables), launch Triton or CUDA kernels, and on CPU read a skip
flag on the host. So each primitive is one opaque custom op: the graph holds one node per
call, its implementation runs the selected backend (:func:`sharpfused.ops.backend_module`)
eagerly, and a fake (meta) implementation gives the output shapes and dtypes for tracing.
In-place primitives declare what they write (``mutates_args``), so functionalization and
inductor order them correctly against the rest of the graph.

:mod:`sharpfused.ops` routes a call here only while ``torch.compiler.is_compiling()``;
eager calls go to the backend directly, as before.

Schema decisions (the ops take only what a torch schema can say):

* An optional list of tensors (``weights``, ``backup``, ``mask``, ``momentum_buffers``) is
  passed as a list, the empty list meaning None. Primitives never take empty lists
  otherwise, so this is unambiguous.
* A scalar that may be a Python number or a 0-d device tensor (``scale``, ``c1``, ``c2``,
  ``lr``, ``step``, ``grad_coef``) becomes two arguments, ``x: float`` and ``x_t: Tensor?``:
  the tensor when given, else the number. The backend gets back exactly what the caller
  passed (a number stays a number, a tensor a tensor), so both paths compute the same bits.
  A number becomes a constant of the graph: a new value recompiles, as for any Python
  float under torch.compile; a tensor is a graph input (lr schedules, CUDA graphs).
* ``sq_norm`` always returns ``(total, per_tensor)``; ``per_tensor`` is empty unless asked for.
* ``backend`` is a string argument: the backend is resolved before the op is called.

Every custom op has the same byte model as its primitive (see :mod:`sharpfused.ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import ops as _ops

Scalar = Union[float, Tensor]

__all__ = [
    "combine_",
    "dot_norms",
    "perturb_",
    "restore_",
    "restore_adamw_",
    "restore_sgd_",
    "sq_norm",
]


def _join(x: Optional[float], x_t: Optional[Tensor]) -> Optional[Scalar]:
    return x_t if x_t is not None else x


def _split(x: Optional[Scalar]) -> tuple[Optional[float], Optional[Tensor]]:
    """A number or a 0-d tensor as the schema's pair ``(x: float?, x_t: Tensor?)``."""
    if isinstance(x, Tensor):
        return 0.0, x
    return (None if x is None else float(x)), None


def _opt(xs: Optional[Sequence[Tensor]]) -> list[Tensor]:
    return [] if xs is None else list(xs)


def _none(xs: list[Tensor]) -> Optional[list[Tensor]]:
    return xs if xs else None


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduction_dtype(xs: Sequence[Tensor], mixed: Optional[torch.dtype] = None) -> torch.dtype:
    """dtype of a reduction's result: opmath of a one-dtype list; for mixed dtypes ``mixed``, or
    float64 when any input is float64, else float32 (the rule every backend follows)."""
    dtypes = {t.dtype for t in xs}
    if len(dtypes) == 1:
        return _opmath(xs[0].dtype)
    if mixed is not None:
        return mixed
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --------------------------------------------------------------------------- sq_norm
@torch.library.custom_op("sharpfused::sq_norm", mutates_args=())
def _sq_norm(
    xs: list[Tensor], weights: list[Tensor], eta: float, per_tensor: bool, backend: str
) -> tuple[Tensor, Tensor]:
    out = _ops.backend_module(backend).sq_norm(xs, _none(weights), eta, per_tensor)
    if per_tensor:
        return out[0], out[1]
    return out, out.new_empty(0)


@_sq_norm.register_fake
def _(xs, weights, eta, per_tensor, backend):
    dtype = _reduction_dtype(xs)
    return xs[0].new_empty((), dtype=dtype), xs[0].new_empty((len(xs) if per_tensor else 0,), dtype=dtype)


def sq_norm(
    xs: Sequence[Tensor],
    weights: Optional[Sequence[Tensor]] = None,
    eta: float = 0.0,
    per_tensor: bool = False,
    *,
    backend: str = "torch",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`sharpfused.ops.sq_norm` through ``torch.ops.sharpfused.sq_norm``."""
    total, per = _sq_norm(list(xs), _opt(weights), float(eta), per_tensor, backend)
    return (total, per) if per_tensor else total


# --------------------------------------------------------------------------- perturb_
@torch.library.custom_op("sharpfused::perturb_", mutates_args=("params", "backup"))
def _perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    backup: list[Tensor],
    scale: float,
    scale_t: Optional[Tensor],
    eta: Optional[float],
    mask: list[Tensor],
    backend: str,
) -> None:
    _ops.backend_module(backend).perturb_(params, grads, _none(backup), _join(scale, scale_t), eta, _none(mask))


@_perturb_.register_fake
def _(params, grads, backup, scale, scale_t, eta, mask, backend):
    return None


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
    """:func:`sharpfused.ops.perturb_` through ``torch.ops.sharpfused.perturb_``."""
    s, s_t = _split(scale)
    _perturb_(list(params), list(grads), _opt(backup), s, s_t, None if eta is None else float(eta), _opt(mask), backend)


# --------------------------------------------------------------------------- restore_
@torch.library.custom_op("sharpfused::restore_", mutates_args=("params",))
def _restore_(params: list[Tensor], backup: list[Tensor], backend: str) -> None:
    _ops.backend_module(backend).restore_(params, backup)


@_restore_.register_fake
def _(params, backup, backend):
    return None


def restore_(params: Sequence[Tensor], backup: Sequence[Tensor], *, backend: str = "torch") -> None:
    """:func:`sharpfused.ops.restore_` through ``torch.ops.sharpfused.restore_``."""
    _restore_(list(params), list(backup), backend)


# --------------------------------------------------------------------------- dot_norms
@torch.library.custom_op("sharpfused::dot_norms", mutates_args=())
def _dot_norms(a: list[Tensor], b: list[Tensor], backend: str) -> Tensor:
    return _ops.backend_module(backend).dot_norms(a, b)


@_dot_norms.register_fake
def _(a, b, backend):
    return a[0].new_empty((3,), dtype=_reduction_dtype(a, mixed=torch.float64))


def dot_norms(a: Sequence[Tensor], b: Sequence[Tensor], *, backend: str = "torch") -> Tensor:
    """:func:`sharpfused.ops.dot_norms` through ``torch.ops.sharpfused.dot_norms``."""
    return _dot_norms(list(a), list(b), backend)


# --------------------------------------------------------------------------- combine_
@torch.library.custom_op("sharpfused::combine_", mutates_args=("g",))
def _combine_(
    g: list[Tensor],
    saved: list[Tensor],
    c1: float,
    c1_t: Optional[Tensor],
    c2: float,
    c2_t: Optional[Tensor],
    backend: str,
) -> None:
    _ops.backend_module(backend).combine_(g, saved, _join(c1, c1_t), _join(c2, c2_t))


@_combine_.register_fake
def _(g, saved, c1, c1_t, c2, c2_t, backend):
    return None


def combine_(g: Sequence[Tensor], saved: Sequence[Tensor], c1: Scalar, c2: Scalar, *, backend: str = "torch") -> None:
    """:func:`sharpfused.ops.combine_` through ``torch.ops.sharpfused.combine_``.

    ``saved`` may be ``g`` itself with ``c2 = 0`` (how the base class scales gradients alone);
    torch.library promises nothing for an argument that aliases a mutated one, so that case
    is checked (compiled, eager result) rather than assumed.
    """
    a, a_t = _split(c1)
    b, b_t = _split(c2)
    _combine_(list(g), list(saved), a, a_t, b, b_t, backend)


# --------------------------------------------------------------------------- restore_sgd_
@torch.library.custom_op("sharpfused::restore_sgd_", mutates_args=("params", "momentum_buffers"))
def _restore_sgd_(
    params: list[Tensor],
    backup: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    lr_t: Optional[Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    init_momentum: bool,
    grad_coef: Optional[float],
    grad_coef_t: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    _ops.backend_module(backend).restore_sgd_(
        params,
        backup,
        grads,
        _none(momentum_buffers),
        _join(lr, lr_t),
        momentum,
        dampening,
        weight_decay,
        nesterov,
        init_momentum,
        _join(grad_coef, grad_coef_t),
        found_inf,
    )


@_restore_sgd_.register_fake
def _(
    params,
    backup,
    grads,
    momentum_buffers,
    lr,
    lr_t,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    init_momentum,
    grad_coef,
    grad_coef_t,
    found_inf,
    backend,
):
    return None


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
    """:func:`sharpfused.ops.restore_sgd_` through ``torch.ops.sharpfused.restore_sgd_``."""
    lr_, lr_t = _split(lr)
    gc, gc_t = _split(grad_coef)
    _restore_sgd_(
        list(params),
        list(backup),
        list(grads),
        _opt(momentum_buffers),
        lr_,
        lr_t,
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(init_momentum),
        gc,
        gc_t,
        found_inf,
        backend,
    )


# --------------------------------------------------------------------------- restore_adamw_
@torch.library.custom_op("sharpfused::restore_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _restore_adamw_(
    params: list[Tensor],
    backup: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: float,
    step_t: Optional[Tensor],
    lr: float,
    lr_t: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_coef: Optional[float],
    grad_coef_t: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    _ops.backend_module(backend).restore_adamw_(
        params,
        backup,
        grads,
        exp_avgs,
        exp_avg_sqs,
        _join(step, step_t),
        _join(lr, lr_t),
        beta1,
        beta2,
        eps,
        weight_decay,
        _join(grad_coef, grad_coef_t),
        found_inf,
    )


@_restore_adamw_.register_fake
def _(
    params,
    backup,
    grads,
    exp_avgs,
    exp_avg_sqs,
    step,
    step_t,
    lr,
    lr_t,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_coef,
    grad_coef_t,
    found_inf,
    backend,
):
    return None


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
    """:func:`sharpfused.ops.restore_adamw_` through ``torch.ops.sharpfused.restore_adamw_``.

    An integer ``step`` travels as a float: ``beta**5.0 == beta**5`` in Python, so the bias
    corrections are the same bits.
    """
    st, st_t = _split(step)
    lr_, lr_t = _split(lr)
    gc, gc_t = _split(grad_coef)
    _restore_adamw_(
        list(params),
        list(backup),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        st,
        st_t,
        lr_,
        lr_t,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        gc,
        gc_t,
        found_inf,
        backend,
    )
