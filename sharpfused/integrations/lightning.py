"""PyTorch Lightning integration: :class:`SAMLightningModule` and :class:`SharpnessAwareChecks`.

A sharpness-aware step is several forward/backward passes around one update. Lightning's
automatic optimization is built for one pass per update, so a plain ``LightningModule`` with a
sharpfused optimizer trains wrong in ways that are easy to miss (BatchNorm statistics advance in
every pass, the logged loss mixes the passes, ``accumulate_grad_batches`` perturbs with one
micro-batch and updates with another, fp16 AMP raises). :class:`SAMLightningModule` overrides
``optimizer_step`` so that one Lightning optimizer step is one complete step of the algorithm:

* every pass runs the user's ``training_step`` through Lightning's own closure / strategy
  (autocast, gradient scaling, backward hooks); only the first pass of a step logs
  (``self.log`` / ``self.log_dict`` are quiet in the later passes) and the step's output (the
  loss Lightning shows and hands to ``on_train_batch_end``) is the first pass's;
* BatchNorm running statistics advance once per step (``bn_model`` is set to the module when the
  optimizer has none);
* ``Trainer(gradient_clip_val=c)`` becomes the optimizer's ``max_grad_norm=c``: the update
  gradient is clipped by norm inside the step (unscaled first under fp16);
* ``Trainer(accumulate_grad_batches=k)`` gives the large-batch step: the micro-batches of the
  step are kept and every later pass runs over all of them;
* ``precision="16-mixed"``: pass 1, ``first_step()``, then Lightning's ``MixedPrecision`` plugin
  runs the last pass and ``scaler.step(opt)``, which is ``second_step()`` with the unscale and the
  overflow skip on the device;
* manual optimization: :meth:`SAMLightningModule.sam_manual_step` goes through the
  ``LightningOptimizer``, so ``trainer.global_step`` advances.

What Lightning (or the algorithm) makes impossible is refused at the first step with the reason
and the alternative, never trained silently wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from ..optim import BSAM, XSAM, BiSAM, LookSAM, SAMPa, SharpnessAware
from ..optim.mesa import MESA

__all__ = ["SAMLightningModule", "SharpnessAwareChecks", "SharpnessAwareLightningError", "sharpness_aware_optimizer"]


class SharpnessAwareLightningError(RuntimeError):
    """A configuration in which Lightning would train a sharpfused optimizer wrong."""


def sharpness_aware_optimizer(optimizer: Any) -> Optional[SharpnessAware]:
    """The sharpfused optimizer behind ``optimizer`` (a ``LightningOptimizer`` or the optimizer itself), else None."""
    raw = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer keeps the optimizer in _optimizer
    return raw if isinstance(raw, SharpnessAware) else None


def _two_pass(opt: SharpnessAware) -> bool:
    """Whether the step is first_step / one backward / second_step (the protocol GradScaler can drive)."""
    if isinstance(opt, (LookSAM, BSAM, SAMPa, MESA)):  # MESA: one pass, first_step() completes the step
        return False
    if isinstance(opt, XSAM) and opt.steps != 1:
        return False
    return True


def _scaler(trainer: pl.Trainer) -> Any:
    """The GradScaler of the precision plugin (fp16 AMP), or None (fp32, bf16)."""
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    if scaler is None:
        return None
    if not isinstance(plugin, MixedPrecision):
        raise SharpnessAwareLightningError(
            f"the precision plugin {type(plugin).__name__} uses a gradient scaler that sharpfused's Lightning "
            "integration does not drive (only MixedPrecision's, precision='16-mixed'); use precision='bf16-mixed' "
            "or '32-true'"
        )
    return scaler


def _loss_of(output: Any) -> Optional[torch.Tensor]:
    """The loss of a ``training_step`` output (a tensor, or a dict with 'loss'), as Lightning reads it."""
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and output.get("loss") is not None:
        return output["loss"]
    raise SharpnessAwareLightningError(
        "training_step must return the loss (a tensor) or a dict with a 'loss' entry for every pass of a "
        f"sharpness-aware step; got {type(output).__name__}"
    )


class SharpnessAwareChecks(Callback):
    """Guards a run that uses a sharpfused optimizer.

    Added by :class:`SAMLightningModule` itself (``configure_callbacks``), where it also keeps the
    micro-batches of an accumulated step. Give it to ``Trainer(callbacks=[...])`` with a plain
    ``LightningModule`` to have the configurations that train silently wrong refused:

    * automatic optimization (BatchNorm statistics of both passes, logged loss of both passes,
      accumulation and fp16 wrong or failing): refused at the start of training;
    * manual optimization where the optimizer completed a step that Lightning did not count
      (``first_step()`` / ``second_step()`` called on ``self.optimizers()``, so ``global_step``
      stays 0 and ``max_steps`` never ends; under fp16 that update also used the scaled
      gradients): refused at the end of that batch.
    """

    def __init__(self) -> None:
        self.micro_batches: list[tuple[Any, int]] = []
        self._steps = 0
        self._handles: list[Any] = []
        self._global_step_at_start = 0
        self._steps_at_start = 0

    def _count(self, *_: Any) -> None:
        self._steps += 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for opt in trainer.optimizers:
            raw = sharpness_aware_optimizer(opt)
            if raw is not None:
                self._handles.append(raw.register_step_post_hook(self._count))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._handles or isinstance(pl_module, SAMLightningModule):
            return
        if pl_module.automatic_optimization:
            raise SharpnessAwareLightningError(
                f"{type(pl_module).__name__} trains a sharpfused optimizer with Lightning's automatic optimization "
                "but is not a sharpfused.integrations.lightning.SAMLightningModule: Lightning would update "
                "BatchNorm statistics and log the loss in every pass of the step, take the perturbation from one "
                "micro-batch and the update from another under accumulate_grad_batches > 1, and fail under "
                "precision='16-mixed'. Derive the module from SAMLightningModule (same training_step), or use "
                "manual optimization with SAMLightningModule.sam_manual_step"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(pl_module, SAMLightningModule) and pl_module.automatic_optimization:
            if trainer.accumulate_grad_batches > 1:
                self.micro_batches.append((batch, batch_idx))
        self._global_step_at_start = trainer.global_step
        self._steps_at_start = self._steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            return
        took = self._steps - self._steps_at_start
        counted = trainer.global_step - self._global_step_at_start
        if took > counted:
            raise SharpnessAwareLightningError(
                f"the sharpfused optimizer completed {took} step(s) in this training_step but Lightning counted "
                f"{counted}: first_step()/second_step() called on self.optimizers() bypass the LightningOptimizer, "
                "so trainer.global_step does not advance (max_steps never ends, schedulers and checkpoints by step "
                "are off) and under precision='16-mixed' the update used gradients still multiplied by the loss "
                "scale. Take the step through the LightningOptimizer: SAMLightningModule.sam_manual_step(loss_fn), "
                "or self.optimizers().step(closure) with a closure that runs forward and self.manual_backward(loss)"
            )


class SAMLightningModule(pl.LightningModule):
    """A ``LightningModule`` whose optimizer step is a complete sharpness-aware step.

    Derive from it instead of ``LightningModule``; write ``training_step`` and
    ``configure_optimizers`` as usual (return a sharpfused optimizer, e.g.
    ``sharpfused.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)``). Non-sharpfused
    optimizers step as in Lightning.

    Class attributes: ``sam_freeze_bn`` (default True): set the optimizer's ``bn_model`` to this
    module when it has none, so that BatchNorm running statistics advance once per step.

    ``self.sam_first_pass`` is True while the step's first pass runs ``training_step`` (it is
    also True outside steps), False in the later passes.
    """

    #: sharpfused's optimizers refuse Lightning's automatic optimization from any other module
    _sharpfused_lightning = True

    sam_freeze_bn: bool = True

    # ------------------------------------------------------------------ state
    @property
    def sam_first_pass(self) -> bool:
        return not self.__dict__.get("_sam_quiet", False)

    @contextmanager
    def _sam_quiet_passes(self) -> Iterator[None]:
        prev = self.__dict__.get("_sam_quiet", False)
        self.__dict__["_sam_quiet"] = True
        try:
            yield
        finally:
            self.__dict__["_sam_quiet"] = prev

    def _sam_checks(self) -> SharpnessAwareChecks:
        checks = self.__dict__.get("_sam_checks_cb")
        if checks is None:
            checks = self.__dict__["_sam_checks_cb"] = SharpnessAwareChecks()
        return checks

    def configure_callbacks(self) -> Any:
        """Adds :class:`SharpnessAwareChecks` (keeps the micro-batches of an accumulated step).
        Override it as ``return [*super().configure_callbacks(), ...]``."""
        return [self._sam_checks()]

    # ------------------------------------------------------------------ logging: first pass only
    def log(self, *args: Any, **kwargs: Any) -> None:
        if self.sam_first_pass:
            super().log(*args, **kwargs)

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        if self.sam_first_pass:
            super().log_dict(*args, **kwargs)

    # ------------------------------------------------------------------ hooks Lightning calls
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        # in the later passes of a step the optimizer clears (and marks) the gradients itself; a
        # zero_grad here would drop the non-finite mark that makes GradScaler back off
        if self.sam_first_pass or sharpness_aware_optimizer(optimizer) is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        # a sharpfused optimizer clips the update gradient inside its step (max_grad_norm, mapped
        # from Trainer(gradient_clip_val=...) at each step); Lightning would clip every pass
        if sharpness_aware_optimizer(optimizer) is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _sam_prepare(self, opt: SharpnessAware) -> Any:
        """Checks and mappings done at every step (cheap); returns the GradScaler or None."""
        trainer = self.trainer
        overridden = type(self).configure_gradient_clipping is not SAMLightningModule.configure_gradient_clipping
        if overridden and self.automatic_optimization:  # (Lightning does not call it in manual optimization)
            raise SharpnessAwareLightningError(
                f"{type(self).__name__} overrides configure_gradient_clipping: with a sharpfused optimizer Lightning "
                "calls it after every pass of the step, so it would clip the perturbation's gradient too. Remove the "
                "override and pass max_grad_norm= to the optimizer (it clips the update gradient by norm, unscaled "
                "first under fp16), or Trainer(gradient_clip_val=...) which is mapped to it"
            )
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            algo = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
            if algo != "norm":
                raise SharpnessAwareLightningError(
                    f"Trainer(gradient_clip_algorithm={algo!r}): a sharpfused optimizer clips its update gradient by "
                    "norm only (max_grad_norm=), inside the step; clipping by value from Lightning would clip every "
                    "pass, the perturbation's included. Use gradient_clip_algorithm='norm' (mapped to max_grad_norm) "
                    "or the optimizer's max_grad_norm="
                )
            if opt.max_grad_norm is None:
                opt.max_grad_norm = float(clip)
                self.__dict__["_sam_clip_mapped"] = float(clip)
            elif opt.max_grad_norm != float(clip):
                raise SharpnessAwareLightningError(
                    f"Trainer(gradient_clip_val={clip}) and the optimizer's max_grad_norm={opt.max_grad_norm} disagree: "
                    "the update gradient is clipped once, by the optimizer; set one of them"
                )
        elif self.__dict__.get("_sam_clip_mapped") is not None and opt.max_grad_norm == self.__dict__["_sam_clip_mapped"]:
            opt.max_grad_norm = None  # mapped by an earlier fit whose Trainer clipped; this one does not
            self.__dict__["_sam_clip_mapped"] = None
        if self.sam_freeze_bn and opt.bn_model is None:
            opt.bn_model = self
        scaler = _scaler(trainer)
        if scaler is not None and scaler.is_enabled() and not _two_pass(opt):
            raise SharpnessAwareLightningError(
                f"{type(opt).__name__}{f'(steps={opt.steps})' if isinstance(opt, XSAM) else ''} under "
                "precision='16-mixed': its step is not first_step / one backward / second_step, so GradScaler "
                "cannot unscale it (LookSAM's reuse step updates inside first_step, XSAM with steps > 1 and BSAM "
                "take intermediate steps with scaled gradients, SAMPa places the weights itself). Use "
                "precision='bf16-mixed' (no loss scaling), or SAM, GSAM, BiSAM, SSAM, FriendlySAM, XSAM(steps=1)"
            )
        return scaler

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        opt = sharpness_aware_optimizer(optimizer)
        if opt is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        trainer = self.trainer
        scaler = self._sam_prepare(opt)
        accumulate = trainer.accumulate_grad_batches
        checks = self._sam_checks()
        micro = list(checks.micro_batches)
        checks.micro_batches.clear()
        if accumulate > 1:
            if isinstance(opt, SAMPa):
                raise SharpnessAwareLightningError(
                    "SAMPa with accumulate_grad_batches > 1: SAMPa's passes are at two points it places itself, and "
                    "Lightning has already run the micro-batches' first pass at w. Use a larger batch, or another "
                    "algorithm"
                )
            if not micro or micro[-1][1] != batch_idx:
                raise SharpnessAwareLightningError(
                    "accumulate_grad_batches > 1 needs the micro-batches of the step, which SAMLightningModule keeps "
                    "through its SharpnessAwareChecks callback; a configure_callbacks override dropped it: return "
                    "[*super().configure_callbacks(), ...]"
                )
        closure = optimizer_closure
        if isinstance(opt, SAMPa):  # every pass is SAMPa's own (none at w): the closure runs them all
            first = [True]

            def samp_closure() -> Any:
                # the pass that logs and gives the step's output is the one at x~ (opt.perturbed),
                # whose loss SAMPa.step returns; the others (at y, and at x on the first step) are quiet
                if first[0] and opt.perturbed:
                    first[0] = False
                    out = closure()
                    saved = getattr(closure, "_result", None)
                    self.__dict__["_sam_saved_result"] = saved
                    return out
                with self._sam_quiet_passes():
                    return closure()

            try:
                optimizer.step(closure=samp_closure)
            finally:
                saved = self.__dict__.pop("_sam_saved_result", None)
                if saved is not None:
                    closure._result = saved
            return None

        # pass 1: Lightning's closure (training_step, zero_grad, backward of the last micro-batch;
        # the earlier micro-batches' passes 1 ran in Lightning's accumulation phase)
        loss1 = closure()
        saved = getattr(closure, "_result", None)
        if loss1 is None:  # training_step returned None: Lightning skips the step (no backward)
            return None

        if accumulate > 1:
            strategy = trainer.strategy

            def later_pass() -> Any:
                total = None
                last = len(micro) - 1
                for i, (mb, idx) in enumerate(micro):
                    with _no_sync(strategy, block=i != last):
                        loss = _loss_of(strategy.training_step(mb, idx))
                        if loss is None:
                            raise SharpnessAwareLightningError(
                                "training_step returned None in a later pass of an accumulated sharpness-aware step"
                            )
                        loss = loss / accumulate
                        strategy.backward(loss, optimizer)
                    total = loss.detach() if total is None else total + loss.detach()
                return total

        else:

            def later_pass() -> Any:
                return closure()

        try:
            with self._sam_quiet_passes():
                if _two_pass(opt):
                    kwargs = {}
                    if scaler is not None and "grad_scaler" in inspect.signature(opt.first_step).parameters:
                        kwargs["grad_scaler"] = scaler  # FriendlySAM: its momentum holds unscaled gradients
                    opt.first_step(zero_grad=True, **kwargs)
                    # the precision plugin runs the last pass, on_before_optimizer_step, then
                    # opt.step(closure) (fp32, bf16) or scaler.step(opt) (fp16): both are second_step()
                    # (BiSAM calls a closure without a perturbation keyword as it is: its perturbation_pass)
                    optimizer.step(closure=later_pass)
                else:  # LookSAM, XSAM(steps > 1), BSAM: step(closure) takes pass 1 from .grad, runs the rest
                    optimizer.step(closure=later_pass)
        finally:
            if saved is not None:
                closure._result = saved  # the step's output is its first pass's
            if opt.perturbed:  # an exception left the step half done: weights back at w
                opt.abort_step()
        return None

    # ------------------------------------------------------------------ manual optimization
    def sam_manual_step(
        self,
        loss_fn: Callable[..., Any],
        micro_batches: Optional[Sequence[Any]] = None,
        optimizer: Any = None,
    ) -> Any:
        """One complete sharpness-aware step in manual optimization (``automatic_optimization = False``).

        ``loss_fn()`` (or ``loss_fn(mb)`` for each of ``micro_batches``) runs the forward and returns
        the loss, without calling backward; it is called once per pass, with ``self.manual_backward``
        of ``loss`` (``loss / len(micro_batches)``) after it, so the step over micro-batches equals the
        large-batch step. The step goes through ``self.optimizers()`` (the LightningOptimizer): the
        precision plugin, and ``trainer.global_step`` advances by one. Logging inside ``loss_fn`` is
        kept for the first pass only. Returns the first pass's (mean) loss, detached.
        """
        lopt = optimizer if optimizer is not None else self.optimizers()
        if isinstance(lopt, (list, tuple)):
            raise SharpnessAwareLightningError("several optimizers: pass the sharpfused one as optimizer=")
        opt = sharpness_aware_optimizer(lopt)
        if opt is None:
            raise SharpnessAwareLightningError(f"sam_manual_step needs a sharpfused optimizer, got {type(lopt).__name__}")
        if self.automatic_optimization:
            raise SharpnessAwareLightningError(
                "sam_manual_step is for manual optimization (self.automatic_optimization = False); with automatic "
                "optimization SAMLightningModule takes the whole step itself"
            )
        if micro_batches is not None and isinstance(opt, SAMPa):
            raise SharpnessAwareLightningError("SAMPa has no accumulated step (its passes are at points it places itself)")
        scaler = self._sam_prepare(opt)
        batches = None if micro_batches is None else list(micro_batches)
        if batches is not None and not batches:
            raise ValueError("micro_batches is empty")
        calls = [0]
        first_loss: list[Any] = [None]

        def one_pass() -> Any:
            quiet = self._sam_quiet_passes() if calls[0] > 0 else nullcontext()
            with quiet:
                if batches is None:
                    loss = loss_fn()
                    self.manual_backward(loss)
                    total = loss.detach()
                else:
                    total = None
                    for mb in batches:
                        loss = loss_fn(mb)
                        self.manual_backward(loss / len(batches))
                        total = loss.detach() if total is None else total + loss.detach()
                    total = total / len(batches)
            if calls[0] == 0:
                first_loss[0] = total
            calls[0] += 1
            return total

        opt.zero_grad(set_to_none=True)
        try:
            if scaler is not None and scaler.is_enabled():
                # MixedPrecision runs the closure once, then scaler.step(opt) = second_step() (unscaled)
                kwargs = {"grad_scaler": scaler} if "grad_scaler" in inspect.signature(opt.first_step).parameters else {}

                def fp16_closure() -> Any:
                    loss = one_pass()
                    opt.first_step(zero_grad=True, **kwargs)
                    one_pass()
                    return loss

                lopt.step(closure=fp16_closure)
            elif isinstance(opt, BiSAM):
                # BiSAM.step(closure) calls closure(perturbation=...), which the precision plugin's
                # closure wrapper does not accept: the passes here, counted as the LightningOptimizer counts
                getattr(lopt, "_on_before_step", lambda: None)()
                one_pass()
                opt.first_step(zero_grad=True)
                one_pass()
                _after_closure(self.trainer, self, opt)
                opt.second_step(zero_grad=True)
                getattr(lopt, "_on_after_step", lambda: None)()
            else:
                lopt.step(closure=one_pass)
        finally:
            if opt.perturbed:
                opt.abort_step()
        return first_loss[0]


def _after_closure(trainer: pl.Trainer, module: pl.LightningModule, opt: SharpnessAware) -> None:
    """What the precision plugin runs between the closure and the step (on_before_optimizer_step
    hooks; the clipping hook, a no-op here), for a step that cannot go through the plugin."""
    hook = getattr(trainer.precision_plugin, "_after_closure", None)
    if hook is not None:
        hook(module, opt)


def _no_sync(strategy: Any, block: bool) -> Any:
    """DDP's no_sync for the micro-batches before the last, as Lightning's accumulation phase uses."""
    if not block:
        return nullcontext()
    try:
        from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
    except ImportError:  # pragma: no cover
        return nullcontext()
    return _block_parallel_sync_behavior(strategy, block=True)

