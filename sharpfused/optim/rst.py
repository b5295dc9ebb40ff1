"""RST (Zhao et al., 2022): a SAM step with a scheduled probability, a plain base step otherwise."""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Bucket, SharpnessAware, _run_attr, check_rho
from .esam import host_setting, refuse_global_in_group

SCHEDULES = ("constant", "linear", "cosine")


class SwitchingSAM(SharpnessAware):
    """A step that is either SAM's (two passes) or the base optimizer's alone (one pass), chosen per step.

    Subclasses implement :meth:`_decide`. ``first_step()`` after the first backward returns True when
    the step is a SAM step -- then do the second forward/backward and ``second_step()`` -- and False
    when the step is already done (the base step with the first pass's gradient, exactly as the base
    optimizer alone would take it). ``step(closure)`` does this itself.
    """

    #: whether the last completed (or current) step was a SAM step (a host bool; None before the first)
    last_step_sam = _run_attr("last_step_sam", None)
    _plain_done = _run_attr("plain_done", False)

    hyper = {"rho": check_rho}
    m_sharpness = None  # the choice would differ per replica under local perturbations
    m_sharpness_refusal = (
        "a plain step's only pass would be local (unaveraged), and AE-SAM's choice would follow each replica's "
        "own gradient"
    )

    def _decide(self, buckets: list[Bucket]) -> tuple[bool, Optional[Tensor]]:
        """(SAM step now?, the gradient norm when computed on the way) for this step's first pass."""
        raise NotImplementedError

    #: global settings (constructor arguments), refused in a param group: name -> why
    global_settings: dict[str, str] = {}

    def _check_group(self, group: dict) -> None:
        refuse_global_in_group(self, group, self.global_settings)
        super()._check_group(group)

    def _decision_scale(self) -> Optional[Tensor]:
        """1/loss scale of this step's first pass (``first_step(grad_scaler=...)``), else None."""
        return self._run.unscale

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional[Any] = None) -> bool:
        """SAM step: perturb as SAM does, return True. Plain step: the base step with g, return False.

        Under ``torch.amp.GradScaler`` pass ``grad_scaler=scaler``: a plain step then unscales the
        gradients with ``scaler.unscale_(opt)`` (which records the scaler's inf check, so that
        ``scaler.update()`` works and backs off on overflow) and skips on overflow; AE-SAM's
        statistics see the unscaled norm. A SAM step ends with ``scaler.step(opt)`` as SAM's does.
        """
        if not self._perturbed and not self._has_grads():
            raise RuntimeError(
                f"{type(self).__name__}.first_step() found no gradients: call it after the first forward/backward "
                "(the step's choice and a plain step's update are made from that pass's gradient)"
            )
        buckets = self._begin_first()
        self._run.last_perturbed_loss = None  # a plain step has no perturbed pass; step(closure) sets it after one
        inv = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            get = getattr(grad_scaler, "_get_scale_async", None)
            scale = get() if get is not None else torch.tensor(grad_scaler.get_scale())
            inv = scale.to(torch.float32).reciprocal()
        self._run.unscale = inv
        self._run.scaler_given = grad_scaler is not None
        try:
            sam, norm = self._decide(buckets)
            if not sam and inv is not None:
                grad_scaler.unscale_(self)  # in place; records found_inf for scaler.update()
        except BaseException:
            self.abort_step()
            raise
        self._run.last_step_sam = sam
        self._run.plain_done = not sam
        if sam:
            if norm is None:
                self.perturb(buckets, sq=self.global_sq_norm(buckets))
            else:
                self.perturb(buckets, norm)
            self._end_first(zero_grad)
            return True
        self.copy(buckets, lambda b: b.backup.views, lambda b: b.params)  # no perturbation: restore is a no-op
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)
        return False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and take the base step with the perturbed-point gradient (SAM steps only)."""
        if not self._perturbed and self._plain_done:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() after a plain step: first_step() returned False, which means "
                "the step was already taken with the first pass's gradient; call second_step() only when "
                "first_step() returns True"
            )
        if self._perturbed and getattr(self, "grad_scale", None) is not None and not self._run.scaler_given:
            self.abort_step()
            raise RuntimeError(
                f"{type(self).__name__} under torch.amp.GradScaler needs the scaler at first_step(): call "
                "opt.first_step(zero_grad=True, grad_scaler=scaler), so that its plain steps unscale their gradient "
                "and record the scaler's inf check (the step was aborted and the weights restored)"
            )
        super().second_step(zero_grad)

    # step(closure) is the base class's: a first_step() that returns False (a plain step) has finished
    # the step with the first pass's gradient; otherwise the second pass and second_step() follow
    _by_hand = "call first_step(); when it returns True, a second forward/backward and second_step()"


class RST(SwitchingSAM):
    r"""Randomized Sharpness-aware Training (Zhao et al., "Randomized Sharpness-Aware Training for
    Boosting Computational Efficiency in Deep Learning", 2022).

    Step :math:`t` is a SAM step with probability :math:`p_t` (a Bernoulli draw) and a plain base
    step with the first pass's gradient otherwise:

    .. math::
        p_t = p \ (\text{constant}), \quad p + (p_{end} - p)\,\tfrac{t}{T} \ (\text{linear}), \quad
        p_{end} + (p - p_{end})\,\tfrac{1 + \cos(\pi t / T)}{2} \ (\text{cosine}), \qquad t/T \le 1

    The expected cost is :math:`1 + \bar p` forward/backward passes per step. ``p=1`` is SAM and
    ``p=0`` the base optimizer alone, the same update up to float32 rounding: bit for bit with
    torch.optim.SGD on small tensors (tested; a 64x1024 layer was 1.5e-8 apart after 5 steps on
    CPU), and with Adam, AdamW and RMSprop, whose fused step orders its arithmetic differently
    from torch's, at most 1.2e-7 apart after 6 steps at lr 1e-2 (measured on a small MLP).

    The draw is made on the host from a counter-based generator (``seed`` and the step number;
    no device value is read, so the optimizer never syncs, and every replica of a data-parallel
    run draws the same choice when they share ``seed``). The step counter is saved in
    ``state_dict`` with the seed (restored on load, whatever seed the resuming optimizer was
    built with): a resumed run draws the same sequence. It counts attempted steps (a step
    skipped for non-finite gradients counts too, as LookSAM's does, except a skipped first step,
    which leaves no state; an aborted one does not).

    How to call it: as LookSAM -- ``first_step()`` returns True when a second pass is due (then
    the second forward/backward and ``second_step()``) and False when the step is already done;
    or ``step(closure)``. ``first_step()`` needs the first pass's gradients (it refuses none).
    ``last_perturbed_loss`` is the perturbed pass's loss of a SAM step taken by ``step(closure)``
    and None after a plain step. Under ``torch.amp.GradScaler`` call
    ``first_step(zero_grad=True, grad_scaler=scaler)`` (see :meth:`SwitchingSAM.first_step`), then on a
    SAM step the scaled second backward and ``scaler.step(opt)``, and ``scaler.update()`` every step.

    Args:
        rho: SAM's radius on SAM steps, >= 0 (per group).
        p: probability of a SAM step (the schedule's start), in [0, 1]. It and the settings below
            are global (refused in a param group); numbers, numpy scalars and 1-element CPU
            tensors are accepted (a device tensor is refused: the draw is made on the host).
        p_end: the schedule's end value, in [0, 1] (``schedule`` "linear" or "cosine" only).
        total_steps: steps over which the schedule goes from ``p`` to ``p_end`` (then stays).
        schedule: "constant", "linear" or "cosine".
        seed: the draws' seed (an integer >= 0).
    """

    global_settings = {
        name: "one draw per step for all parameters" for name in ("p", "p_end", "total_steps", "schedule", "seed")
    }

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        p: float = 0.5,
        p_end: Optional[float] = None,
        total_steps: Optional[int] = None,
        schedule: str = "constant",
        seed: int = 0,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        p = host_setting("p", p, 0.0, 1.0, meaning=" (a probability)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        if schedule == "constant":
            if p_end is not None or total_steps is not None:
                raise ValueError(
                    "p_end and total_steps are for schedule='linear' or 'cosine'; with schedule='constant' every step "
                    f"uses p (got p_end={p_end!r}, total_steps={total_steps!r})"
                )
        else:
            if p_end is None:
                raise ValueError(f"p_end is required with schedule={schedule!r} (the probability after total_steps)")
            p_end = host_setting("p_end", p_end, 0.0, 1.0, meaning=" (a probability)")
            total_steps = host_int(
                "total_steps", total_steps, 1, f" with schedule={schedule!r} (steps from p to p_end)"
            )
        seed = host_int("seed", seed, 0, " (the draws' seed)")
        self.p, self.p_end, self.total_steps, self.schedule, self.seed = p, p_end, total_steps, schedule, seed
        super().__init__(params, base_optimizer, dict(rho=rho), backend, **base_kwargs)

    def probability(self, t: int) -> float:
        """p_t, the probability of a SAM step at step ``t`` (0-based)."""
        if self.schedule == "constant":
            return self.p
        frac = min(t / self.total_steps, 1.0)
        if self.schedule == "linear":
            return self.p + (self.p_end - self.p) * frac
        return self.p_end + (self.p - self.p_end) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def draw(self, t: int) -> float:
        """The uniform number in [0, 1) of step ``t``: a function of (seed, t) only."""
        return random.Random((self.seed << 32) + t).random()

    def _decide(self, buckets: list[Bucket]) -> tuple[bool, Optional[Tensor]]:
        t = self.state.get("rst", {}).get("step", 0)
        self._commits.append(("_commit_step", (t,)))
        # the first step reads the skip flag once, so that a skipped first step leaves no state
        self._run.commit_needs_host = "rst" not in self.state
        return self.draw(t) < self.probability(t), None

    def _commit_step(self, t: int, skipped: Optional[bool]) -> None:
        """The counter moves when the step completes (a skipped step counts, but a skipped first
        step creates no state: the first step's draw comes again)."""
        if not (skipped and "rst" not in self.state):
            self.state["rst"] = {"seed": self.seed, "step": t + 1}

    def state_dict(self) -> dict[str, Any]:
        """As the base class, with the draws' seed and step counter in ``state["rst"]`` from
        construction on (``step`` 0 before the first step): a resumed run draws the same sequence,
        whatever seed the resuming optimizer was built with."""
        sd = super().state_dict()
        if "rst" not in sd["state"]:
            sd["state"]["rst"] = {"seed": self.seed, "step": 0}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class; the draws' seed comes back too (a state dict without one keeps this
        optimizer's seed)."""
        super().load_state_dict(state_dict)
        st = self.state.get("rst")
        if st is not None:
            if "seed" in st:
                self.seed = host_int("seed", st["seed"], 0, " (the draws' seed, from the state dict)")
            if int(st["step"]) == 0:  # taken before the first step: as fresh (a skipped first step leaves no state)
                del self.state["rst"]

    def _repr_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"p": self.p, "schedule": self.schedule, "seed": self.seed}
        if self.schedule != "constant":
            out.update(p_end=self.p_end, total_steps=self.total_steps)
        return out


def host_int(name: str, value: Any, low: int, meaning: str = "") -> int:
    """An integer >= ``low`` (numpy integers and 1-element integer CPU tensors included), as a host int."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.device.type == "cpu" and value.dtype in _INTS:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}{meaning}, got {value!r}")
    return int(value)


_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
