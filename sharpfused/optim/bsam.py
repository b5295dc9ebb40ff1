"""Bilateral SAM (2024): sharpness measured on both sides of w, three gradients per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch

from .base import EPS, SharpnessAware, _check_number, _run_attr, check_rho, detached


def _check_optional(name: str, value: Any, where: str) -> None:
    if value is not None:
        _check_number(name, value, where=where)


class BSAM(SharpnessAware):
    r"""Bilateral SAM ("Bilateral Sharpness-Aware Minimization for Flatter Minima", 2024).

    .. math::
        g_0 = \nabla L(w),\quad \hat g_0 = g_0 / (\lVert g_0 \rVert + \epsilon),\quad
        g_{max} = \nabla L(w + \rho_{max} \hat g_0),\quad g_{min} = \nabla L(w - \rho_{min} \hat g_0)

        d = g_{max} + \Big(g_0 - \frac{\lVert g_{max} \rVert}{\lVert g_{min} \rVert + \epsilon} g_{min}\Big),
        \qquad \text{base step at the restored } w \text{ with } d

    ``rho_min=None`` uses ``rho_max``. Both may differ per group; norms are global. Memory:
    backup plus two saved gradients (g_0, g_max) in flat buffers.

    How to call it (three forward/backward passes): backward at w; ``first_step()``;
    forward/backward at :math:`w + \rho_{max}\hat g_0`; ``bilateral_step()``; forward/backward at
    :math:`w - \rho_{min}\hat g_0`; ``second_step()``. Or ``step(closure)``, which does all three.
    """

    _inv0 = _run_attr("_inv0", None)
    _norm_max = _run_attr("_norm_max", None)
    _phase = _run_attr("_phase", 0)
    #: the loss of the last step's third (minimum-side) pass of step(closure)
    last_min_loss = _run_attr("last_min_loss")

    hyper = {"rho_max": check_rho, "rho_min": _check_optional}
    m_sharpness = "averaged"  # g_0 of the update: +1 all-reduce of 1x params

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho_max: float = 0.05,
        rho_min: Optional[float] = None,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, dict(rho_max=rho_max, rho_min=rho_min), backend, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save g_0 and w, then w <- w + rho_max g_0/||g_0|| (after the backward at w)."""
        buckets = self._begin_first()
        if buckets:
            self.copy(buckets, lambda b: b.buffer("g0").views, lambda b: b.grads())
            self._run._inv0 = self.inverse_norm(self.global_norm(buckets))
            for b in buckets:
                scale = self._inv0 * b.group["rho_max"]
                b.perturb_(b.params, b.grads(), b.backup.views, scale)
        self._run._phase = 1
        self._end_first(zero_grad)

    @torch.no_grad()
    def bilateral_step(self, zero_grad: bool = False) -> None:
        """Save g_max, then move to w - rho_min g_0/||g_0|| (after the backward at w + e)."""
        if not self._perturbed or self._phase != 1:
            raise RuntimeError("BSAM.bilateral_step() goes between first_step() and second_step(), once")
        buckets = self._buckets
        self.fill_missing_grads(buckets)
        self.update_pass(buckets)  # the g_max pass enters the update (averaged here if it ran local)
        if buckets:
            self.copy(buckets, lambda b: b.buffer("gmax").views, lambda b: b.grads())
            self._run._norm_max = self.global_norm(buckets)
            self.restore(buckets)
            for b in buckets:
                rho = b.group["rho_min"] if b.group["rho_min"] is not None else b.group["rho_max"]
                b.perturb_(b.params, b.buffer("g0").views, None, self._inv0 * -rho)
        self._run._phase = 2
        self._next_pass(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """d = g_max + g_0 - (||g_max||/||g_min||) g_min in ``.grad``; restore w; base step."""
        buckets = self._begin_second()
        if self._phase != 2:
            raise RuntimeError("BSAM.second_step() needs bilateral_step() and the backward at w - rho_min g_0 first")
        if buckets:
            ratio = self._norm_max / (self.global_norm(buckets) + EPS)
            self.average_local(buckets, "g0")  # m-sharpness: the replicas' mean g_0, after both local moves
            for b in buckets:
                b.combine_(b.grads(), b.buffer("gmax").views, -ratio, 1.0)
                b.combine_(b.grads(), b.buffer("g0").views, 1.0, 1.0)
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)

    _last_pass_loss = "last_min_loss"  # the last pass is at the minimum side

    def remaining_passes(self, closure: Callable[[], Any]) -> None:
        """step(closure) after first_step(): the bilateral pass, then the last pass."""
        if self._phase == 1:
            self._run.last_perturbed_loss = detached(closure())
            self.bilateral_step(zero_grad=True)

    _by_hand = "call first_step(), bilateral_step() and second_step() around the backwards"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
