"""GSAM (Zhuang et al., ICLR 2022): SAM plus a descent step on the surrogate gap."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .base import EPS, SharpnessAware, _check_number, _run_attr, check_bool, check_nonneg, check_rho


def _check_optional(name: str, value: Any, where: str) -> None:
    if value is not None:
        _check_number(name, value, where=where)


class GSAM(SharpnessAware):
    r"""Surrogate Gap Guided SAM (Zhuang et al., "Surrogate Gap Minimization Improves
    Sharpness-Aware Training", ICLR 2022).

    .. math::
        \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
                 \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}}, \quad
        e = \rho_t\, g / (\lVert g \rVert + \epsilon), \quad g_s = \nabla L(w + e)

        g_\perp = g - \frac{\langle g, g_s\rangle}{\lVert g_s\rVert^2 + \epsilon} g_s, \qquad
        d = g_s - \alpha\, g_\perp \quad\text{(base step with } d \text{ at the restored } w)

    ``rho_min=None`` keeps :math:`\rho_t = \rho_{max}`; otherwise :math:`\rho_t` follows the
    group's current ``lr`` (so any LR scheduler drives it), with ``lr_max`` defaulting to the
    group's lr at construction, or to the peak a scheduler records in the group (OneCycleLR's
    ``max_lr``). The fraction is clamped to [0, 1]: :math:`\rho_t` stays in
    :math:`[\rho_{min}, \rho_{max}]` also when a warm-up peak exceeds ``lr_max``. ``alpha=0`` is SAM. The clean gradient is kept in a flat buffer
    (+1x parameters); the decomposition is one ``dot_norms`` and one ``combine_`` per bucket.

    The surrogate gap :math:`h = L(w+e) - L(w)` is stored as the 0-d tensor
    ``surrogate_gap`` after ``step(closure)``, or after ``second_step(loss=..., perturbed_loss=...)``
    when both losses are passed (it is never read back to the host).

    Protocol: ``first_step()`` after the first backward, a forward/backward at the perturbed
    weights, ``second_step()``; or ``step(closure)``. ``rho_max``, ``rho_min``, ``alpha``,
    ``lr_max``, ``lr_min`` may differ per group; the norm and the inner product are global.
    """

    #: the last step's surrogate gap h(w + e) - h(w) (0-d tensor; None before the first step)
    surrogate_gap = _run_attr("surrogate_gap")

    m_sharpness = "averaged"  # the clean gradient g of the decomposition: +1 all-reduce of 1x params
    hyper = {
        "rho_max": check_rho,
        "rho_min": _check_optional,
        "alpha": check_nonneg,
        "lr_max": _check_optional,
        "lr_min": check_nonneg,
        "adaptive": check_bool,
    }

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho_max: float = 0.05,
        rho_min: Optional[float] = None,
        alpha: float = 0.01,
        lr_max: Optional[float] = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_max=lr_max, lr_min=lr_min, adaptive=adaptive)
        super().__init__(params, base_optimizer, defaults, backend, **base_kwargs)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group.get("lr_max") is None and not isinstance(group.get("lr"), Tensor):
            group["lr_max"] = group.get("lr")
            group["lr_max_auto"] = True  # the lr at construction; a scheduler's max_lr takes over
        rmin, rmax = group["rho_min"], group["rho_max"]
        if rmin is not None and not isinstance(rmin, Tensor) and not isinstance(rmax, Tensor) and rmin > rmax:
            raise ValueError(f"rho_min must be <= rho_max, got rho_min={rmin} > rho_max={rmax}")
        lmax, lmin = group["lr_max"], group["lr_min"]
        if rmin is not None and lmax is None:
            raise ValueError("lr_max must be given when rho_min is set and lr is a tensor (rho follows lr up to lr_max)")
        if rmin is not None and isinstance(lmax, (int, float)) and not lmax > lmin:
            raise ValueError(
                f"lr_max must be > lr_min when rho_min is set (rho follows the lr between them), "
                f"got lr_max={lmax}, lr_min={lmin}"
            )

    @staticmethod
    def rho_t(group: dict) -> Any:
        """The group's current radius: rho_max, or interpolated along the lr schedule.

        The lr's position between lr_min and lr_max is clamped to [0, 1], so rho_t stays in
        [rho_min, rho_max] whatever the schedule does (a warm-up or OneCycleLR peak above lr_max
        gives rho_max). When lr_max was not given and a scheduler has put its peak in the group
        (OneCycleLR's ``max_lr``), that peak is lr_max.
        """
        if group["rho_min"] is None:
            return group["rho_max"]
        lmax = group["lr_max"]
        peak = group.get("max_lr")
        if group.get("lr_max_auto") and isinstance(peak, (int, float)) and peak > group["lr_min"]:
            lmax = peak
        frac = (group["lr"] - group["lr_min"]) / (lmax - group["lr_min"])
        frac = frac.clamp(0.0, 1.0) if isinstance(frac, Tensor) else min(max(frac, 0.0), 1.0)
        return group["rho_min"] + (group["rho_max"] - group["rho_min"]) * frac

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save the clean gradient g, then w <- w + rho_t g/(||g||+eps) (after the first backward)."""
        buckets = self._begin_first()
        if buckets:
            self.copy(buckets, lambda b: b.buffer("g").views, lambda b: b.grads())
            inv = self.inverse_norm(self.global_norm(buckets))  # ||T g|| with T = |w| where adaptive
            for b in buckets:
                scale = inv * self.rho_t(b.group)
                eta = 0.0 if b.group.get("adaptive") else None  # adaptive: e = rho_t |w|^2 g / ||T g||
                b.perturb_(b.params, b.grads(), b.backup.views, scale, eta)
            self.average_local(buckets, "g")  # m-sharpness: the replicas' mean g (no-op otherwise)
        self._end_first(zero_grad)

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, loss: Optional[Tensor] = None, perturbed_loss: Optional[Tensor] = None
    ) -> None:
        """d = g_s - alpha g_perp in ``.grad``, then restore w exactly and take the base step."""
        buckets = self._begin_second()
        if buckets:
            dot, _, gs2 = self.global_dot_norms(buckets, lambda b: b.buffer("g").views, lambda b: b.grads())
            proj = dot / (gs2 + EPS)
            for b in buckets:
                a = b.group["alpha"]
                # d = g_s - a (g - proj g_s) = (1 + a proj) g_s - a g
                b.combine_(b.grads(), b.buffer("g").views, 1.0 + a * proj, -a)
        if loss is not None and perturbed_loss is not None:
            self._run.surrogate_gap = perturbed_loss.detach() - loss.detach()
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """SAM's ``step(closure)``; also sets ``surrogate_gap`` when the first-pass loss was computed."""
        loss = super().step(closure)
        perturbed = getattr(self, "last_perturbed_loss", None)
        if isinstance(loss, Tensor) and isinstance(perturbed, Tensor):
            self._run.surrogate_gap = perturbed.detach() - loss.detach()
        return loss
