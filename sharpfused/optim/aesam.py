"""AE-SAM (Jiang et al., ICLR 2023): a SAM step when the squared gradient norm is large, a plain step otherwise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from .base import Bucket
from .esam import host_setting
from .rst import SwitchingSAM, host_int

_STATS = ("mu", "var", "t")


class AESAM(SwitchingSAM):
    r"""AE-SAM (Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023).

    The squared norm of the step's first-pass gradient, :math:`s_t = \lVert g_t \rVert^2`, is
    compared with its running mean and variance (exponential moving averages, kept on the device):

    .. math::
        \mu_t = \delta \mu_{t-1} + (1-\delta) s_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1-\delta)(s_t - \mu_t)^2, \qquad
        \text{SAM step} \iff s_t \ge \mu_t + c_t \sigma_t

    with :math:`\mu_0 = \sigma_0^2 = 0`; otherwise the step is the base step with :math:`g_t`
    alone. :math:`c_t = c` (constant) or linear from ``c`` to ``c_end`` over ``total_steps``
    steps (the paper: 1 to -1 over training, so that SAM steps become more frequent). A very
    negative ``c`` always picks SAM; a very large one never: the base optimizer alone, the same
    update up to float32 rounding -- bit for bit with torch.optim.SGD on small tensors (tested; a
    64x1024 layer was 1.5e-8 apart after 5 steps on CPU), and with Adam, AdamW and RMSprop, whose
    fused step orders its arithmetic differently from torch's, at most 1.2e-7 apart after 6 steps
    at lr 1e-2 (measured on a small MLP).

    The host read: the choice is computed on the device, and deciding whether the training loop runs
    a second forward/backward needs it on the host -- ``first_step()`` reads that one 0-d bool, the
    only host read of a step (a step of SAM or of the fused base optimizer reads none). The
    statistics are updated on the device and keep their values on a skipped step.

    How to call it: as LookSAM -- ``first_step()`` returns True when a second pass is due (then the
    second forward/backward and ``second_step()``) and False when the step is already done; or
    ``step(closure)``. ``last_step_sam`` tells which the last step was; ``last_perturbed_loss`` is
    None after a plain step. ``first_step()`` needs the first pass's gradients (it refuses none).
    Under ``torch.amp.GradScaler`` call ``first_step(zero_grad=True, grad_scaler=scaler)``: the
    statistics see the unscaled norm (the scale is read on the device) and a plain step unscales
    its gradient through the scaler (see :meth:`SwitchingSAM.first_step`).

    Args:
        rho: SAM's radius on SAM steps, >= 0 (per group).
        delta: the moving averages' decay, in [0, 1).
        c: the threshold's multiple of sigma (the schedule's start), any finite number.
        c_end: the schedule's end value (None: constant ``c``).
        total_steps: steps over which ``c_t`` goes from ``c`` to ``c_end`` (then stays), with ``c_end``.

    ``delta``, ``c``, ``c_end`` and ``total_steps`` are global (refused in a param group); they
    take numbers, numpy scalars and 1-element CPU tensors (a device tensor is refused: they are
    read on the host once, at construction).
    """

    global_settings = {
        "delta": "one set of statistics of the global gradient norm",
        "c": "one choice per step for all parameters",
        "c_end": "one choice per step for all parameters",
        "total_steps": "one schedule of c",
    }

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        delta: float = 0.9,
        c: float = 1.0,
        c_end: Optional[float] = None,
        total_steps: Optional[int] = None,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        delta = host_setting("delta", delta, 0.0, 1.0, high_open=True, meaning=" (the moving averages' decay)")
        c = host_setting("c", c, -math.inf, math.inf, low_open=True, meaning=" (the threshold's multiple of sigma)")
        if c_end is not None:
            c_end = host_setting(
                "c_end", c_end, -math.inf, math.inf, low_open=True, meaning=" (the schedule's end value of c)"
            )
        if c_end is None and total_steps is not None:
            raise ValueError(f"total_steps is for a schedule of c: give c_end too (got total_steps={total_steps!r})")
        if c_end is not None:
            total_steps = host_int("total_steps", total_steps, 1, " with c_end (steps from c to c_end)")
        self.delta, self.c, self.c_end, self.total_steps = delta, c, c_end, total_steps
        super().__init__(params, base_optimizer, dict(rho=rho), backend, **base_kwargs)

    def _decide(self, buckets: list[Bucket]) -> tuple[bool, Optional[Tensor]]:
        norm = self.global_norm(buckets)  # of the (maybe loss-scaled) gradient: the perturbation's
        inv = self._decision_scale()
        s = (norm.double() if inv is None else norm.double() * inv.to(norm.device, torch.float64)) ** 2
        st = self.state.get("aesam")
        if st is None:  # first step: the statistics appear only if the step is not skipped
            zero = torch.zeros((), dtype=torch.float64, device=s.device)
            mu, var, t = zero, zero, zero
            self._run.commit_needs_host = True
        else:
            mu, var, t = (st[k].to(s.device) for k in _STATS)
        d = self.delta
        mu = d * mu + (1 - d) * s
        var = d * var + (1 - d) * (s - mu) ** 2
        c: Any = self.c
        if self.c_end is not None:
            c = self.c + (self.c_end - self.c) * (t / self.total_steps).clamp(max=1.0)
        due = (s >= mu + c * var.sqrt()) & torch.isfinite(s)  # a non-finite step takes one pass (skipped)
        self._commits.append(("_commit_stats", (mu, var, t + 1, st is None)))
        return bool(due), norm  # the one host read of the step: whether the loop runs a second pass

    def _commit_stats(self, mu: Tensor, var: Tensor, t: Tensor, created: bool, skipped: Optional[bool]) -> None:
        """The statistics move when the step completes, and keep their values on a skipped step (on
        the device); a skipped first step leaves none."""
        new = dict(zip(_STATS, (mu, var, t)))
        if created:
            if not skipped:
                self.state["aesam"] = new
            return
        st, flag = self.state["aesam"], self._nonfinite
        for k, v in new.items():
            st[k].copy_(v if flag is None else torch.where(flag.to(v.device), st[k].to(v.device), v))

    def _repr_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delta": self.delta, "c": self.c}
        if self.c_end is not None:
            out.update(c_end=self.c_end, total_steps=self.total_steps)
        return out
