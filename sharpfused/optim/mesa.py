"""MESA (Du et al., NeurIPS 2022): sharpness-aware training for free, against an EMA of the weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SharpnessAware
from .esam import check_interval, host_setting, refuse_global_in_group


def check_decay(name: str, value: Any, where: str) -> None:
    """The EMA's decay, in [0, 1] (a device tensor is not read back: its range is the caller's)."""
    check_interval(name, value, where, 0.0, 1.0, meaning=" (the EMA's decay)")


def _check_temperature(temperature: Any) -> float:
    return host_setting("temperature", temperature, 0.0, math.inf, low_open=True, meaning=" (the softmax temperature)")


_GLOBAL = {
    "lam": "one trajectory loss per batch",
    "temperature": "one trajectory loss per batch",
    "start_step": "one step count for all parameters",
}


def trajectory_kl(logits: Tensor, ema_logits: Tensor, temperature: float = 5.0) -> Tensor:
    r"""MESA's trajectory loss: :math:`\tau^2\, \mathrm{KL}(\mathrm{softmax}(z_{ema}/\tau) \,\|\,
    \mathrm{softmax}(z/\tau))`, summed over classes (the last dimension) and averaged over
    the samples (every other dimension).

    ``logits`` (:math:`z`) are the current model's outputs (with their graph), ``ema_logits``
    those of the EMA weights (constants). Computed with log-softmax in float32 (float64 for
    float64 logits); returns a 0-d tensor.
    """
    tau = _check_temperature(temperature)
    if not isinstance(logits, Tensor) or not isinstance(ema_logits, Tensor) or logits.shape != ema_logits.shape:
        raise ValueError(
            "logits and ema_logits must be tensors of the same shape (samples..., classes), got "
            f"{getattr(logits, 'shape', type(logits).__name__)} and {getattr(ema_logits, 'shape', type(ema_logits).__name__)}"
        )
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty class dimension (the last one), got shape {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"trajectory_kl needs at least one sample, got logits of shape {tuple(logits.shape)}")
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_p = F.log_softmax(logits.to(dt).reshape(-1, logits.shape[-1]) / tau, dim=-1)
    log_q = F.log_softmax(ema_logits.detach().to(dt).reshape(-1, logits.shape[-1]) / tau, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).mean()
    return kl * (tau * tau)


class MESA(SharpnessAware):
    r"""MESA, the memory-efficient variant of Sharpness-Aware Training for Free (Du et al.,
    "Sharpness-Aware Training for Free", NeurIPS 2022).

    One forward/backward per step, of the training loss plus the trajectory loss against an
    exponential moving average :math:`\bar w` of the weights:

    .. math::
        L(w) + \lambda\, \tau^2\, \mathrm{KL}\big(\mathrm{softmax}(f_{\bar w}(x)/\tau) \,\|\,
        \mathrm{softmax}(f_w(x)/\tau)\big),\qquad \text{base step},\qquad
        \bar w \leftarrow d\, \bar w + (1 - d)\, w

    The optimizer keeps :math:`\bar w` in a flat buffer (+1x parameters, in ``state_dict``),
    starting at the weights before the first update, and updates it after each base step with
    one ``combine_`` pass (a skipped step leaves it bit-identical). The loss term is the
    user's, with two helpers: :meth:`ema_forward` runs the model at :math:`\bar w` (a
    ``torch.func.functional_call`` over the EMA views in eval mode, without gradients: no copy
    of the model) and :meth:`trajectory_loss` returns
    :math:`\lambda \cdot` :func:`trajectory_kl` (zero before ``start_step``)::

        def closure():
            logits = model(x)
            loss = F.cross_entropy(logits, y) + opt.trajectory_loss(logits, model, x)
            loss.backward()
            return loss
        opt.step(closure)          # or: loss.backward(); opt.step()

    Args: ``decay`` (:math:`d`, per group, in [0, 1]; 0.9998), ``lam`` (:math:`\lambda`, >= 0;
    0.8), ``temperature`` (:math:`\tau`, > 0; 5), ``start_step`` (steps before the trajectory
    loss starts, >= 0; the authors start at epoch 5: pass 5 * steps per epoch). ``lam``,
    ``temperature`` and ``start_step`` are global (refused in a param group) and read once, at
    construction: numbers, numpy scalars or 1-element CPU tensors. ``decay`` may also be a device
    tensor (not read back). ``first_step()`` completes the step and returns False (as LookSAM's
    reuse step); ``second_step()`` exists only to raise a RuntimeError saying so (there is no
    second pass).
    """

    hyper = {"decay": check_decay}
    m_sharpness = None  # no perturbation: local_perturbation has nothing to localize
    m_sharpness_refusal = "MESA takes one pass per step, its update pass, and perturbs nothing"

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        decay: float = 0.9998,
        lam: float = 0.8,
        temperature: float = 5.0,
        start_step: int = 0,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self.lam = host_setting("lam", lam, 0.0, math.inf, meaning=" (the trajectory loss's weight)")
        self.temperature = _check_temperature(temperature)
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
            raise ValueError(
                f"start_step must be an integer >= 0 (steps before the trajectory loss), got {start_step!r}"
            )
        self.start_step = int(start_step)
        super().__init__(params, base_optimizer, dict(decay=decay), backend, **base_kwargs)

    def _repr_settings(self) -> dict[str, Any]:
        return {"lam": self.lam, "temperature": self.temperature, "start_step": self.start_step}

    def _check_group(self, group: dict) -> None:
        refuse_global_in_group(self, group, _GLOBAL)
        super()._check_group(group)

    @property
    def steps_taken(self) -> int:
        """Steps counted so far (a host value in ``state_dict``; the trajectory loss starts at ``start_step``)."""
        return self.state.get("mesa", {}).get("step", 0)

    def ema_weights(self, model: nn.Module) -> dict[str, Tensor]:
        """``{name: EMA view}`` for the parameters of ``model`` that have an EMA (all of them after the first
        step), each shaped like its parameter (a complex parameter's EMA, kept as the real view, as a complex view)."""
        out = {}
        for name, p in model.named_parameters():
            st = self.state.get(p)
            if st is not None and "ema" in st:
                ema = st["ema"]  # a complex parameter's EMA is kept as its real view (..., 2)
                out[name] = torch.view_as_complex(ema) if p.is_complex() and not ema.is_complex() else ema
        return out

    @torch.no_grad()
    def ema_forward(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` at the EMA weights, in eval mode (as the authors' EMA model), no gradients.

        The EMA views are passed to ``torch.func.functional_call``: nothing is copied and the model's
        own weights are not touched. Parameters without an EMA yet (before the first step) use their
        current values, which is what the EMA starts from. Buffers (BatchNorm statistics) are the model's.
        """
        from torch.func import functional_call

        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return functional_call(model, self.ema_weights(model), args, kwargs, strict=False)
        finally:
            for m, training in modes:
                m.training = training

    def trajectory_loss(self, logits: Tensor, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """``lam * trajectory_kl(logits, ema_forward(model, *args, **kwargs), temperature)``; a zero
        (and no EMA forward) before ``start_step`` steps or with ``lam == 0``."""
        if self.steps_taken < self.start_step or self.lam == 0.0:
            return logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        ema_logits = self.ema_forward(model, *args, **kwargs)
        return self.lam * trajectory_kl(logits, ema_logits, self.temperature)

    def _commit_count(self, count: int, skipped: Optional[bool]) -> None:
        if not skipped:  # a host value: attempted steps, except a skipped first step (read on the host)
            self.state["mesa"] = {"step": count + 1}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """The whole step on the gradients in ``.grad``: base step, then EMA <- d EMA + (1-d) w. Returns False."""
        buckets = self._begin_first()
        if buckets:
            for b in buckets:
                ema, valid = self.state_buffer(b, "ema")
                if not valid:  # the EMA starts at the weights before their first update
                    new = self.created_now(b, "ema")
                    b.restore_(
                        [v for v, f in zip(ema.views, new) if f],
                        [p for p, f in zip(b.params, new) if f],
                    )
            self._commits.append(("_commit_count", (self.steps_taken,)))
            self.copy(buckets, lambda b: b.backup.views, lambda b: b.params)  # no perturbation: backup = w
        self.restore_and_base_step(buckets)
        for b in buckets:
            d = b.group["decay"]
            b.combine_(
                b.extra["ema"].views,
                b.params,
                self.unless_skipped(d, 1.0),
                self.unless_skipped(1.0 - d, 0.0),
            )
        self._end_second(zero_grad)
        return False

    def second_step(self, zero_grad: bool = False) -> None:  # type: ignore[override]
        raise RuntimeError(
            "MESA takes one forward/backward per step: first_step() (or step()) after the backward completes "
            "the step; there is no second_step()"
        )

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One step: ``closure`` (if given) runs the forward/backward, unless gradients are already
        there; without a closure the gradients in ``.grad`` are used (``loss.backward(); opt.step()``,
        and what ``GradScaler.step(opt)`` calls)."""
        if closure is None:
            with self.guarded():
                self.first_step()
            return None
        return super().step(closure)  # the closure's pass, then first_step(), which ends the step
