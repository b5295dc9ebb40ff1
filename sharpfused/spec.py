"""The primitives' contracts, written once.

Each :class:`Primitive` lists its arguments in the order every backend function takes them
(positionally), which lists it writes, what it returns and how many bytes per parameter element
it moves. Everything else derives from this table:

* the public typed functions of :mod:`sharpfused.ops` (signature, docstring, dispatch),
* the ``torch.library`` custom ops of :mod:`sharpfused.library` (schema, fake, scalar encoding),
* the backend conformance test (``tests/test_spec.py``: every backend function has exactly
  these parameter names, in this order),
* the byte counts of ``bench/run.py`` (:meth:`Primitive.bytes`) and the docs' table
  (:func:`table`).

Argument kinds:

``list``       a non-empty list of tensors of one device
``list?``      the same or None (the custom op passes None as the empty list)
``scalar``     a Python number or a 0-d tensor, never read on the host inside a step (the custom
               op takes it as two arguments, ``x: float`` and ``x_t: Tensor?``)
``scalar?``    the same or None
``float``, ``float?``, ``bool``  Python values (constants of a compiled graph)
``tensor?``    a 0-d device tensor or None (``found_inf``)

Byte models count, per element of the lists given, one ``b`` (bytes per element of the list's
dtype) for each list read and each list written (``io``); a list passed as None costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

#: a marker: the argument has no default
REQUIRED: Any = object()

#: added to a norm before dividing by it (``perturb_``'s ``norm_sq``; the optimizers' inverse norms)
NORM_EPS = 1e-12

KINDS = ("list", "list?", "scalar", "scalar?", "float", "float?", "bool", "tensor?")


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    default: Any = REQUIRED
    keyword: bool = False  # keyword-only in the public function
    io: str = ""  # lists: "r" read, "w" written, "rw" both (the byte model)
    read_unless: Optional[str] = None  # a bool argument that, when true, means the list is written only
    to_device: bool = False  # scalars, tensor?: a tensor on another device than the lists is moved to theirs
    required_when: Optional[str] = None  # optional lists: must be given when this float argument is nonzero
    minimum: Optional[float] = None  # scalars given as numbers: the least value allowed
    real: bool = False  # tensor?: a real number (not bool, not complex)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"argument {self.name}: unknown kind {self.kind!r}")


@dataclass(frozen=True)
class Primitive:
    name: str
    args: tuple[Arg, ...]
    result: str  # "none" | "sq_norm" ((total, per_tensor) or total) | "vector3" (3 entries)
    does: str  # one line for the docs table
    doc: str
    notes: tuple[str, ...] = field(default=())

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @cached_property
    def lists(self) -> tuple[int, ...]:
        """Positions of the tensor-list arguments."""
        return tuple(i for i, a in enumerate(self.args) if a.kind in ("list", "list?"))

    @property
    def mutates(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if "w" in a.io)

    def bytes(self, values: dict[str, Any]) -> int:
        """Bytes per parameter element (units of b) one call moves with these argument values."""
        n = 0
        for a in self.args:
            if a.kind not in ("list", "list?") or values.get(a.name) is None:
                continue
            n += "w" in a.io
            n += "r" in a.io and not (a.read_unless is not None and values.get(a.read_unless))
        return n

    def typical_bytes(self) -> int:
        """Bytes of the typical call: every list given but the optional inputs that default to None
        (ASAM's weights, SSAM's mask); what bench/run.py times each primitive with."""
        return self.bytes({a.name: True for a in self._typical_lists()})

    def _typical_lists(self) -> list[Arg]:
        return [a for a in self.args if a.kind == "list" or (a.kind == "list?" and a.default is REQUIRED)]

    def traffic(self) -> str:
        """The byte model in words, every optional list given."""
        reads = [a.name for a in self.args if "r" in a.io]
        writes = [a.name for a in self.args if "w" in a.io]
        return f"read {len(reads)}b ({', '.join(reads)}), write {len(writes)}b ({', '.join(writes)})"


def _p(name: str, *args: Arg, result: str = "none", does: str, doc: str) -> Primitive:
    return Primitive(name, tuple(args), result, does, doc)


L, OL = "list", "list?"

# every fused base step: restore from the backup and step with the gradients (first), the
# unscale/clip factor and the device skip flag (last; Adam's decoupled flag follows them)
_STEP_HEAD = (Arg("params", L, io="w"), Arg("backup", L, io="r"), Arg("grads", L, io="r"))
_STEP_TAIL = (Arg("grad_coef", "scalar?", None, keyword=True), Arg("found_inf", "tensor?", None, keyword=True))

SPECS: dict[str, Primitive] = {
    p.name: p
    for p in (
        _p(
            "sq_norm",
            Arg("xs", L, io="r"),
            Arg("weights", OL, None, io="r"),
            Arg("eta", "float", 0.0),
            Arg("per_tensor", "bool", False),
            result="sq_norm",
            does="sum((T*x)^2), T = |w|+eta (ASAM) or 1",
            doc="""Squared L2 norm ``sum_i sum((T_i * x_i)**2)`` with ``T_i = |w_i| + eta`` (ASAM) or 1.

Returns a 0-d opmath tensor on the list's device; with ``per_tensor=True`` also a 1-d tensor of
each tensor's squared norm. Non-finite inputs give a non-finite result.""",
        ),
        _p(
            "perturb_",
            Arg("params", L, io="rw"),
            Arg("grads", L, io="r"),
            Arg("backup", OL, io="w"),
            Arg("scale", "scalar", to_device=True),
            Arg("eta", "float?", None),
            Arg("mask", OL, None),  # one byte per element: not counted in units of b
            Arg("norm_sq", "tensor?", None, keyword=True, to_device=True, real=True),
            does="backup <- w; w <- w + scale*T^2*g (*mask)",
            doc="""``backup <- w`` (skipped when ``backup`` is None), then ``w <- w + scale * T^2 * g [* mask]``.

``T = |w| + eta`` (evaluated at the incoming w) when ``eta`` is not None, else 1. A scale equal
to zero drops the term: w keeps its bits even where g is inf or NaN (the optimizers pass scale 0
when the gradient norm is not finite, so the next forward sees finite weights).

``norm_sq``: a 0-d opmath tensor on the lists' device (a squared norm, from ``sq_norm``); when
given, the kernel scales by ``scale * inv`` with ``inv = 1 / (sqrt(norm_sq) + 1e-12)`` computed
on the device in opmath (each operation correctly rounded), and ``inv = 0`` when ``norm_sq`` is
not finite (or negative: its square root is NaN): SAM's ``rho / (||g|| + eps)`` with no separate
scalar launches. One element, read on the device only (never on the host).""",
        ),
        _p(
            "restore_",
            Arg("params", L, io="w"),
            Arg("backup", L, io="r"),
            does="w <- backup, bit-exact",
            doc="``w <- backup``, bit-exact.",
        ),
        _p(
            "dot_norms",
            Arg("a", L, io="r"),
            Arg("b", L, io="r"),
            result="vector3",
            does="(<a,b>, |a|^2, |b|^2) in one pass",
            doc="``(<a,b>, |a|^2, |b|^2)`` over all tensors, as one 1-d opmath tensor of 3 entries.",
        ),
        _p(
            "combine_",
            Arg("g", L, io="rw"),
            Arg("saved", L, io="r"),
            Arg("c1", "scalar", to_device=True),
            Arg("c2", "scalar", to_device=True),
            does="g <- c1*g + c2*saved",
            doc="""``g <- c1 * g + c2 * saved``; a coefficient equal to zero drops its term entirely.

So a non-finite input behind a zero coefficient never reaches the output: with device
coefficients chosen by a skip flag (``torch.where(skip, 1, c1)``, ``torch.where(skip, 0, c2)``)
an algorithm keeps its state unchanged on a skipped step without a host sync.""",
        ),
        _p(
            "restore_sgd_",
            *_STEP_HEAD,
            Arg("momentum_buffers", OL, io="rw", read_unless="init_momentum", required_when="momentum"),
            Arg("lr", "scalar", keyword=True),
            Arg("momentum", "float", keyword=True),
            Arg("dampening", "float", keyword=True),
            Arg("weight_decay", "float", keyword=True),
            Arg("nesterov", "bool", keyword=True),
            Arg("init_momentum", "bool", keyword=True),
            *_STEP_TAIL,
            does="w <- backup - lr*SGD(g) (momentum, nesterov, wd)",
            doc="""Restore fused with torch.optim.SGD's update, evaluated at the restored weights w0:

g' = grad_coef*g;  d = g' + wd*w0;  buf = d (first step) or momentum*buf + (1-dampening)*d;
d = d + momentum*buf (nesterov) or buf;  w = w0 - lr*d.
``momentum_buffers`` is None when momentum == 0; ``init_momentum`` marks the first step.
``grad_coef`` (unscale and clip factor) multiplies g first. ``found_inf``: a 0-d device tensor;
where nonzero the step is skipped on the device: w = w0 bit-exactly and the momentum buffers
keep their values (on an ``init_momentum`` step they become zeros).""",
        ),
        _p(
            "restore_adamw_",
            *_STEP_HEAD,
            Arg("exp_avgs", L, io="rw"),
            Arg("exp_avg_sqs", L, io="rw"),
            Arg("step", "scalar", keyword=True, minimum=1),
            Arg("lr", "scalar", keyword=True),
            Arg("beta1", "float", keyword=True),
            Arg("beta2", "float", keyword=True),
            Arg("eps", "float", keyword=True),
            Arg("weight_decay", "float", keyword=True),
            *_STEP_TAIL,
            Arg("decoupled", "bool", True, keyword=True),
            does="w <- Adam(W)(backup, g); moments updated",
            doc="""Restore fused with torch.optim.AdamW's update, or with ``decoupled=False``
torch.optim.Adam's (L2 weight decay); ``step`` already counts this step:

g' = grad_coef*g (+ wd*w0 when not decoupled); w0 = backup; m = b1*m + (1-b1)*g';
v = b2*v + (1-b2)*g'^2; w = w0*(1 - lr*wd when decoupled) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
``step`` is an int or a 0-d device tensor (bias corrections then computed on the device, so the
call needs no host value and can be captured in a CUDA graph). ``found_inf``: a 0-d device
tensor; where nonzero the step is skipped: w = w0 bit-exactly, m and v unchanged.""",
        ),
        _p(
            "restore_rmsprop_",
            *_STEP_HEAD,
            Arg("square_avgs", L, io="rw"),
            Arg("momentum_buffers", OL, io="rw", required_when="momentum"),
            Arg("lr", "scalar", keyword=True),
            Arg("alpha", "float", keyword=True),
            Arg("eps", "float", keyword=True),
            Arg("weight_decay", "float", keyword=True),
            Arg("momentum", "float", keyword=True),
            *_STEP_TAIL,
            does="w <- RMSprop(backup, g); square_avg (+ buf) updated",
            doc="""Restore fused with torch.optim.RMSprop's update (not centered), at w0 = backup:

g' = grad_coef*g + wd*w0; v = alpha*v + (1-alpha)*g'^2; avg = sqrt(v) + eps;
momentum > 0: buf = momentum*buf + g'/avg, w = w0 - lr*buf; else w = w0 - lr*g'/avg.
``momentum_buffers`` is None when momentum == 0 (torch creates them as zeros, so there is no
first-step case). ``found_inf``: a 0-d device tensor; where nonzero the step is skipped: w = w0
bit-exactly, v and buf unchanged.""",
        ),
    )
}

PRIMITIVES: tuple[str, ...] = tuple(SPECS)


def markdown() -> str:
    """The byte-model table of docs/benchmarks.md (a test keeps the two equal)."""
    rows = ["| primitive | does | reads | writes | b |", "|---|---|---|---|---|"]
    for p in SPECS.values():
        given = p._typical_lists()
        reads = ", ".join(a.name for a in given if "r" in a.io)
        writes = ", ".join(a.name for a in given if "w" in a.io)
        does = p.does.replace("|", "\\|")
        rows.append(f"| `{p.name}` | {does} | {reads} | {writes or '-'} | {p.typical_bytes()} |")
    rows.append("")
    rows.append("(`perturb_`'s optional `mask`, SSAM's and ESAM's, adds one byte per element read: not counted in units of b.)")
    return "\n".join(rows)


def table() -> str:
    """The docs' table of primitives (what each does, its byte model), from the specs."""
    rows = [(f"``{p.name}``", p.does, p.traffic()) for p in SPECS.values()]
    w = [max(len(r[i]) for r in rows + [("primitive", "does", "traffic")]) for i in range(3)]
    line = "  ".join("=" * n for n in w)
    head = "  ".join(h.ljust(n) for h, n in zip(("primitive", "does", "traffic"), w))
    body = ["  ".join(c.ljust(n) for c, n in zip(r, w)) for r in rows]
    return "\n".join([line, head, line, *body, line])
