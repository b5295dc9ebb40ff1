"""SAMPa (Xie et al., NeurIPS 2024): SAM whose two gradients are independent, so they can run in parallel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import ops
from .base import SharpnessAware, _run_attr, check_rho, check_unit, detached


class SAMPa(SharpnessAware):
    r"""SAM Parallelized (Xie, Pethick & Cevher, "SAMPa: Sharpness-aware Minimization
    Parallelized", NeurIPS 2024).

    .. math::
        \tilde x_t = x_t + \rho \frac{\nabla f(y_t)}{\lVert \nabla f(y_t) \rVert + \epsilon},\qquad
        y_{t+1} = x_t - \eta\, \nabla f(y_t)

        x_{t+1} = \text{base step at } x_t \text{ with }
                  (1-\lambda) \nabla f(\tilde x_t) + \lambda \nabla f(y_{t+1})

    :math:`\nabla f(\tilde x_t)` and :math:`\nabla f(y_{t+1})` depend only on :math:`x_t` and
    :math:`\nabla f(y_t)`, so they can be computed at the same time; :math:`\nabla f(y_{t+1})`
    is the next step's perturbation direction. :math:`\eta` is the group's ``lr``.
    ``rho`` and ``lam`` may differ per group; the norm is global.

    State (flat buffers, in ``state_dict``): ``grad_y`` = :math:`\nabla f(y_t)`. The point
    :math:`y_{t+1}` itself is recomputed from :math:`x_t` and ``grad_y`` (no copy kept).
    On the very first step :math:`y_0 = x_0`, so that step runs one extra pass for
    :math:`\nabla f(x_0)` (or uses gradients already present at the first ``step``).

    How to call it: ``step(closure)`` only (it places the weights itself before each pass;
    ``first_step``/``second_step`` are not offered). The closure runs forward and backward on
    the step's batch; both passes of a step use it.

    * Sequential (one device, ``process_group=None``): the closure runs at :math:`\tilde x_t`
      then at :math:`y_{t+1}`; ``step`` returns the loss at :math:`\tilde x_t` and keeps the one
      at :math:`y_{t+1}` in ``last_y_loss``.
    * Two processes (``process_group`` of exactly 2 ranks, e.g. ``dist.group.WORLD``): every
      rank holds the same replica and calls ``step(closure)`` with a closure on the SAME batch;
      group rank 0 computes :math:`\nabla f(\tilde x_t)`, group rank 1 computes
      :math:`\nabla f(y_{t+1})`, both gradients are broadcast (flat buffers, one broadcast each per
      bucket) and each rank applies the identical update, so the result equals the sequential
      form. ``step`` returns the loss of the pass that rank ran.
    """

    #: the loss at the extrapolated point y of the last step(closure)
    last_y_loss = _run_attr("last_y_loss")

    hyper = {"rho": check_rho, "lam": check_unit}
    m_sharpness = None
    m_sharpness_refusal = (
        "both of its gradients are taken inside step(closure) and its perturbation follows the previous "
        "step's gradient, so there is no first pass of its own to keep local"
    )

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.1,
        lam: float = 0.2,
        process_group: Optional[Any] = None,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if process_group is not None:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("process_group is set but torch.distributed is not initialized")
            size = dist.get_world_size(process_group)
            if size != 2:
                raise ValueError(f"process_group must have exactly 2 ranks (one per gradient), got {size}")
        self.process_group = process_group
        super().__init__(params, base_optimizer, dict(rho=rho, lam=lam), backend, **base_kwargs)

    def _outside_grads(self, buckets: list) -> dict:
        """Gradients of the x~ pass for parameters outside this step's buckets (they had no gradient
        at its start, so grad_y = 0 for them: x~ = y = x there). Checked for finiteness; copied."""
        extra = self._unbucketed_grads(buckets)
        if not extra:
            return {}
        if self.process_group is not None:
            raise RuntimeError(
                "SAMPa with process_group: a parameter got a gradient in this step that it had not at the "
                "step's start (a changing set of parameters with gradients); the two-process form needs the "
                "same set in every step (give unused parameters zero gradients, or use process_group=None)"
            )
        for backend, grads in extra:
            self.note_finite(ops.sq_norm(grads, backend=backend))
        return {p: (gi, p.grad.detach().clone()) for gi, p in self.with_grads(outside=buckets)}

    def _join_later(self, outside: dict) -> None:
        """.grad of those parameters <- lam grad f(y) + (1 - lam) grad f(x~), like the rest; their
        grad f(y) becomes their grad_y when the step completes (so they join the next step's buckets)."""
        gys = {}
        for p, (gi, gx) in outside.items():
            lam = self.param_groups[gi]["lam"]
            gy = p.grad if p.grad is not None else torch.zeros_like(gx)
            gys[p] = gy.detach().clone()
            p.grad = gy * lam + gx * (1.0 - lam)
        self._commits.append(("_commit_grad_y", (gys,)))
        self._run.commit_needs_host = True  # a step that creates state reads the skip flag once

    def _commit_grad_y(self, gys: dict, skipped: Optional[bool]) -> None:
        if not skipped:
            for p, gy in gys.items():
                self.state[p]["grad_y"] = gy

    def first_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("SAMPa places the weights before each of its passes itself: use step(closure)")

    second_step = first_step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One SAMPa step (see the class docstring); returns this rank's loss at its point."""
        if closure is None:
            raise RuntimeError("SAMPa.step() needs a closure that runs forward and backward on the step's batch")
        closure = torch.enable_grad()(closure)
        self.new_step()
        if not self._has_grads():  # grads were cleared after the last step: the buckets need them back
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None and "grad_y" in self.state.get(p, {}):
                        p.grad = torch.zeros_like(p)
        if not self._has_grads():
            with self._bn_frozen_pass():  # an extra pass of the first step: BatchNorm advances once per step (at y)
                closure()  # first step: grad f(y_0) = grad f(x_0)
        buckets = self.buckets()
        fresh = [not self.state_buffer(b, "grad_y")[1] for b in buckets]
        if any(fresh):  # grad f(y_0) = grad f(x_0); a non-finite one starts from 0 instead (then y = x~ = x)
            take = torch.where(torch.isfinite(self.global_norm(buckets)), 1.0, 0.0)
            for b, new in zip(buckets, fresh):
                if new:
                    b.combine_(b.extra["grad_y"].views, b.grads(), 0.0, take)
        gy = lambda b: b.extra["grad_y"].views  # noqa: E731
        gx = lambda b: b.buffer("grad_x").views  # noqa: E731
        rank = None if self.process_group is None else dist.get_rank(self.process_group)

        try:
            inv = self.inverse_norm(self.global_norm(buckets, gy))
            for b in buckets:  # x~ = x + rho grad_y / ||grad_y||   (x saved for exact restore)
                b.perturb_(b.params, gy(b), b.backup.views, inv * b.group["rho"])
            loss = None
            outside: dict = {}  # parameters with a gradient now but none at the step's start (LayerDrop)
            if rank in (None, 0):
                self.zero_grad()
                self._run.perturbed = True  # at x~: the closure reads opt.perturbed; BatchNorm frozen
                try:
                    with self._bn_frozen_pass():
                        loss = closure()
                finally:
                    self._run.perturbed = False
                self.fill_missing_grads(buckets)
                self.copy(buckets, gx, lambda b: b.grads())
                outside = self._outside_grads(buckets)
            if rank in (None, 1):
                for b in buckets:  # y = x - lr grad_y
                    b.restore_(b.params, b.backup.views)
                    b.perturb_(b.params, gy(b), None, -b.group["lr"])
                self.zero_grad()
                self._run.last_y_loss = detached(closure())
                self.fill_missing_grads(buckets)
                if rank is not None:
                    loss = self.last_y_loss
            if rank is not None:
                src = [dist.get_global_rank(self.process_group, r) for r in (0, 1)]
                gy_new = lambda b: b.buffer("grad_y_new").views  # noqa: E731
                for b in buckets:
                    if rank == 1:
                        self.copy([b], gy_new, lambda b: b.grads())
                    dist.broadcast(b.buffer("grad_x").flat, src=src[0], group=self.process_group)
                    dist.broadcast(b.buffer("grad_y_new").flat, src=src[1], group=self.process_group)
                self.copy(buckets, lambda b: b.grads(), gy_new)
            # .grad holds grad f(y_{t+1}) on every rank. One pass over both new gradients marks the
            # step skipped if either is non-finite; grad_y then keeps its value on a skipped step.
            fresh_ok = torch.isfinite(self.global_dot_norms(buckets, gx, lambda b: b.grads())).all()
            for b in buckets:  # grad_y <- grad f(y_{t+1}) when that is finite (even if the old one was not)
                take = torch.where(fresh_ok, 1.0, 0.0)
                b.combine_(gy(b), b.grads(), 1.0 - take, take)
            for b in buckets:  # .grad = lam grad f(y_{t+1}) + (1 - lam) grad f(x~)
                lam = b.group["lam"]
                b.combine_(b.grads(), gx(b), lam, 1.0 - lam)
        except BaseException:
            with torch.no_grad():
                self.restore(buckets)  # an exception in a closure: back to x_t, bit-exactly
                self.abort_step()  # and no state from the step that did not happen
                self.zero_grad(set_to_none=True)
            raise
        if outside:
            self._join_later(outside)
        self.restore_and_base_step(buckets)
        self._finish_step()  # a skipped first step leaves no grad_y behind
        self._mark_stepped()
        self.zero_grad()
        return loss
