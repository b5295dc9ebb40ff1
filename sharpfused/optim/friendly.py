"""Friendly SAM (Li et al., CVPR 2024): perturb without the full-batch gradient component."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import ops
from .base import SharpnessAware, check_nonneg, check_rho, check_unit


class FriendlySAM(SharpnessAware):
    r"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

    The full-gradient component, tracked by an exponential moving average :math:`m`, is
    removed from the perturbation direction:

    .. math::
        d = g - \sigma\, m_{t-1},\qquad m_t = \lambda\, m_{t-1} + (1-\lambda)\, g,\qquad
        e = \rho\, d / (\lVert d \rVert + \epsilon),\qquad \text{base step with } \nabla L(w+e)

    As in the authors' code, the first step perturbs along :math:`g` and sets :math:`m_0 = g`.
    ``m`` is a flat buffer (+1x parameters) in ``state_dict``. ``rho``, ``sigma`` and ``lam``
    may differ per group. ``first_step`` overwrites ``.grad`` with :math:`d`.

    Protocol: SAM's (``first_step``/``second_step`` or ``step(closure)``).
    """

    hyper = {"rho": check_rho, "sigma": check_nonneg, "lam": check_unit}

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        sigma: float = 1.0,
        lam: float = 0.9,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, sigma=sigma, lam=lam), backend, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """d = g - sigma m_{t-1}, w <- w + rho d/(||d||+eps), then m_t (after the first backward).

        m_t is written after the norm, so a non-finite gradient leaves m unchanged.
        """
        buckets = self._begin_first()
        fresh = []
        for b in buckets:
            m, valid = self.state_buffer(b, "momentum")
            fresh.append(not valid)
            if valid:
                ops.combine_(b.grads(), m.views, 1.0, -b.group["sigma"], backend=b.backend)  # d = g - sigma m
        if buckets:
            self.perturb(buckets, self.global_norm(buckets))
        for b, first in zip(buckets, fresh):
            sigma, lam = b.group["sigma"], b.group["lam"]
            m = b.extra["momentum"].views
            if first:  # m_0 = g
                ops.combine_(m, b.grads(), 0.0, self.unless_skipped(1.0, 0.0), backend=b.backend)
            else:  # m <- lam m + (1 - lam) g, with g = d + sigma m
                keep = self.unless_skipped(lam + (1.0 - lam) * sigma, 1.0)
                ops.combine_(m, b.grads(), keep, self.unless_skipped(1.0 - lam, 0.0), backend=b.backend)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
