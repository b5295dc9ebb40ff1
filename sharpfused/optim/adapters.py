"""Base optimizers the fused base step knows: one record per ``torch.optim`` class.

The fused base step restores the unperturbed weights and takes the base optimizer's step in one
pass (one primitive call per bucket). It writes the base optimizer's own state tensors, under
torch.optim's own keys, created the way torch creates them, so ``base_optimizer.state_dict()``
is what torch's step would have left and an unfused continuation (``base_optimizer.step()``)
carries on from it. A record (:class:`Adapter`) says, for one class:

* ``unfusable(group)``: why a param group cannot take the fused step (amsgrad, centered, ...),
  or None. The conditions shared by every class (maximize, differentiable, capturable outside
  ``torch.compile``) are checked by :func:`lookup`; foreach/fused flags change nothing here.
* ``layout(group)``: the group values that decide which state tensors exist (SGD's and
  RMSprop's momentum on or off); the bucket's view of the state is rebuilt when it changes.
* ``prepare(base, bucket)``: the bucket's view of the state (a dict with at least ``"init"``:
  the state was made for this step), creating missing state like torch; None when the state
  cannot be taken as it is (then the step runs unfused and torch itself decides).
* ``step(base, bucket, view, coef, found_inf, skipped)``: the primitive call. ``found_inf`` is
  the skip flag on the bucket's device (the primitives skip on the device: weights restored bit
  for bit, state unchanged); ``skipped`` is its host value, read only on a step that creates
  state (``view["init"]``), so that a skipped first step leaves no state behind.

Any other class (torch.optim.Muon, a subclass of SGD, ...) runs unfused: restore, then
``base_optimizer.step()`` after one host read of the skip flag. Adding a class: a primitive
``restore_<name>_`` (``sharpfused/spec.py`` and one function per backend) and a record here.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from ..lists import Tensors  # the state lists, described once for the view's life
from . import base as _base  # circular: read at call time only (kernel_view)

if TYPE_CHECKING:
    from .base import Bucket


@dataclass(frozen=True)
class Adapter:
    name: str
    classes: tuple[type, ...]
    unfusable: Callable[[dict], Optional[str]]
    layout: Callable[[dict], Any]
    prepare: Callable[[Optimizer, Bucket], Optional[dict]]
    step: Callable[[Optimizer, Bucket, dict, Optional[Tensor], Tensor, Optional[bool]], None]


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives a ``step`` count (float32, float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _nonzero(x: Any) -> bool:
    return not (isinstance(x, numbers.Number) and x == 0)


def _fresh_states(base: Optimizer, b: Bucket) -> Optional[tuple[list[dict], bool]]:
    """(states, all fresh) of the bucket's parameters; None when some have state and some not."""
    st = base.state
    fresh = [not st.get(p) for p in b.sources]
    if any(fresh) and not all(fresh):
        return None
    return [st[p] for p in b.sources], all(fresh)


def _device_steps(b: Bucket, states: list[dict]) -> list[Tensor]:
    """The step counts, on the device (as torch's capturable steps are): a skipped step must not
    count, and that is only known on the device."""
    if b.device.type != "cpu":
        for s in states:
            s["step"] = s["step"].to(b.device)
    return [s["step"] for s in states]


def _count(steps: list[Tensor], found: Tensor) -> None:
    """steps += 1 unless skipped; the list overload keeps the count on the device (a 0-d tensor as
    foreach's "scalar" would be read back to the host: a sync per step)."""
    inc = (~found).to(steps[0].device, steps[0].dtype)
    torch._foreach_add_(steps, [inc] * len(steps))


def _undo_fresh(base: Optimizer, b: Bucket) -> None:
    """A skipped step that created the state: the state goes, the weights are restored."""
    for p in b.sources:
        base.state.pop(p, None)
    b.base_state = None
    ops.restore_(b.params, b.backup.views, backend=b.backend)


# ------------------------------------------------------------------------------------------- SGD
def _sgd_layout(g: dict) -> bool:
    return _nonzero(g.get("momentum", 0))


def _sgd_prepare(base: Optimizer, b: Bucket) -> Optional[dict]:
    if not _sgd_layout(b.group):  # no buffer read or written, as torch's SGD with momentum 0
        return {"bufs": None, "init": False}
    bufs = [base.state.get(p, {}).get("momentum_buffer") for p in b.sources]
    init = bufs[0] is None
    if any((x is None) != init for x in bufs):
        return None
    if init:  # put into the state once the step is known not skipped (torch makes them at the first step)
        bufs = [torch.empty_like(p, memory_format=torch.preserve_format) for p in b.sources]
    return {"bufs": Tensors([_base.kernel_view(x) for x in bufs]), "init": init, "state_bufs": bufs}


def _sgd_step(
    base: Optimizer, b: Bucket, s: dict, coef: Optional[Tensor], found: Tensor, skipped: Optional[bool]
) -> None:
    g = b.group
    ops.restore_sgd_(
        b.params, b.backup.views, b.grads(), s["bufs"], lr=g["lr"], momentum=g["momentum"],
        dampening=g["dampening"], weight_decay=g["weight_decay"], nesterov=g["nesterov"],
        init_momentum=s["init"], grad_coef=coef, found_inf=found, backend=b.backend,
    )  # fmt: skip
    if s["init"] and not skipped:
        for p, buf in zip(b.sources, s["state_bufs"]):
            base.state[p]["momentum_buffer"] = buf
        s["init"] = False


# -------------------------------------------------------------------------------- Adam and AdamW
def _adam_unfusable(g: dict) -> Optional[str]:
    if g.get("amsgrad"):
        return "amsgrad"
    if any(isinstance(x, Tensor) for x in g["betas"]):
        return "tensor betas"  # the primitive takes them as constants
    return None


def _adam_prepare(base: Optimizer, b: Bucket) -> Optional[dict]:
    got = _fresh_states(base, b)
    if got is None:
        return None
    states, fresh = got
    if fresh:
        for p, s in zip(b.sources, states):
            s["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if len({float(s["step"]) for s in states}) != 1:  # one count per bucket; read once per bucket build
        return None
    return {
        "steps": _device_steps(b, states),
        "m": Tensors([_base.kernel_view(s["exp_avg"]) for s in states]),
        "v": Tensors([_base.kernel_view(s["exp_avg_sq"]) for s in states]),
        "init": fresh,  # state created for this step: removed again if it is skipped
    }


def _adam_step(
    base: Optimizer, b: Bucket, s: dict, coef: Optional[Tensor], found: Tensor, skipped: Optional[bool]
) -> None:
    if s["init"] and skipped:
        return _undo_fresh(base, b)
    g = b.group
    steps = s["steps"]
    _count(steps, found)
    beta1, beta2 = g["betas"]
    ops.restore_adamw_(
        b.params, b.backup.views, b.grads(), s["m"], s["v"], step=steps[0].to(b.device), lr=g["lr"], beta1=beta1,
        beta2=beta2, eps=g["eps"], weight_decay=g["weight_decay"], grad_coef=coef, found_inf=found,
        decoupled=bool(g.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW))), backend=b.backend,
    )  # fmt: skip
    s["init"] = False


# ---------------------------------------------------------------------------------------- RMSprop
def _rmsprop_unfusable(g: dict) -> Optional[str]:
    # centered keeps a third state (grad_avg): six lists with the momentum buffer, more than the
    # CUDA tables take (five); it runs unfused
    return "centered" if g.get("centered") else None


def _rmsprop_layout(g: dict) -> bool:
    return g["momentum"] > 0


def _rmsprop_prepare(base: Optimizer, b: Bucket) -> Optional[dict]:
    got = _fresh_states(base, b)
    if got is None:
        return None
    states, fresh = got
    momentum = _rmsprop_layout(b.group)
    if fresh:
        for p, s in zip(b.sources, states):
            s["step"] = torch.zeros((), dtype=_scalar_dtype())
            s["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if momentum:
                s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if momentum and any("momentum_buffer" not in s for s in states):
        return None  # momentum turned on after the state was made: torch's own step decides
    return {
        "steps": _device_steps(b, states),
        "v": Tensors([_base.kernel_view(s["square_avg"]) for s in states]),
        "bufs": Tensors([_base.kernel_view(s["momentum_buffer"]) for s in states]) if momentum else None,
        "init": fresh,
    }


def _rmsprop_step(
    base: Optimizer, b: Bucket, s: dict, coef: Optional[Tensor], found: Tensor, skipped: Optional[bool]
) -> None:
    if s["init"] and skipped:
        return _undo_fresh(base, b)
    g = b.group
    _count(s["steps"], found)  # RMSprop's update does not read it
    ops.restore_rmsprop_(
        b.params, b.backup.views, b.grads(), s["v"], s["bufs"], lr=g["lr"], alpha=g["alpha"], eps=g["eps"],
        weight_decay=g["weight_decay"], momentum=g["momentum"], grad_coef=coef, found_inf=found, backend=b.backend,
    )  # fmt: skip
    s["init"] = False


def _none(g: dict) -> None:
    return None


# ------------------------------------------------------------------- buckets of mixed state layout
class _Part:
    """The parameters of one bucket that share a state layout (all fresh, or one step count): what
    a record's prepare and step read of a bucket, for a slice of it."""

    def __init__(self, b: Bucket, idx: list[int]) -> None:
        self.bucket, self.idx = b, idx
        self.sources = [b.sources[i] for i in idx]
        self.params = [b.params[i] for i in idx]
        self.backup = SimpleNamespace(views=[b.backup.views[i] for i in idx])
        self.group, self.device, self.backend = b.group, b.device, b.backend
        self.base_state: Optional[dict] = None

    def grads(self) -> list[Tensor]:
        g = self.bucket.grads()
        return [g[i] for i in self.idx]


def _in_parts(prepare: Callable, layout_of: Callable[[Optimizer, Tensor], Any]) -> Callable:
    """A record's prepare for a bucket whose parameters' states differ in layout -- some created,
    some not (a parameter that had no gradient until now), or different step counts: one view per
    layout (:class:`_Part`), each stepped by the same fused primitive, as torch's own step treats
    each parameter by its own state. Without this such a bucket ran unfused (torch's step in the
    parameter dtype: in fp16 another result than the fused opmath step)."""

    def run(base: Optimizer, b: Bucket) -> Optional[dict]:
        view = prepare(base, b)
        if view is not None:
            return view
        by: dict[Any, list[int]] = {}
        for i, p in enumerate(b.sources):  # read once per bucket build, as the uniform check is
            by.setdefault(layout_of(base, p), []).append(i)
        if len(by) == 1:
            return None  # uniform, yet not fusable: torch's own step decides
        parts = []
        for idx in by.values():
            part = _Part(b, idx)
            v = prepare(base, part)
            if v is None:
                return None
            parts.append((part, v))
        return {"parts": parts, "init": any(v["init"] for _, v in parts)}

    return run


def _steps_in_parts(step: Callable) -> Callable:
    def run(base: Optimizer, b: Bucket, s: dict, coef: Optional[Tensor], found: Tensor, skipped: Optional[bool]) -> None:
        if "parts" not in s:
            return step(base, b, s, coef, found, skipped)
        for part, v in s["parts"]:
            step(base, part, v, coef, found, skipped)
        if s["init"] and skipped:
            b.base_state = None  # state made for a step that did not happen was removed: prepare again
        s["init"] = any(v["init"] for _, v in s["parts"])

    return run


def _state_layout(base: Optimizer, p: Tensor) -> Any:
    """Adam's and RMSprop's per-parameter layout: (created?, step count)."""
    s = base.state.get(p)
    return (False, None) if not s else (True, float(s["step"]))


def _created(base: Optimizer, p: Tensor) -> bool:
    """RMSprop's per-parameter layout: its update does not read the step count."""
    return bool(base.state.get(p))


def _sgd_state_layout(base: Optimizer, p: Tensor) -> bool:
    return base.state.get(p, {}).get("momentum_buffer") is not None


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "sgd", (torch.optim.SGD,), _none, _sgd_layout, _in_parts(_sgd_prepare, _sgd_state_layout),
        _steps_in_parts(_sgd_step),
    ),
    Adapter(
        "adam", (torch.optim.Adam, torch.optim.AdamW), _adam_unfusable, _none,
        _in_parts(_adam_prepare, _state_layout), _steps_in_parts(_adam_step),
    ),
    Adapter(
        "rmsprop", (torch.optim.RMSprop,), _rmsprop_unfusable, _rmsprop_layout,
        _in_parts(_rmsprop_prepare, _created), _steps_in_parts(_rmsprop_step),
    ),
)  # fmt: skip
#: exact classes only: a subclass may change the step, so it runs its own (unfused)
BY_CLASS: dict[type, Adapter] = {cls: a for a in ADAPTERS for cls in a.classes}

_disabled = 0


@contextmanager
def unfused() -> Iterator[None]:
    """Inside, every base optimizer takes the unfused path (restore + ``base_optimizer.step()``):
    the reference the fused path is tested against."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def why_unfused(base: Optimizer) -> Optional[str]:
    """Why ``base`` takes the unfused step now, or None when an adapter takes it."""
    if _disabled:
        return "fusion disabled (adapters.unfused())"
    a = BY_CLASS.get(type(base))
    if a is None:
        return f"no adapter for {type(base).__name__}"
    groups = base.param_groups
    # while torch.compile traces, dynamo marks every group capturable; the fused primitives take
    # device scalars and skip on the device, so they serve capturable steps as they are
    if not torch.compiler.is_compiling() and any(g.get("capturable") for g in groups):
        return "capturable"
    for g in groups:
        why = "maximize" if g.get("maximize") else "differentiable" if g.get("differentiable") else a.unfusable(g)
        if why is not None:
            return why
    return None


def lookup(base: Optimizer) -> Optional[Adapter]:
    """The adapter that takes ``base``'s step now, or None (unfused: see :func:`why_unfused`)."""
    return None if why_unfused(base) is not None else BY_CLASS[type(base)]
