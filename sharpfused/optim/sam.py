"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import SharpnessAware, check_bool, check_nonneg, check_rho, hold_grads


class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization, a drop-in for the popular PyTorch SAM port.

    One step on a batch (Foret et al., "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021; ASAM: Kwon et al., ICML 2021):

    .. math::
        e = \rho\, T_w^2 \odot g / (\lVert T_w \odot g \rVert + \epsilon), \qquad
        w \leftarrow w + e, \qquad g_s = \nabla L(w + e), \qquad
        w \leftarrow \text{restore};\ \text{base step with } g_s

    with :math:`T_w = 1` (SAM) or :math:`T_w = |w| + \eta` (``adaptive=True``, ASAM; ``eta=0``
    is the popular port's ASAM). The norm is global over every group; ``rho``, ``adaptive`` and
    ``eta`` may differ per group (ASAM's authors leave biases unweighted: put them in a group
    with ``adaptive=False``). Restore is bit-exact (the weights are copied, not un-perturbed).

    Args:
        params: parameters or param-group dicts.
        base_optimizer: an optimizer class (built with ``**base_kwargs`` on the same groups) or
            an optimizer instance over the same parameters. Reachable as ``.base_optimizer``.
        rho: neighbourhood radius, >= 0 (SAM 0.05; ASAM 0.5 .. 2.0).
        adaptive: ASAM's elementwise weighting.
        eta: ASAM's offset in T_w, >= 0.
        backend: ``"auto"`` (cuda > triton > torch on CUDA tensors, torch on CPU), ``"torch"``,
            ``"triton"`` or ``"cuda"``.

    Use either ``first_step()`` / second forward-backward / ``second_step()``, or
    ``step(closure)``. With torch.optim.SGD or AdamW as the base, restore and base update are
    one fused pass that writes the base optimizer's own state.
    """

    hyper = {"rho": check_rho, "adaptive": check_bool, "eta": check_nonneg}
    m_sharpness = "local"  # only the perturbation uses the first pass

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta), backend, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb: save w, then w <- w + e (call after the first backward)."""
        buckets = self._begin_first()
        if buckets:
            with hold_grads(buckets):
                self.perturb(buckets, sq=self.global_sq_norm(buckets))
        self._end_first(zero_grad)
