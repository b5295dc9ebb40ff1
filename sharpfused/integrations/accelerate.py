"""sharpfused with Hugging Face accelerate.

``accelerator.prepare`` wraps an optimizer in ``accelerate.optimizer.AcceleratedOptimizer``, which
(a) has no ``first_step``/``second_step``/``perturbed``/... (it forwards nothing but ``step``,
``zero_grad``, ``state_dict`` and the param groups) and (b) reports ``step_was_skipped`` from
GradScaler's bookkeeping only: a sharpness-aware step skipped for non-finite gradients reads as
taken, so a prepared scheduler (and ``accelerator.optimizer_step_was_skipped``) steps anyway.

:func:`prepare` (or :func:`wrap` on an already prepared optimizer) fixes both in place, and
:func:`sam_step` takes one whole step -- every pass over every micro-batch -- through the
accelerator (its ``backward``, so GradScaler scales the losses; the prepared optimizer's ``step``,
so GradScaler unscales and skips inside the optimizer)::

    model, opt, sched, loader = prepare(accelerator, model, opt, sched, loader)
    for micro_batches in chunks(loader, 2):
        loss = sam_step(accelerator, opt, loss_fn, micro_batches, model=model)
        sched.step()           # does nothing after a skipped step
        opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer

from ..optim import MESA, BiSAM, LookSAM, SAMPa, SharpnessAware
from ..optim.rst import SwitchingSAM

__all__ = ["SAMAcceleratedOptimizer", "prepare", "wrap", "unwrap", "sam_step", "run_sam_passes", "step_was_skipped"]


class SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """``AcceleratedOptimizer`` around a sharpfused optimizer (made by :func:`wrap`, in place).

    * Public attributes it does not have itself are read from the sharpfused optimizer
      (``first_step``, ``second_step``, ``perturbed``, ``last_step_skipped``, ``step_accumulated``, ...).
    * ``step_was_skipped`` is True when the last step was skipped: GradScaler's overflow as before,
      or the sharpfused optimizer's ``last_step_skipped`` (read on the host: one sync per call).
    * ``step()`` after a step that already completed inside its passes (a LookSAM reuse step,
      SAMPa's ``step(closure)``; see :func:`run_sam_passes`) does nothing, once.
    """

    _sam_done = False  # set by run_sam_passes(..., defer=True) when the step completed without a finish

    def __getattr__(self, name: str) -> Any:  # only reached when ordinary lookup fails
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            inner = self.__dict__["optimizer"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(inner, name)

    def step(self, closure: Optional[Callable[..., Any]] = None) -> Any:
        if self._sam_done:
            self._sam_done = False
            return None
        return super().step(closure)

    @property
    def step_was_skipped(self) -> bool:
        if self._is_overflow:
            return True
        return step_was_skipped(self.optimizer)


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's wrappers (``AcceleratedOptimizer.optimizer``, nested)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def step_was_skipped(optimizer: Any) -> bool:
    """Whether the last step of a sharpfused optimizer (wrapped or not) was skipped (host read)."""
    flag = getattr(unwrap(optimizer), "last_step_skipped", None)
    return bool(flag) if flag is not None else False


def wrap(optimizer: AcceleratedOptimizer) -> AcceleratedOptimizer:
    """Turn a prepared optimizer around a sharpfused optimizer into a :class:`SAMAcceleratedOptimizer`
    (in place: the accelerator's own list holds the same object, so ``accelerator.optimizer_step_was_skipped``
    and prepared schedulers see the fix). Anything else is returned unchanged."""
    if isinstance(optimizer, AcceleratedOptimizer) and isinstance(unwrap(optimizer), SharpnessAware):
        if not isinstance(optimizer, SAMAcceleratedOptimizer):
            optimizer.__class__ = SAMAcceleratedOptimizer
        _rewrap_scheduler_patch(optimizer)
    return optimizer


def _rewrap_scheduler_patch(optimizer: SAMAcceleratedOptimizer) -> None:
    """A torch LR scheduler built on the prepared optimizer replaced its ``step`` by an instance
    attribute that calls the class's ``step`` of that time (AcceleratedOptimizer's): point it at ours."""
    old = optimizer.__dict__.get("step")
    if old is None or not getattr(old, "_wrapped_by_lr_sched", False) or getattr(old, "_sharpfused", False):
        return
    ref = weakref.ref(optimizer)

    @functools.wraps(SAMAcceleratedOptimizer.step)
    def step(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # what the scheduler's own wrapper records
        return SAMAcceleratedOptimizer.step(opt, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    step._sharpfused = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


def prepare(accelerator: Any, *args: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*args, **kwargs)``, then :func:`wrap` on every prepared sharpfused optimizer."""
    out = accelerator.prepare(*args, **kwargs)
    for opt in getattr(accelerator, "_optimizers", []):
        wrap(opt)
    return out


def _check_scaler(opt: SharpnessAware, scaler: Any) -> None:
    if scaler is None:
        return
    if isinstance(opt, SAMPa):
        raise RuntimeError(
            "SAMPa with fp16 mixed precision (a GradScaler): SAMPa takes its whole step inside step(closure), "
            "where GradScaler cannot unscale the gradients; use bf16 mixed precision (no loss scaling) or another "
            "algorithm"
        )
    if isinstance(opt, SwitchingSAM):
        raise RuntimeError(
            f"{type(opt).__name__} with fp16 mixed precision (a GradScaler): a plain step takes the base step "
            "inside first_step(), before GradScaler.step() could unscale the gradients, so the update would use "
            "scaled gradients; use bf16 mixed precision (no loss scaling), or the manual loop with "
            "first_step(zero_grad=True, grad_scaler=scaler)"
        )
    if isinstance(opt, MESA):
        raise RuntimeError(
            "MESA with fp16 mixed precision (a GradScaler): its one pass per step completes the step inside "
            "first_step() (the base step), before GradScaler.step() could unscale the gradients, so the update "
            "would use scaled gradients; use bf16 mixed precision (no loss scaling), or the plain loop "
            "scaler.scale(loss).backward(); scaler.step(opt); scaler.update() (MESA's step() is one pass)"
        )
    if isinstance(opt, LookSAM) and opt.k > 1:
        raise RuntimeError(
            "LookSAM (k > 1) with fp16 mixed precision (a GradScaler): a reuse step takes the base step inside "
            "first_step(), before GradScaler.step() could unscale the gradients, so the update would use scaled "
            "gradients; use bf16 mixed precision (no loss scaling), or LookSAM(k=1) (= SAM)"
        )


def run_sam_passes(
    opt: SharpnessAware,
    run_pass: Callable[..., Any],
    finish: Optional[Callable[[], Any]],
    *,
    first_done: bool = False,
    scaler: Any = None,
) -> tuple[Any, bool]:
    """Drive one step of any sharpfused algorithm with the manual protocol.

    ``run_pass(perturbation=...)`` runs forward and backward over every micro-batch of the step and
    returns their (mean) loss; ``perturbation`` is True for the pass whose gradient sets the
    perturbation direction (BiSAM backpropagates its lower bound there) and False otherwise.
    ``finish()`` completes the step (the framework's optimizer step, which calls ``second_step``
    -- through ``GradScaler.step`` under fp16); ``finish=None``: the caller completes it (the
    weights are left perturbed, with the last pass's gradients in ``.grad``). ``first_done``: the first pass's gradients are
    already in ``.grad``. Returns ``(first-pass loss or None, finished)``; ``finished`` is False when
    the step completed inside the passes (LookSAM reuse step, SAMPa) and ``finish`` was not called.
    On an exception the step is aborted (weights restored bit-exactly) before it propagates.
    """
    _check_scaler(opt, scaler)
    if isinstance(opt, SAMPa):  # step(closure) only: it places the weights before each of its passes
        if first_done:
            raise RuntimeError("SAMPa: the first pass must not have run (SAMPa has no pass at w after its first step)")
        return opt.step(lambda: run_pass(perturbation=False)), False
    loss = None
    try:
        if not first_done:
            loss = run_pass(perturbation=True)
        full = opt.first_step(zero_grad=True)
        if full is False:  # LookSAM reuse step: the base step is taken already
            return loss, False
        opt.remaining_passes(lambda: run_pass(perturbation=False))  # XSAM's ascents, BSAM's bilateral pass
        last = run_pass(perturbation=False)
    except BaseException:
        opt.abort_step()
        opt.zero_grad(set_to_none=True)
        raise
    opt.last_perturbed_loss = _detach(last)
    if finish is None:
        return loss, True
    finish()
    if opt.perturbed:  # the framework did not step (e.g. accelerate's sync_gradients was False)
        opt.abort_step()
        raise RuntimeError(
            f"{type(opt).__name__}: the optimizer step did not run after the passes (the accelerator's "
            "sync_gradients is False?); the step was aborted. Take a SAM step once per optimizer step, at the sync step"
        )
    return loss, True


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def sam_step(
    accelerator: Any,
    optimizer: Any,
    loss_fn: Callable[..., Any],
    micro_batches: Iterable[Any],
    *,
    model: Optional[torch.nn.Module] = None,
    perturbation_loss_fn: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """One whole step of a prepared sharpfused optimizer over ``micro_batches``; returns the
    first-pass mean loss (detached; SAMPa: the loss at its perturbed point).

    Every pass runs ``loss_fn(batch)`` on every micro-batch and backpropagates it through
    ``accelerator.backward`` with a weight of ``1/len(micro_batches)``, so the step equals the
    step on their union (same-size micro-batches, a mean loss). The accelerator's own
    ``gradient_accumulation_steps`` division is compensated. With ``model`` (the prepared model),
    the backwards of all but the last micro-batch run under ``accelerator.no_sync(model)``.
    BiSAM: ``perturbation_loss_fn(batch)`` gives the loss of its perturbation pass (e.g.
    ``sharpfused.losses.bisam_lower_bound`` of the logits); it is required.
    The step ends with ``optimizer.step()`` (GradScaler's step under fp16). Call it once per
    optimizer step, outside ``accelerator.accumulate()``; ``optimizer.step_was_skipped``
    (after :func:`prepare`/:func:`wrap`) then says whether the step was skipped.
    """
    opt = unwrap(optimizer)
    if not isinstance(opt, SharpnessAware):
        raise TypeError(f"sam_step needs a (prepared) sharpfused optimizer, got {type(opt).__name__}")
    if isinstance(optimizer, AcceleratedOptimizer):
        wrap(optimizer)
    batches: Sequence[Any] = list(micro_batches)
    if not batches:
        raise ValueError("sam_step needs at least one micro-batch")
    if not accelerator.sync_gradients:
        raise RuntimeError(
            "sam_step called while accelerator.sync_gradients is False (inside accelerator.accumulate() on a "
            "non-sync micro-batch): the prepared optimizer would not step. sam_step takes the whole step over its "
            "micro-batches; call it once per optimizer step, outside accelerator.accumulate()"
        )
    if isinstance(opt, BiSAM) and perturbation_loss_fn is None:
        raise ValueError(
            "BiSAM's perturbation pass backpropagates a lower bound of the 0-1 loss, not the training loss: pass "
            "perturbation_loss_fn=lambda batch: sharpfused.losses.bisam_lower_bound(logits, labels) (or use SAM, "
            "which is BiSAM with the training loss in both passes)"
        )
    n = len(batches)
    gas = getattr(accelerator, "gradient_accumulation_steps", 1)

    def weighted(loss: torch.Tensor) -> torch.Tensor:  # accelerator.backward divides by gas
        if gas == n:
            return loss
        if gas == 1:
            return loss / n
        return loss * (gas / n)

    def run_pass(perturbation: bool = False) -> Any:
        fn = perturbation_loss_fn if (perturbation and isinstance(opt, BiSAM)) else loss_fn
        if isinstance(opt, BiSAM):
            opt.perturbation_pass = perturbation
        total = None
        for i, mb in enumerate(batches):
            ctx = accelerator.no_sync(model) if (model is not None and i < n - 1) else contextlib.nullcontext()
            with ctx:
                loss = fn(mb)
                accelerator.backward(weighted(loss))
            total = loss.detach() if total is None else total + loss.detach()
        if isinstance(opt, BiSAM):
            opt.perturbation_pass = None
        return total / n

    finish = optimizer.step if isinstance(optimizer, AcceleratedOptimizer) else opt.step
    if opt.has_first_pass_grads():
        raise RuntimeError(
            "sam_step: gradients are present before the step (call optimizer.zero_grad() after each step); "
            "sam_step runs the first pass itself"
        )
    loss, _ = run_sam_passes(opt, run_pass, finish, scaler=getattr(accelerator, "scaler", None))
    return loss
