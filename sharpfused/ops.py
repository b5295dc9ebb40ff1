"""The primitives: the one dispatch point between algorithms and backends.

Every sharpness-aware algorithm in :mod:`sharpfused.optim` is written in these few
operations. Their contracts -- argument order and kinds, what they write, what they return,
their byte models -- are one table, :data:`sharpfused.spec.SPECS`; the public functions
below are generated from it, so each has one signature and one meaning on every backend.

Conventions shared by every backend:

* Lists hold tensors of one device. ``params``/``grads``/``backup``/state lists are
  parallel (same length, same shapes). Empty tensors are allowed, empty lists are not.
* Math is done in "opmath": float32 for bf16/fp16/fp32 inputs, float64 for float64.
  A result written to a low-precision tensor is rounded once, at the end. (One exception: the
  torch backend on CPU computes bf16 norms with torch's own bf16 reductions, as torch does; its
  results stay within the design's error rule against a float64 reference.)
* ``restore_`` is bit-exact when backup and params share a dtype (else rounded once).
* Scalars (``scale``, ``lr``, coefficients) may be Python numbers or 0-d tensors on
  the device; a step never calls ``.item()`` on a device tensor.
* Reductions are deterministic: a fixed partition, fixed order, no atomics.
* ``found_inf`` (the fused base steps): a 0-d device tensor, nonzero to skip the step on the
  device -- the weights are restored bit-exactly and no optimizer state changes; no host sync.
* The primitives write tensors in place: call them under ``torch.no_grad()`` when a list holds
  parameters that require grad (the optimizers do; torch refuses an in-place write to such a leaf).

Dispatch (:func:`call`): the lists are split once by (device, dtype) of the first list -- one
group in the usual case (an optimizer bucket), checked without building keys --; each group
goes to the chosen backend when the backend's ``supports(name, lists)`` takes it, else to the
torch backend, counted in :data:`FALLBACKS` (float64 on Triton, non-contiguous tensors, a
primitive a backend does not define); results of several groups are joined here, once.
Backends are :class:`Backend` records; ``auto`` picks the available one of highest priority.
While torch.compile traces, a primitive goes to its custom op (:mod:`sharpfused.library`),
which the graph keeps as one opaque node that runs this same dispatch.

Byte models (b = bytes per parameter element, per element of the list):

"""

from __future__ import annotations

import collections
import importlib
import itertools
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import spec as _spec
from .lists import Tensors
from .spec import PRIMITIVES, REQUIRED, SPECS, Primitive

Scalar = Union[float, Tensor]

__doc__ += _spec.table() + "\n"


@dataclass(frozen=True)
class Backend:
    """A backend: the module that defines the primitives (each taking one (device, dtype) group,
    positionally, in the spec's order; optionally ``supports(name, lists) -> bool``), the device
    types it runs on and its priority for ``auto``."""

    name: str
    module: str
    devices: tuple[str, ...]
    priority: int


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "sharpfused.backends.torch_ops", ("*",), 0),
        Backend("triton", "sharpfused.kernels", ("cuda",), 1),
        Backend("cuda", "sharpfused.backends.cuda_ops", ("cuda",), 2),
    )
}
BACKENDS: tuple[str, ...] = tuple(REGISTRY)

#: (backend, primitive) -> groups sent to the torch backend instead (what the backend does not take)
FALLBACKS: collections.Counter = collections.Counter()

_loaded: dict[str, ModuleType] = {}
_why_not: dict[str, str] = {}


def _load(name: str) -> Optional[ModuleType]:
    if name in _loaded:
        return _loaded[name]
    if name in _why_not:
        return None
    try:
        mod = importlib.import_module(REGISTRY[name].module)
    except Exception as exc:  # ImportError, or a toolchain that fails to load
        _why_not[name] = f"{type(exc).__name__}: {exc}"
        return None
    if name == "torch":
        missing = [p for p in PRIMITIVES if not hasattr(mod, p)]
        if missing:  # the torch backend is every other backend's fallback: it must be complete
            _why_not[name] = f"module {REGISTRY[name].module} lacks {', '.join(missing)}"
            return None
    _loaded[name] = mod
    return mod


def _devices(name: str) -> tuple[str, ...]:
    devs = REGISTRY[name].devices
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return devs + ("cpu",)
    return devs


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name not in REGISTRY:
        return f"unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
    devs = _devices(name)
    if "*" not in devs and device.type not in devs:
        if device.type == "cpu":
            return f"backend {name!r} runs on CUDA tensors only" + (
                " (or on CPU with TRITON_INTERPRET=1 set before triton is imported)" if name == "triton" else ""
            )
        return f"backend {name!r} does not support device type {device.type!r}"
    if _load(name) is None:
        return f"backend {name!r} is not available: {_why_not[name]}"
    return None


def resolve(name: str, device: torch.device) -> str:
    """Resolve ``"auto"`` (the available backend of highest priority for the device: cuda > triton >
    torch on CUDA, torch elsewhere) and check availability.

    Raises ValueError naming the backend and the reason when it cannot run on ``device``.
    """
    device = torch.device(device)
    if name == "auto":
        for cand in sorted(REGISTRY.values(), key=lambda b: -b.priority):
            if cand.name != "torch" and device.type == "cpu":
                continue  # the interpreter is for tests: auto never picks it
            if unavailable_reason(cand.name, device) is None:
                return cand.name
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


# ---------------------------------------------------------------------------------------- dispatch
_KIND = operator.attrgetter("device", "dtype")


def _numels(xs: Sequence[Tensor]) -> tuple[int, ...]:
    known = getattr(xs, "info", None)
    return known.numels if known is not None else tuple(map(Tensor.numel, xs))


def _check(p: Primitive, args: tuple) -> None:
    """The spec's contract, checked once per call with an error naming the argument: lists are lists
    of tensors, parallel (same length, same sizes), given when required; flags are tensors; numbers
    in range."""
    pos = p.lists
    first = args[pos[0]]
    for i in pos:
        a, x = p.args[i], args[i]
        if x is None:
            if a.kind == "list" or (a.required_when is not None and args[p.names.index(a.required_when)]):
                why = "" if a.kind == "list" else f" when {a.required_when} is nonzero"
                raise ValueError(f"{p.name}: {a.name} must be a list of tensors{why}, got None")
        elif not isinstance(x, (list, tuple)) or not (isinstance(x, Tensors) or all(map(isinstance, x, _TENSOR))):
            raise TypeError(f"{p.name}: {a.name} must be a list (or tuple) of tensors, got {type(x).__name__}")
    if not first:
        raise ValueError(f"{p.name}: primitives take a non-empty list of tensors ({p.args[pos[0]].name} is empty)")
    n, sizes = len(first), None
    for i in pos[1:]:
        o = args[i]
        if o is None:
            continue
        if len(o) != n:
            raise ValueError(f"{p.name}: parallel lists differ in length: {p.args[pos[0]].name} has {n}, {p.args[i].name} {len(o)}")
        sizes = _numels(first) if sizes is None else sizes
        if _numels(o) != sizes:
            j = next(j for j, (u, v) in enumerate(zip(sizes, _numels(o))) if u != v)
            raise ValueError(
                f"{p.name}: parallel lists differ at tensor {j}: {p.args[pos[0]].name} has {sizes[j]} elements, "
                f"{p.args[i].name} {_numels(o)[j]}"
            )
    for a, x in zip(p.args, args):
        if a.kind == "tensor?" and x is not None:
            if not isinstance(x, Tensor):
                raise TypeError(f"{p.name}: {a.name} must be None or a 0-d tensor, got {type(x).__name__}")
            if x.numel() != 1:
                raise ValueError(f"{p.name}: {a.name} must be a one-element tensor, got shape {tuple(x.shape)}")
            if a.real and (x.dtype == torch.bool or x.is_complex()):
                raise TypeError(f"{p.name}: {a.name} must be a real number (a float or integer tensor), got {x.dtype}")
        if a.minimum is not None and not isinstance(x, Tensor) and x is not None and x < a.minimum:
            raise ValueError(f"{p.name}: {a.name} must be >= {a.minimum}, got {x}")


_TENSOR = itertools.repeat(Tensor)  # isinstance's second argument, for a C-level map
_AVAILABLE: set = set()  # (backend, device) pairs checked by unavailable_reason once


def _split(p: Primitive, args: tuple) -> Optional[list[tuple[list[int], tuple]]]:
    """None when the lists form one group (the usual case); else ``[(index, args), ...]`` per
    (device, dtype) of the first list, with every list argument narrowed to ``index``."""
    pos = p.lists
    first = args[pos[0]]
    known = getattr(first, "info", None)  # a Tensors list (sharpfused.lists): described once
    if (known.dtype is not None) if known is not None else len(set(map(_KIND, first))) == 1:
        return None
    by: dict[tuple, list[int]] = {}
    for i, t in enumerate(first):
        by.setdefault((t.device, t.dtype), []).append(i)
    out = []
    for idx in by.values():
        sub = list(args)
        for i in pos:
            if sub[i] is not None:
                sub[i] = [args[i][j] for j in idx]
        out.append((idx, tuple(sub)))
    return out


def _run(p: Primitive, args: tuple, backend: str) -> Any:
    """One group on ``backend``, or on the torch backend when the backend does not take it."""
    mod = _loaded.get(backend) or backend_module(backend)
    if backend != "torch":
        # each list described once for this call (supports() and the launch table both read it);
        # a Tensors list (the optimizer's own) keeps the description it was built with
        args = tuple(
            Tensors(a) if i in p.lists and a is not None and not isinstance(a, Tensors) else a for i, a in enumerate(args)
        )
        fn = getattr(mod, p.name, None)
        supports = getattr(mod, "supports", None)
        if fn is not None and (supports is None or supports(p.name, [args[i] for i in p.lists])):
            return fn(*args)
        FALLBACKS[(backend, p.name)] += 1
        mod = _loaded.get("torch") or backend_module("torch")
    return getattr(mod, p.name)(*args)


def call(name: str, args: tuple, backend: str = "torch") -> Any:
    """Primitive ``name`` with its arguments in the spec's order (positional), on ``backend``."""
    p = SPECS[name]
    _check(p, args)
    if backend != "torch":
        dev = args[p.lists[0]][0].device
        if (backend, dev) not in _AVAILABLE:
            why = unavailable_reason(backend, dev)
            if why is not None:
                raise ValueError(f"{name}(backend={backend!r}) on {dev}: {why}")
            _AVAILABLE.add((backend, dev))
    groups = _split(p, args)
    if groups is None:
        return _run(p, args, backend)
    results = [(idx, _run(p, a, backend)) for idx, a in groups]
    return _JOIN[p.result](p, args, results)


def _join_none(p: Primitive, args: tuple, results: list) -> None:
    return None


def _join_sq_norm(p: Primitive, args: tuple, results: list) -> Any:
    """Several groups: the totals summed, in float64 when any group is float64; per-tensor results
    back in list order by slicing and one ``torch.cat`` (no index tensor: no host-to-device copy in
    a step, nothing a CUDA graph would have to hold)."""
    per_tensor = args[p.names.index("per_tensor")]
    totals = [r[0] if per_tensor else r for _, r in results]
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in totals) else totals[0].dtype
    total = torch.stack([t.to(out_dtype) for t in totals]).sum()
    if not per_tensor:
        return total
    where = {}  # position in the list -> (group, position in the group)
    for k, (idx, _) in enumerate(results):
        for j, i in enumerate(idx):
            where[i] = (k, j)
    pers = [r[1].to(out_dtype) for _, r in results]
    pieces, run = [], None  # runs of consecutive positions of one group
    for i in range(len(where)):
        k, j = where[i]
        if run is not None and run[0] == k and run[2] == j:
            run[2] = j + 1
        else:
            if run is not None:
                pieces.append(pers[run[0]][run[1] : run[2]])
            run = [k, j, j + 1]
    pieces.append(pers[run[0]][run[1] : run[2]])
    return total, torch.cat(pieces)


def _join_vector3(p: Primitive, args: tuple, results: list) -> Tensor:
    return torch.stack([r.double() for _, r in results]).sum(0)


_JOIN = {"none": _join_none, "sq_norm": _join_sq_norm, "vector3": _join_vector3}


class _Bound:
    """The primitives of one backend, called positionally in the spec's order (tests, bench)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        if name not in SPECS:
            raise AttributeError(name)
        return lambda *args: call(name, tuple(args) + tuple(_defaults(SPECS[name], len(args))), self.backend)


def _defaults(p: Primitive, given: int) -> list:
    rest = p.args[given:]
    missing = [a.name for a in rest if a.default is REQUIRED]
    if missing:
        raise TypeError(f"{p.name}() missing arguments: {', '.join(missing)}")
    return [a.default for a in rest]


def on(backend: str) -> _Bound:
    """``on("triton").sq_norm(xs, None, 0.0, True)``: primitives bound to one backend, positional
    arguments in the spec's order, through the dispatcher (grouping and fallback included)."""
    return _Bound(backend)


# ---------------------------------------------------------------------------------------- public functions
class _Library:
    """sharpfused.library, looked up at call time (it imports this module)."""

    @staticmethod
    def call(name: str, args: tuple, backend: str) -> Any:
        return library.call(name, args, backend)


def _generate(p: Primitive) -> Any:
    """The public function of primitive ``p``: its signature and docstring from the spec."""
    params, kw_started = [], False
    for a in p.args:
        if a.keyword and not kw_started:
            params.append("*")
            kw_started = True
        params.append(a.name if a.default is REQUIRED else f"{a.name}=_d[{a.name!r}]")
    params.append("backend='torch'" if kw_started else "*, backend='torch'")
    moves = [a.name for a in p.args if a.kind in ("scalar", "scalar?", "tensor?") and a.to_device]
    names = ", ".join(p.names) + ","
    lines = [f"def {p.name}({', '.join(params)}):"]
    for m in moves:  # a tensor coefficient made elsewhere (e.g. a skip flag's device) follows the list
        first = p.args[p.lists[0]].name
        lines.append(f"    if isinstance({m}, _Tensor) and {first} and {m}.device != {first}[0].device:")
        lines.append(f"        {m} = {m}.to({first}[0].device)")
    lines.append("    if _compiling():")
    lines.append(f"        return _library.call({p.name!r}, ({names}), backend)")
    lines.append(f"    return _call({p.name!r}, ({names}), backend)")
    ns: dict[str, Any] = {
        "_d": {a.name: a.default for a in p.args},
        "_compiling": torch.compiler.is_compiling,
        "_call": call,
        "_Tensor": Tensor,
        "_library": _Library,
    }
    exec("\n".join(lines), ns)  # noqa: S102  (source built from the spec table above, no user input)
    fn = ns[p.name]
    fn.__module__ = __name__
    fn.__qualname__ = p.name
    fn.__doc__ = p.doc
    return fn


for _p in SPECS.values():
    globals()[_p.name] = _generate(_p)
del _p

__all__ = ["BACKENDS", "FALLBACKS", "PRIMITIVES", "REGISTRY", "Backend", "backend_module", "call", "on",
           "resolve", "unavailable_reason", *PRIMITIVES]

from . import library  # noqa: E402  (imports ops back: the custom ops run call())
