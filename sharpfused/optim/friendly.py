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
        """d and m_t from g and m_{t-1}, then w <- w + rho d/(||d||+eps) (after the first backward)."""
        buckets = self._begin_first()
        for b in buckets:
            m, valid = self.state_buffer(b, "momentum")
            if not valid:
                ops.restore_(m.views, b.grads(), backend=b.backend)
                continue
            sigma, lam = b.group["sigma"], b.group["lam"]
            ops.combine_(b.grads(), m.views, 1.0, -sigma, backend=b.backend)  # d = g - sigma m
            # m <- lam m + (1 - lam) g, with g = d + sigma m
            ops.combine_(m.views, b.grads(), lam + (1.0 - lam) * sigma, 1.0 - lam, backend=b.backend)
        if buckets:
            self.perturb(buckets, self.global_norm(buckets))
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
