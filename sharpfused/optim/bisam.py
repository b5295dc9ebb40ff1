"""BiSAM (Xie et al., ICML 2024): the perturbation maximizes a lower bound of the 0-1 loss."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from .base import _run_attr, detached
from .sam import SAM


class BiSAM(SAM):
    r"""Bilevel SAM (Xie et al., "Improving SAM Requires Rethinking its Optimization
    Formulation", ICML 2024).

    The maximizing player ascends a lower bound :math:`Q` of the 0-1 loss
    (:func:`sharpfused.losses.bisam_lower_bound`), the minimizing player descends the training
    loss :math:`L` (e.g. cross-entropy with label smoothing) at the perturbed point:

    .. math::
        e = \rho\, \nabla Q(w) / (\lVert \nabla Q(w) \rVert + \epsilon), \qquad
        g_s = \nabla L(w + e), \qquad w \leftarrow \text{restore};\ \text{base step with } g_s

    Same cost and memory as SAM; the step itself is SAM's. Only what the first backward
    differentiates changes.

    Closure contract (``step(closure)``): the closure is called as
    ``closure(perturbation=True)`` for the first pass -- it must backpropagate the lower bound
    ``Q`` -- and as ``closure(perturbation=False)`` for the second pass -- the training loss.
    While a closure runs, ``opt.perturbation_pass`` says the same thing. ``step`` returns the
    first-pass value (Q); the training loss is in ``last_perturbed_loss``. Gradients already
    present at ``step`` are taken as ``nabla Q``.

    With ``first_step()``/``second_step()``, the user's first backward is of
    ``bisam_lower_bound(logits, y)`` and the second of the training loss::

        bisam_lower_bound(model(x), y).backward(); opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward(); opt.second_step(zero_grad=True)

    Passing the training loss for both passes gives SAM exactly.
    """

    #: True while the perturbation pass's closure runs, False during the update pass, else None
    perturbation_pass = _run_attr("perturbation_pass")

    def step(self, closure: Optional[Callable[..., Any]] = None) -> Any:  # type: ignore[override]
        """One step; ``closure(perturbation=True)`` backpropagates Q, ``closure(perturbation=False)`` L.

        Without a closure after ``first_step()`` it is ``second_step()`` (what ``GradScaler.step`` calls).
        """
        if self._perturbed:  # after first_step(): the closure (if any) is the last pass, then second_step()
            # a framework's closure (Lightning's precision wrapper) takes no keyword: it reads perturbation_pass
            self._run.perturbation_pass = False
            try:
                kw = {"perturbation": False} if closure is not None and _takes_perturbation(closure) else {}
                return self._finish_perturbed(closure, **kw)
            finally:
                self._run.perturbation_pass = None
        if closure is None:
            raise RuntimeError(
                "BiSAM.step() needs a closure(perturbation: bool) that runs forward and backward of the "
                "lower bound (perturbation=True) or the training loss (perturbation=False); or call "
                "first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            with self.guarded():
                if not self._first_pass_grads():
                    self._run.perturbation_pass = True
                    loss = closure(perturbation=True)
                self.first_step(zero_grad=True)
                self._run.perturbation_pass = False
                self._run.last_perturbed_loss = detached(closure(perturbation=False))
        finally:
            self._run.perturbation_pass = None
        self.second_step(zero_grad=True)
        return loss


def _takes_perturbation(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` accepts the ``perturbation`` keyword (named, or through ``**kwargs``)."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as documented
        return True
    return any(p.name == "perturbation" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
