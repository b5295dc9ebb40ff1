"""XSAM (Chen & Zhou, ICLR 2026): explicit k-step ascent and a searched direction between ascent and gradient."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .base import EPS, SharpnessAware, _check_number, _run_attr, check_nonneg, check_rho

GRID = tuple(i / 10 for i in range(21))  # 0, 0.1, .., 2.0


class XSAM(SharpnessAware):
    r"""eXplicit SAM (Chen & Zhou, "Revisiting SAM: A More Faithful and Effective
    Implementation", ICLR 2026).

    k-step ascent from :math:`w_0 = w`, then a gradient along a direction of the sphere
    spanned by the ascent and the last gradient:

    .. math::
        w_i = w_{i-1} + \frac{\rho}{k} \frac{g_{i-1}}{\lVert g_{i-1}\rVert + \epsilon},\quad
        g_k = \nabla L(w_k),\quad
        v_0 = \frac{w_k - w_0}{\lVert w_k - w_0 \rVert},\ v_1 = \frac{g_k}{\lVert g_k\rVert},\
        \theta = \arccos\langle v_0, v_1\rangle

        d(\alpha) = \frac{\sin((1-\alpha)\theta)\, v_0 + \sin(\alpha\theta)\, v_1}{\sin\theta}
        \quad (\tfrac12 (v_0 + v_1) \text{ if } \sin\theta < 10^{-8}),\qquad
        \text{base step at } w_0 \text{ with } \lVert g_k \rVert\, d(\alpha)

    ``alpha=1, steps=1`` is SAM; ``alpha=0`` moves along the ascent direction. The ascent
    :math:`w_k - w_0 = \sum_i (\rho/k)\, \hat g_{i-1}` is accumulated in a flat buffer (+1x
    parameters) instead of being recovered from the rounded weights. ``rho``, ``rho_max`` and
    ``alpha`` may differ per group; ``steps`` is global.

    How to call it:

    * ``step(closure)`` runs all ``steps + 1`` forward/backward passes.
    * By hand: backward at w; ``first_step()``; then ``steps - 1`` times [forward/backward;
      ``ascent_step()``]; forward/backward at :math:`w_k`; optionally ``search_alpha(loss_fn)``;
      ``second_step()``.

    :meth:`search_alpha` picks :math:`\alpha^* = \arg\max_\alpha L(w_0 + \rho_{max} d(\alpha))`
    over a grid with forward passes only (the authors run it on the first batch of each
    epoch). ``alpha`` lives in the param groups, so ``state_dict`` carries it.
    """

    _ascents = _run_attr("_ascents", 0)

    hyper = {"rho": check_rho, "rho_max": check_rho, "alpha": check_nonneg}
    m_sharpness = "averaged"  # the ascent u of the update direction: +1 all-reduce of 1x params

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.15,
        rho_max: float = 0.3,
        alpha: float = 1.0,
        steps: int = 1,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (the number of ascent steps), got {steps!r}")
        self.steps = steps
        super().__init__(params, base_optimizer, dict(rho=rho, rho_max=rho_max, alpha=alpha), backend, **base_kwargs)

    def _ascend(self, buckets: list, save: bool) -> None:
        """w <- w + (rho/k) g/(||g||+eps) and u <- u + the same step (u = w_k - w_0 in exact arithmetic)."""
        inv = self.inverse_norm(self.global_norm(buckets))
        for b in buckets:
            scale = inv * (b.group["rho"] / self.steps)
            u = b.buffer("ascent").views
            if save:
                b.restore_(u, b.grads())  # u <- g0, then scaled: no stale values survive
                b.combine_(u, b.grads(), scale, 0.0)
            else:
                b.combine_(u, b.grads(), 1.0, scale)
            b.perturb_(b.params, b.grads(), b.backup.views if save else None, scale)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w_0 and take the first ascent step (after the first backward)."""
        buckets = self._begin_first()
        if buckets:
            self._ascend(buckets, save=True)
        self._run._ascents = 1
        self._end_first(zero_grad)

    @torch.no_grad()
    def ascent_step(self, zero_grad: bool = False) -> None:
        """Ascent steps 2..k: call after each backward at w_{i-1} (only when ``steps > 1``)."""
        if not self._perturbed or self._ascents >= self.steps:
            raise RuntimeError(
                f"XSAM.ascent_step(): {self._ascents} of steps={self.steps} ascent steps are done; call "
                "first_step() first, and ascent_step() only steps - 1 times"
            )
        self.fill_missing_grads(self._buckets)
        self._ascend(self._buckets, save=False)
        self._run._ascents += 1
        self._next_pass(zero_grad)

    def _angle(self, buckets: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """theta, sin(theta), ||g_k||, ||u|| from one dot_norms pass over (u, g_k)."""
        self.average_local(buckets, "ascent")  # m-sharpness: the replicas' mean ascent (once per step)
        dot, uu, gg = self.global_dot_norms(buckets, lambda b: b.buffer("ascent").views, lambda b: b.grads())
        nu, ng = uu.sqrt(), gg.sqrt()
        theta = torch.arccos((dot / (nu * ng).clamp_min(torch.finfo(dot.dtype).tiny)).clamp(-1.0, 1.0))
        return theta, torch.sin(theta), ng, nu

    @staticmethod
    def _coefficients(alpha: Any, theta: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Weights (a0, a1) of v0, v1 in d(alpha), with the (v0 + v1)/2 fallback, no host branch."""
        small = sin < 1e-8
        a0 = torch.where(small, 0.5, torch.sin((1.0 - alpha) * theta) / sin)
        a1 = torch.where(small, 0.5, torch.sin(alpha * theta) / sin)
        return a0, a1

    def _check_ready(self, what: str) -> None:
        if not self._perturbed or self._ascents != self.steps:
            raise RuntimeError(
                f"XSAM.{what}() needs the gradient at w_k: call first_step(), then ascent_step() after each of "
                f"the next steps - 1 backwards (done {self._ascents} of steps={self.steps}), then a backward"
            )

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Gradient ||g_k|| d(alpha) in ``.grad``; restore w_0 exactly; base step."""
        buckets = self._begin_second()
        self._check_ready("second_step")
        if buckets:
            theta, sin, ng, nu = self._angle(buckets)
            for b in buckets:
                a0, a1 = self._coefficients(b.group["alpha"], theta, sin)
                # ||g_k|| d = a1 g_k + a0 (||g_k|| / ||u||) u
                c2 = a0 * ng / (nu + EPS)
                b.combine_(b.grads(), b.buffer("ascent").views, a1, c2)
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)

    @torch.no_grad()
    def search_alpha(self, loss_fn: Callable[[], Any], grid: Optional[Sequence[float]] = None) -> float:
        r"""Set ``alpha`` (every group) to :math:`\arg\max_\alpha L(w_0 + \rho_{max} d(\alpha))` over ``grid``.

        Call it after the backward at :math:`w_k` and before :meth:`second_step`.
        ``loss_fn()`` takes no argument: it runs a forward pass of the model at its current
        weights on a fixed batch and returns the loss (a scalar tensor or number); it is called
        once per grid point under ``torch.no_grad()``. Default grid 0, 0.1, .., 2.0. Reads the
        losses back to the host once (this is not part of a step). Leaves the weights at
        :math:`w_0`; ``second_step`` is unaffected. Returns the chosen alpha.
        """
        self._check_ready("search_alpha")
        grid = tuple(GRID if grid is None else grid)
        if not grid:
            raise ValueError("grid must hold at least one alpha")
        for a in grid:
            _check_number("alpha in grid", a)
        buckets = self._buckets
        theta, sin, ng, nu = self._angle(buckets)
        losses = []
        for a in grid:
            a0, a1 = self._coefficients(a, theta, sin)
            c_u, c_g = a0 / (nu + EPS), a1 / (ng + EPS)  # unit d(alpha) = c_u u + c_g g_k
            for b in buckets:
                r = b.group["rho_max"]
                b.restore_(b.params, b.backup.views)
                b.perturb_(b.params, b.buffer("ascent").views, None, r * c_u)
                b.perturb_(b.params, b.grads(), None, r * c_g)
            loss = loss_fn()
            losses.append(torch.as_tensor(loss, dtype=torch.float64).detach().reshape(()).cpu())
        self.restore(buckets)
        best = float(grid[int(torch.stack(losses).argmax())])
        for group in self.param_groups:
            group["alpha"] = best
        return best

    def _repr_settings(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def remaining_passes(self, closure: Callable[[], Any]) -> None:
        """step(closure) after first_step(): the ascent passes still due, then the last pass."""
        while self._ascents < self.steps:
            closure()
            self.ascent_step(zero_grad=True)

    _by_hand = "call first_step(), ascent_step() (steps - 1 times) and second_step() around the backwards"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
