"""The primitives as ``torch.library`` custom ops (namespace ``sharpfused``), so torch.compile sees them.

A compiled region (``torch.compile`` of a step, or of any function that calls
:mod:`sharpfused.ops`) cannot trace into the backends: they keep Python-side caches
(workspaces, multi-tensor tables), launch Triton or CUDA kernels, and on CPU read a skip
flag on the host. So each primitive is one opaque custom op: the graph holds one node per
call, its implementation runs the primitive's dispatch (:func:`sharpfused.ops.call`) eagerly,
and a fake (meta) implementation gives the output shapes and dtypes for tracing. In-place
primitives declare what they write, so functionalization and inductor order them correctly
against the rest of the graph.

Every op -- schema, mutated arguments, fake -- is generated from the primitive's entry in
:data:`sharpfused.spec.SPECS`; :mod:`sharpfused.ops` routes a call here only while
``torch.compiler.is_compiling()``. The one scalar encoding on the schema side:

* An optional list of tensors (``list?``: ``weights``, ``backup``, ``mask``,
  ``momentum_buffers``) is a list, the empty list meaning None. Primitives never take empty
  lists otherwise, so this is unambiguous.
* A number-or-0-d-tensor scalar (``scalar``: ``scale``, ``c1``, ``c2``, ``lr``, ``step``,
  ``grad_coef``) is two arguments, ``x: float`` and ``x_t: Tensor?``: the tensor when given,
  else the number. The backend gets back exactly what the caller passed (a number stays a
  number, a tensor a tensor), so both paths compute the same bits. A number becomes a
  constant of the graph: a new value recompiles, as for any Python float under torch.compile;
  a tensor is a graph input (lr schedules, CUDA graphs). An integer ``step`` travels as a
  float: ``beta**5.0 == beta**5`` in Python, so the bias corrections are the same bits.
* ``sq_norm`` always returns ``(total, per_tensor)``; ``per_tensor`` is empty unless asked for.
* ``backend`` is a string argument: the backend is resolved before the op is called.

Every custom op has the same byte model as its primitive (see :mod:`sharpfused.spec`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import ops as _ops
from .spec import SPECS, Primitive

__all__ = ["call"]

_SCHEMA_TYPE = {
    "list": "Tensor[]",
    "list?": "Tensor[]",
    "float": "float",
    "float?": "float?",
    "bool": "bool",
    "tensor?": "Tensor?",
}
_RESULT = {"none": "()", "sq_norm": "(Tensor, Tensor)", "vector3": "Tensor"}


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduction_dtype(xs: list[Tensor], mixed: Optional[torch.dtype] = None) -> torch.dtype:
    """dtype of a reduction's result: opmath of a one-dtype list; for mixed dtypes ``mixed``, or
    float64 when any input is float64, else float32 (the rule of ops' group join)."""
    dtypes = {t.dtype for t in xs}
    if len(dtypes) == 1:
        return _opmath(xs[0].dtype)
    if mixed is not None:
        return mixed
    return torch.float64 if torch.float64 in dtypes else torch.float32


def schema(p: Primitive) -> str:
    """The custom op's schema: ``scalar`` arguments as pairs, mutated lists annotated."""
    args, alias = [], 0
    for a in p.args:
        if a.kind in ("scalar", "scalar?"):
            args += [f"float{'?' if a.kind == 'scalar?' else ''} {a.name}", f"Tensor? {a.name}_t"]
            continue
        t = _SCHEMA_TYPE[a.kind]
        if "w" in a.io:
            t = f"Tensor(a{alias}!)[]"
            alias += 1
        args.append(f"{t} {a.name}")
    return f"({', '.join(args + ['str backend'])}) -> {_RESULT[p.result]}"


def _encode(p: Primitive, args: tuple) -> list:
    """Arguments in the spec's order -> the op's arguments."""
    out: list = []
    for a, x in zip(p.args, args):
        if a.kind in ("scalar", "scalar?"):
            out += [0.0, x] if isinstance(x, Tensor) else [None if x is None else float(x), None]
        elif a.kind == "list":
            out.append(list(x))
        elif a.kind == "list?":
            out.append([] if x is None else list(x))
        elif a.kind in ("float", "float?"):
            out.append(None if x is None else float(x))
        elif a.kind == "bool":
            out.append(bool(x))
        else:
            out.append(x)
    return out


def _decode(p: Primitive, flat: tuple) -> tuple:
    """The op's arguments (backend last) -> arguments in the spec's order."""
    out, i = [], 0
    for a in p.args:
        if a.kind in ("scalar", "scalar?"):
            out.append(flat[i + 1] if flat[i + 1] is not None else flat[i])
            i += 2
            continue
        x = flat[i]
        out.append((x if x else None) if a.kind == "list?" else x)
        i += 1
    return tuple(out)


def _fake(p: Primitive) -> Callable[..., Any]:
    def fake(*flat: Any) -> Any:
        args = _decode(p, flat[:-1])
        if p.result == "sq_norm":
            xs, per_tensor = args[0], args[p.names.index("per_tensor")]
            dtype = _reduction_dtype(xs)
            return xs[0].new_empty((), dtype=dtype), xs[0].new_empty((len(xs) if per_tensor else 0,), dtype=dtype)
        if p.result == "vector3":
            return args[0][0].new_empty((3,), dtype=_reduction_dtype(args[0], mixed=torch.float64))
        return None

    return fake


def _impl(p: Primitive) -> Callable[..., Any]:
    def impl(*flat: Any) -> Any:
        args = _decode(p, flat[:-1])
        out = _ops.call(p.name, args, flat[-1])
        if p.result == "sq_norm":
            if args[p.names.index("per_tensor")]:
                return out[0], out[1]
            return out, out.new_empty(0)
        return out

    return impl


_OPS: dict[str, Any] = {}
for _p in SPECS.values():
    _op = torch.library.custom_op(f"sharpfused::{_p.name}", _impl(_p), mutates_args=_p.mutates, schema=schema(_p))
    _op.register_fake(_fake(_p))
    _OPS[_p.name] = _op
del _p, _op


def call(name: str, args: tuple, backend: str) -> Any:
    """Primitive ``name`` (arguments in the spec's order) through ``torch.ops.sharpfused.<name>``."""
    p = SPECS[name]
    out = _OPS[name](*_encode(p, args), backend)
    if p.result == "sq_norm" and not args[p.names.index("per_tensor")]:
        return out[0]
    return out
