"""sharpfused with the Hugging Face ``transformers.Trainer``.

:class:`SAMTrainer` is a ``Trainer`` whose optimizer is a sharpfused optimizer, given either as
``optimizers=(opt, scheduler)`` or built by the trainer from ``sam_class=``/``sam_kwargs=`` around
the base optimizer the Trainer itself would create (``TrainingArguments.optim``, ``learning_rate``,
``weight_decay`` groups, ``optim_args``, or ``optimizer_cls_and_kwargs``).

How a step runs: the Trainer's loop calls ``training_step`` once per micro-batch. Each call runs the
first pass (forward, backward: the Trainer's own ``training_step``, so loss scaling for gradient
accumulation, ``num_items_in_batch``, ``accelerator.backward`` and GradScaler stay the Trainer's)
and keeps the micro-batch. At the last micro-batch of the accumulation window (the sync step) it
calls ``first_step()`` and runs every later pass of the algorithm over every kept micro-batch (the
backwards of all but the last under ``no_sync``), leaving the weights perturbed with the last pass's
gradients; the Trainer's own ``optimizer.step()`` then takes ``second_step()`` (through GradScaler
under fp16). So the step equals the large-batch step, and the logged loss is the first pass's.

* ``max_grad_norm`` (TrainingArguments) clips the update gradient inside the optimizer's step
  (``optimizer.max_grad_norm``); the Trainer's own clipping is off (it would clip the last pass's
  gradient, which is not the update gradient of GSAM, LookSAM, XSAM, BSAM...). The logged
  ``grad_norm`` is the norm of the last pass's gradient before clipping.
* A step skipped for non-finite gradients is reported through ``accelerator.optimizer_step_was_skipped``
  (see :mod:`sharpfused.integrations.accelerate`), so the LR scheduler does not step.
* LookSAM's reuse steps and SAMPa complete inside ``training_step``; the Trainer's ``optimizer.step()``
  is then a no-op.
* BiSAM needs ``perturbation_loss_func(outputs, labels, num_items_in_batch=None)``: the loss of its
  perturbation pass (a lower bound of the 0-1 loss, e.g. :func:`sharpfused.losses.bisam_lower_bound`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer

from ..optim import BiSAM, SAMPa, SharpnessAware
from .accelerate import _check_scaler, run_sam_passes, unwrap, wrap

__all__ = ["SAMTrainer", "SAMTrainerMixin"]


class SAMTrainerMixin:
    """The sharpness-aware training step, for any ``transformers.Trainer`` subclass:
    ``class MyTrainer(SAMTrainerMixin, SomeTrainer)``. See :class:`SAMTrainer`."""

    def __init__(
        self,
        *args: Any,
        sam_class: Optional[Callable[..., SharpnessAware]] = None,
        sam_kwargs: Optional[dict] = None,
        perturbation_loss_func: Optional[Callable[..., torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam_class = sam_class
        self.sam_kwargs = dict(sam_kwargs or {})
        self.perturbation_loss_func = perturbation_loss_func
        self._sam_stash: list = []
        self._sam_perturbation_now = False
        given = self.optimizer
        if given is not None and sam_class is not None:
            raise ValueError(
                "SAMTrainer got both an optimizer (optimizers=(opt, ...)) and sam_class=: give one -- a sharpfused "
                "optimizer in optimizers=, or sam_class= (and sam_kwargs=) to wrap the base optimizer the Trainer creates"
            )
        if given is None and sam_class is None:
            raise ValueError(
                "SAMTrainer needs a sharpfused optimizer: pass optimizers=(sharpfused.SAM(params, torch.optim.SGD, ...), "
                "scheduler_or_None), or sam_class=sharpfused.SAM with sam_kwargs={'rho': 0.05} to wrap the base "
                "optimizer the Trainer builds from TrainingArguments.optim"
            )
        if given is not None and not isinstance(unwrap(given), SharpnessAware):
            raise TypeError(
                f"SAMTrainer's optimizer must be a sharpfused optimizer, got {type(given).__name__}; for a plain "
                "optimizer use transformers.Trainer, or wrap it: sharpfused.SAM(params, base_optimizer_instance, rho=...)"
            )
        if self.is_deepspeed_enabled:
            raise RuntimeError(
                "SAMTrainer with DeepSpeed: DeepSpeed's engine takes the optimizer step inside its backward, so the "
                "passes of a sharpness-aware step cannot be placed; use DDP or FSDP"
            )
        if given is not None:
            self._sam_check_algorithm(unwrap(given))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with ``sam_class``: ``sam_class(params, base, **sam_kwargs)`` around
        the base optimizer ``Trainer.create_optimizer`` builds (its param groups kept)."""
        if self.optimizer is None and self.sam_class is not None:
            base = super().create_optimizer(model)
            if not isinstance(base, torch.optim.Optimizer) or isinstance(base, SharpnessAware):
                raise TypeError(
                    f"sam_class= wraps the optimizer the Trainer builds, which here is {type(base).__name__}, not a "
                    "torch.optim.Optimizer; choose another TrainingArguments.optim"
                )
            params = [p for g in base.param_groups for p in g["params"]]
            opt = self.sam_class(params, base, **self.sam_kwargs)
            if not isinstance(opt, SharpnessAware):
                raise TypeError(f"sam_class built {type(opt).__name__}, not a sharpfused optimizer")
            self._sam_check_algorithm(opt)
            self.optimizer = opt
            return opt
        return super().create_optimizer(model)

    def _sam_check_algorithm(self, opt: SharpnessAware) -> None:
        if isinstance(opt, BiSAM) and self.perturbation_loss_func is None:
            raise ValueError(
                "BiSAM's perturbation pass backpropagates a lower bound of the 0-1 loss, not the training loss the "
                "Trainer computes: pass perturbation_loss_func=lambda outputs, labels, num_items_in_batch=None: "
                "sharpfused.losses.bisam_lower_bound(outputs.logits, labels) (or use sharpfused.SAM, which is BiSAM "
                "with the training loss in both passes)"
            )

    def _sam_optimizer(self) -> SharpnessAware:
        """The sharpfused optimizer, once prepared: checks, and the wrapper fix (first call of a run)."""
        if not isinstance(self.optimizer, AcceleratedOptimizer):
            raise RuntimeError(
                f"SAMTrainer: the Trainer's optimizer is a {type(self.optimizer).__name__}, not accelerate's "
                "AcceleratedOptimizer (SageMaker model parallel?); this setup is not supported"
            )
        wrap(self.optimizer)
        opt = unwrap(self.optimizer)
        self._sam_check_algorithm(opt)
        _check_scaler(opt, getattr(self.accelerator, "scaler", None))  # before any pass of the first step
        clip = self.args.max_grad_norm
        if clip is not None and clip > 0:
            if opt.max_grad_norm is None:
                opt.max_grad_norm = clip
            elif opt.max_grad_norm != clip:
                raise ValueError(
                    f"the optimizer clips to max_grad_norm={opt.max_grad_norm} and TrainingArguments.max_grad_norm="
                    f"{clip}: set one of them (TrainingArguments(max_grad_norm=0) keeps the optimizer's)"
                )
        return opt

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        opt = self._sam_optimizer()
        sync = self.accelerator.sync_gradients
        self._sam_stash.append((inputs, num_items_in_batch))
        if isinstance(opt, SAMPa):  # no pass at w: every pass runs inside its step(closure), at the sync step
            if not sync:
                return torch.zeros((), device=self.args.device)
            return self._sam_finish(model, opt, first_done=False)
        loss = self._sam_pass(model, inputs, num_items_in_batch, perturbation=True)
        if sync:
            self._sam_finish(model, opt, first_done=True)
        return loss

    def _sam_pass(self, model: torch.nn.Module, inputs: dict, num_items: Any, perturbation: bool) -> torch.Tensor:
        """One forward/backward of one micro-batch: the Trainer's own training_step (BiSAM's perturbation
        pass: with perturbation_loss_func as the loss)."""
        self._sam_perturbation_now = perturbation and self.perturbation_loss_func is not None
        try:
            return super().training_step(model, inputs, num_items)
        finally:
            self._sam_perturbation_now = False

    def _sam_finish(self, model: torch.nn.Module, opt: SharpnessAware, first_done: bool) -> Any:
        stash, self._sam_stash = self._sam_stash, []
        bisam = isinstance(opt, BiSAM)

        def run_pass(perturbation: bool = False) -> Any:
            if bisam:
                opt.perturbation_pass = perturbation
            total = None
            try:
                for i, (inputs, num_items) in enumerate(stash):
                    last = i == len(stash) - 1
                    ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                    with ctx:
                        loss = self._sam_pass(model, inputs, num_items, perturbation and bisam)
                    total = loss if total is None else total + loss
            finally:
                if bisam:
                    opt.perturbation_pass = None
            return total

        loss, finished = run_sam_passes(
            opt, run_pass, None, first_done=first_done, scaler=getattr(self.accelerator, "scaler", None)
        )
        if not finished or not opt.perturbed:  # completed already (LookSAM reuse step, SAMPa)
            self.optimizer._sam_done = True  # the Trainer's optimizer.step() is then a no-op
        return loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        if not self._sam_perturbation_now:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = self.perturbation_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ clipping and the logged norm
    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        """No clipping here: the optimizer clips the update gradient (``max_grad_norm``, set from the
        arguments); returning None lets ``_get_grad_norm`` log the unclipped norm."""
        return None

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if getattr(self.optimizer, "_sam_done", False):  # the step completed already: no gradient left to measure
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._sam_stash = []
        return super().train(*args, **kwargs)


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with a sharpfused optimizer (every algorithm).

    Arguments beyond ``Trainer``'s (keyword only):

    * ``sam_class``: a sharpfused optimizer class (e.g. ``sharpfused.SAM``), built as
      ``sam_class(params, base, **sam_kwargs)`` around the base optimizer the Trainer creates;
      or pass a built one in ``optimizers=(opt, scheduler)`` instead.
    * ``sam_kwargs``: the algorithm's hyperparameters (``rho``, ``adaptive``, ``k``, ``bn_model``, ...).
    * ``perturbation_loss_func(outputs, labels, num_items_in_batch=None)``: BiSAM only (required
      there): the loss its perturbation pass backpropagates; normalize it as a ``compute_loss_func``
      would (only its gradient's direction enters the perturbation).

    Refused at construction, with the reason: no sharpfused optimizer, both ``optimizers`` and
    ``sam_class``, BiSAM without ``perturbation_loss_func``, DeepSpeed. At the first step: a
    ``max_grad_norm`` on the optimizer that differs from ``TrainingArguments.max_grad_norm``;
    under fp16 (GradScaler) LookSAM with ``k > 1``, RST, AE-SAM, MESA and SAMPa.
    """
