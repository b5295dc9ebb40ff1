"""Friendly SAM (Li et al., CVPR 2024): perturb without the full-batch gradient component."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from .base import SharpnessAware, _run_attr, check_nonneg, check_rho, check_unit


def _split(new: list, *lists: list) -> tuple[list, list]:
    """Each list cut in two by ``new`` (per parameter: no momentum yet): (the new entries of every
    list, the others of every list). Without new parameters the lists are passed on as they are."""
    if not any(new):
        return [[] for _ in lists], list(lists)
    return ([[x for x, f in zip(xs, new) if f] for xs in lists],
            [[x for x, f in zip(xs, new) if not f] for xs in lists])


class FriendlySAM(SharpnessAware):
    r"""Friendly SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024).

    The full-gradient component, tracked by an exponential moving average :math:`m`, is
    removed from the perturbation direction:

    .. math::
        d = g - \sigma\, m_{t-1},\qquad m_t = \lambda\, m_{t-1} + (1-\lambda)\, g,\qquad
        e = \rho\, d / (\lVert d \rVert + \epsilon),\qquad \text{base step with } \nabla L(w+e)

    As in the authors' code, the first step perturbs along :math:`g` and sets :math:`m_0 = g`.
    ``m`` is a flat buffer (+1x parameters) in ``state_dict``; this step's gradient is kept in
    another (+1x) until the step completes, so that m moves only on completed steps. ``rho``, ``sigma`` and ``lam``
    may differ per group. ``first_step`` overwrites ``.grad`` with :math:`d`.

    Protocol: SAM's (``first_step``/``second_step`` or ``step(closure)``).
    """

    _unscaled = _run_attr("_unscaled", None)

    hyper = {"rho": check_rho, "sigma": check_nonneg, "lam": check_unit}
    m_sharpness = "averaged"  # the gradient m takes in: +1 all-reduce of 1x params

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
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional[Any] = None) -> None:
        """d = g - sigma m_{t-1}, w <- w + rho d/(||d||+eps) (after the first backward).

        m_t = lam m_{t-1} + (1 - lam) g is committed when the step completes (``second_step``):
        a skipped or aborted step leaves m as it was. Under ``torch.amp.GradScaler`` pass
        ``grad_scaler=scaler``: m holds unscaled gradients, so a changing loss scale does not
        enter it (the scale is read on the device, no host sync).
        """
        buckets = self._begin_first()
        inv = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            get = getattr(grad_scaler, "_get_scale_async", None)
            scale = get() if get is not None else torch.tensor(grad_scaler.get_scale())
            inv = scale.to(torch.float32).reciprocal()
        self._run._unscaled = inv is not None
        fresh = []  # per bucket: which parameters have no m yet (the first step, or new ones)
        for b in buckets:
            m, valid = self.state_buffer(b, "momentum")
            new = [False] * len(b.sources) if valid else self.created_now(b, "momentum")
            fresh.append(new)
            c = 1.0 if inv is None else inv
            g = b.buffer("grad").views  # this step's (unscaled) gradient, committed into m at the end
            b.combine_(g, b.grads(), 0.0, c)
            (fresh_g, _), (grads, ms) = _split(new, b.grads(), m.views)
            if fresh_g and inv is not None:  # the new ones' d = g, unscaled like the rest
                b.combine_(fresh_g, fresh_g, c, 0.0)
            if grads:  # d = g - sigma m (up to the loss scale: the perturbation is normalized)
                b.combine_(grads, ms, c, -b.group["sigma"])
        if buckets:
            self.perturb(buckets, sq=self.global_sq_norm(buckets))
            self.average_local(buckets, "grad")  # m-sharpness: m follows the replicas' mean g (no-op otherwise)
        self._commits.append(("_commit_momentum", (buckets, fresh)))
        self._end_first(zero_grad)

    def _commit_momentum(self, buckets: list, fresh: list, skipped: Optional[bool]) -> None:
        """m <- lam m + (1 - lam) g (m_0 = g), kept as it was when the step is skipped (device flag)."""
        for b, new in zip(buckets, fresh):
            lam = b.group["lam"]
            (m0, g0), (m, g) = _split(new, b.extra["momentum"].views, b.extra["grad"].views)
            if m0:  # m_0 = g; on a skipped step these entries are dropped altogether (_finish_step)
                b.combine_(m0, g0, 0.0, 1.0)
            if m:
                b.combine_(m, g, self.unless_skipped(lam, 1.0), self.unless_skipped(1.0 - lam, 0.0))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        if getattr(self, "grad_scale", None) is not None and not getattr(self, "_unscaled", False):
            self.abort_step()
            raise RuntimeError(
                "FriendlySAM under torch.amp.GradScaler needs the loss scale at first_step(): call "
                "opt.first_step(zero_grad=True, grad_scaler=scaler), so that its momentum holds unscaled "
                "gradients (the step was aborted and the weights restored)"
            )
        super().second_step(zero_grad)
