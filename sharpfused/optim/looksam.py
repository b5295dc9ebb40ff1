"""LookSAM (Liu et al., CVPR 2022): full SAM every k steps, its sharpness direction reused in between."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from .base import EPS, SharpnessAware, _run_attr, check_nonneg, check_rho


class LookSAM(SharpnessAware):
    r"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
    CVPR 2022).

    Every ``k``-th step (the first included) is a full SAM step that also stores the component
    of :math:`g_s` orthogonal to :math:`g`:

    .. math::
        g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2 + \epsilon}\, g

    The other steps take one forward/backward and reuse it:

    .. math::
        g \leftarrow g + \beta \frac{\lVert g \rVert}{\lVert g_v \rVert + \epsilon}\, g_v,
        \qquad \text{base step with } g

    ``k=1`` is SAM. ``rho`` and ``beta`` may differ per group; ``k`` is global. ``g_v`` is a
    flat buffer (+1x parameters) in ``state_dict`` together with the step counter.

    How to call it: ``first_step()`` after the backward returns True when this is a full
    step -- then do the second forward/backward and ``second_step()`` -- and False when the
    step is already done (a reuse step). ``step(closure)`` does this itself.
    """

    _reused = _run_attr("_reused", None)

    hyper = {"rho": check_rho, "beta": check_nonneg}
    m_sharpness = "averaged"  # g of g_v on full steps, the gradient of reuse steps: +1 all-reduce of 1x params

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.05,
        k: int = 5,
        beta: float = 0.7,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (a full SAM step every k steps), got {k!r}")
        self.k = k
        super().__init__(params, base_optimizer, dict(rho=rho, beta=beta), backend, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Full step: save g, perturb, return True. Reuse step: add the g_v term, base step, return False."""
        buckets = self._begin_first()
        count = self.state.get("looksam", {}).get("step", 0)
        full = count % self.k == 0 or not all([self.state_buffer(b, "g_v")[1] for b in buckets])
        self._commits.append(("_commit_count", (count,)))
        self._run._reused = not (full or not buckets)
        if full or not buckets:
            if buckets:
                self.copy(buckets, lambda b: b.buffer("g").views, lambda b: b.grads())
                self.perturb(buckets, sq=self.global_sq_norm(buckets))
                self.average_local(buckets, "g")  # m-sharpness: the replicas' mean g (no-op otherwise)
            self._end_first(zero_grad)
            return True
        self.update_pass(buckets, scratch="g")  # m-sharpness: this step's only pass ran local: averaged here
        gnorm = self.global_norm(buckets)
        gvnorm = self.global_norm(buckets, lambda b: b.extra["g_v"].views)
        ratio = gnorm / (gvnorm + EPS)
        for b in buckets:
            b.combine_(b.grads(), b.extra["g_v"].views, 1.0, ratio * b.group["beta"])
        self.copy(buckets, lambda b: b.backup.views, lambda b: b.params)  # no perturbation: restore is a no-op
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)
        return False

    def _commit_count(self, count: int, skipped: Optional[bool]) -> None:
        """The step counter moves when the step completes (a host value: it counts attempted steps,
        except that a skipped step that created g_v -- the first -- does not count)."""
        if not skipped:
            self.state["looksam"] = {"step": count + 1}

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Store g_v, restore w exactly, base step with g_s (full steps only)."""
        if not self._perturbed and getattr(self, "_reused", False):
            raise RuntimeError(
                "LookSAM.second_step() after a reuse step: first_step() returned False, which means the step "
                "was already taken with the stored g_v; call second_step() only when first_step() returns True"
            )
        buckets = self._begin_second()
        if buckets:
            dot, gg, _ = self.global_dot_norms(buckets, lambda b: b.buffer("g").views, lambda b: b.grads())
            coef = -dot / (gg + EPS)
            for b in buckets:  # g_v = g_s - (<g,g_s>/|g|^2) g; kept as it was on a skipped step
                g_v = self.state_buffer(b, "g_v")[0].views
                b.combine_(g_v, b.grads(), self.unless_skipped(0.0, 1.0), self.unless_skipped(1.0, 0.0))
                b.combine_(g_v, b.buffer("g").views, 1.0, self.unless_skipped(coef, 0.0))
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)

    def _repr_settings(self) -> dict[str, Any]:
        return {"k": self.k}

