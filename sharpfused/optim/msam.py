"""Momentum-SAM (Becker et al., 2024): SAM's ascent along the base optimizer's momentum, one pass per step."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import ops
from .base import Bucket, SharpnessAware, check_rho, detached, kernel_view, local_tensor


def _momentum_key(base: torch.optim.Optimizer) -> Optional[str]:
    """The base optimizer's state entry that holds its momentum (None: it has none MSAM can read)."""
    if isinstance(base, torch.optim.SGD):
        return "momentum_buffer"
    if isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        return "exp_avg"
    return None


class MSAM(SharpnessAware):
    r"""Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", 2024).

    SAM's ascent direction :math:`g` is replaced by the negative of the base optimizer's momentum
    :math:`v` (torch.optim.SGD's ``momentum_buffer``; Adam/AdamW's ``exp_avg``), which is known
    *before* the step's forward pass, so a step takes ONE forward/backward:

    .. math::
        \tilde w = w - \rho\, \frac{v}{\lVert v \rVert + \epsilon}, \qquad
        g = \nabla L(\tilde w), \qquad w \leftarrow \text{restore};\ \text{base step with } g

    The base step updates :math:`v` in place (the fused SGD/AdamW step writes the base optimizer's
    own state tensors); the next step's perturbation reads them there, no copy. On the first step
    there is no momentum yet: the pass runs at :math:`w` (a plain base step), as in the authors'
    code (``opt.perturbed`` is True between ``first_step()`` and ``second_step()`` on that step
    too, although the pass is at :math:`w`). ``rho`` may differ per group; the norm is global.
    ``rho=0`` is the base optimizer, up to float32 rounding (bit for bit with torch.optim.SGD on
    small tensors; with Adam/AdamW the fused step's arithmetic order differs from torch's).
    Under ``torch.amp.GradScaler``: ``first_step(zero_grad=True)``, the scaled backward,
    ``scaler.step(opt)``, ``scaler.update()``.

    How to call it: ``first_step()`` BEFORE the forward pass (it perturbs; the gradients must be
    cleared -- ``zero_grad=True`` does it; gradients left there are refused), then the
    forward/backward at the perturbed weights, then
    ``second_step()`` (restore, base step). ``step(closure)`` does the three. Between steps the
    weights are the unperturbed ``w`` (the authors' code keeps the model at :math:`\tilde w` between
    steps and moves it back for evaluation; here evaluation and checkpoints need nothing).

    Args:
        rho: ascent radius, >= 0 (the paper uses larger values than SAM's, e.g. 0.3 with SGD).
        base_optimizer: torch.optim.SGD with momentum > 0 in every group, or torch.optim.Adam /
            AdamW; any other base has no momentum to read and is refused.

    Parameters without a momentum entry (first step, a new group) are not perturbed; parameters
    with one but no gradient in the pass are stepped with a zero gradient (the base class's rule
    for a pass that leaves a perturbed parameter without gradient). BatchNorm statistics come from
    the one pass, at :math:`\tilde w` (``bn_model`` is refused: freezing would leave them unused).
    """

    hyper = {"rho": check_rho}
    m_sharpness = None  # one pass: there is no first pass to keep local
    m_sharpness_refusal = (
        "MSAM takes one forward/backward per step, at a point the momentum gives (the same on every replica), so "
        "there is no local first pass to keep"
    )

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any = torch.optim.SGD,
        rho: float = 0.3,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if base_kwargs.get("bn_model") is not None:
            raise ValueError(
                "bn_model: MSAM runs one forward pass per step (at the perturbed weights); it is the only pass that "
                "can update BatchNorm statistics, so there is nothing to freeze. Leave bn_model out (recompute the "
                "statistics at the final weights before evaluation if you want them unperturbed)"
            )
        super().__init__(params, base_optimizer, dict(rho=rho), backend, **base_kwargs)
        self._key = _momentum_key(self.base_optimizer)
        if self._key is None:
            raise TypeError(
                f"base_optimizer: MSAM perturbs along the base optimizer's momentum and can read it from "
                f"torch.optim.SGD (momentum > 0), Adam or AdamW; {type(self.base_optimizer).__name__} has none"
            )
        for group in self.param_groups:
            self._check_momentum(group)

    def _check_momentum(self, group: dict) -> None:
        m = group.get("momentum", None)
        if isinstance(self.base_optimizer, torch.optim.SGD) and isinstance(m, numbers.Number) and m <= 0:
            index = next((i for i, g in enumerate(self.param_groups) if g is group), "new")
            raise ValueError(
                f"momentum (param group {index}) must be > 0 for MSAM with torch.optim.SGD, also when changed "
                f"during a run: the perturbation follows the momentum buffer, which SGD keeps (and updates) only "
                f"with momentum > 0; got {m}"
            )

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if getattr(self, "_key", None) is not None:
            self._check_momentum(group)

    # ---------------------------------------------------------------- buckets: the parameters with momentum
    def buckets(self) -> list[Bucket]:
        """Buckets of the parameters that have a momentum entry now (gradients are not there yet when
        ``first_step()`` runs, before the forward); rebuilt only when that set changes."""
        st = self.base_optimizer.state
        params = [
            (gi, p)
            for gi, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.requires_grad and self._key in st.get(p, ())
        ]
        key = tuple((id(p), local_tensor(p).data_ptr(), id(st[p][self._key])) for _, p in params)
        if key != self._bucket_key:
            self._run.buckets = self._make_buckets(params)
            self._run.bucket_key = key
        return self._buckets

    def _momentum(self, b: Bucket) -> list[Tensor]:
        """The base optimizer's momentum tensors of bucket ``b``, read in place."""
        st = self.base_optimizer.state
        return [kernel_view(st[p][self._key]) for p in b.sources]

    # ---------------------------------------------------------------- protocol
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Before the forward: save w, then w <- w - rho v / (||v|| + eps) (nothing on the first step).

        Gradients left in ``.grad`` (a backward since the last step or ``zero_grad``) are refused
        unless ``zero_grad=True`` clears them: the step's one backward would accumulate into them.
        With an SGD base, every group's momentum must still be > 0 (it is checked here, at every
        step: SGD stops updating the buffer at momentum 0, and MSAM would perturb along a stale one).
        """
        if not self._perturbed:
            for group in self.param_groups:
                self._check_momentum(group)
            if not zero_grad and self._first_pass_grads():
                raise RuntimeError(
                    "MSAM.first_step() found gradients in .grad: MSAM's one forward/backward runs at the perturbed "
                    "weights, after first_step(), and would accumulate into them; clear them first (zero_grad(), "
                    "or first_step(zero_grad=True))"
                )
        buckets = self._begin_first()
        if buckets:
            inv = self.inverse_norm(self.global_norm(buckets, self._momentum))
            for b in buckets:
                scale = -inv * b.group["rho"]
                ops.perturb_(b.params, self._momentum(b), b.backup.views, scale, None, backend=b.backend)
        self._run.perturbed = True  # BatchNorm is not frozen: this is the step's only pass
        self._next_pass(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """After the backward at the perturbed weights: restore w exactly, base step with that gradient."""
        buckets = self._begin_second()
        if not buckets:  # first step: nothing was perturbed; the fused base step creates the momentum
            # kept until the next step's buckets replace them, so that memory after this step is
            # already what every later step holds (the backup)
            buckets = self._run.buckets = self._later_buckets([])
            self._run.bucket_key = None  # this step's own: the next step builds its buckets anew
        self.restore_and_base_step(buckets)
        self._end_second(zero_grad)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One step: ``first_step()``, ``closure()`` (forward and backward at the perturbed weights),
        ``second_step()``. Returns the loss of that one pass (also in ``last_perturbed_loss``)."""
        if self._perturbed:  # after a hand-made first_step(): the closure (if any) is the step's pass
            return self._finish_perturbed(closure)
        if closure is None:
            raise RuntimeError("MSAM.step() needs a closure that runs forward and backward")
        if self._first_pass_grads():
            raise RuntimeError(
                "MSAM.step(closure) found gradients in .grad: MSAM's one forward/backward runs at the perturbed "
                "weights, inside step(); clear the gradients first (zero_grad()) and let the closure do the backward"
            )
        for group in self.param_groups:
            self._check_momentum(group)
        closure = torch.enable_grad()(closure)
        with self.guarded():
            self.first_step(zero_grad=True)
            loss = self._run.last_perturbed_loss = detached(closure())
            self.second_step(zero_grad=True)
        return loss
