"""Sharpness metrics: how flat is the minimum an optimizer found?

Three measures, each evaluated on a model as it stands (nothing here trains), each leaving the
weights bit-identical to what they were before the call:

* :func:`hessian_top_eigenvalue` -- the largest-magnitude eigenvalue of the loss Hessian, by power
  iteration on Hessian-vector products (double backward; Pearlmutter, 1994). This is the
  sharpness measure of Keskar et al. (ICLR 2017) and of the SAM paper (Foret et al., ICLR 2021).
* :func:`surrogate_gap` -- :math:`h(w) = L(w + e) - L(w)` with SAM's perturbation
  :math:`e = \\rho\\, g / \\lVert g \\rVert` (Zhuang et al., GSAM, ICLR 2022). Near a minimum,
  :math:`h \\approx \\tfrac{\\rho^2}{2} \\hat g^\\top H \\hat g`.
* :func:`loss_landscape` -- 1-D or 2-D slices :math:`L(w + \\alpha d_1 + \\beta d_2)` along random
  filter-normalized directions (Li et al., "Visualizing the Loss Landscape of Neural Nets",
  NeurIPS 2018), with :func:`plot_landscape` to draw them.

Every function takes ``loss_fn(model, batch) -> 0-d tensor``; for a classifier,
``lambda m, b: F.cross_entropy(m(b[0]), b[1])``. The model's train/eval mode is left as the caller
set it: call ``model.eval()`` first when dropout or BatchNorm would make the loss random.
These are analysis tools: they return Python floats (one host sync per evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
Direction = Sequence[Tensor]

__all__ = ["hessian_top_eigenvalue", "surrogate_gap", "loss_landscape", "plot_landscape", "filter_normalized_direction"]


def _params(model: nn.Module) -> list[Tensor]:
    ps = [p for p in model.parameters() if p.requires_grad]
    if not ps:
        raise ValueError("the model has no parameter with requires_grad=True")
    return ps


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    # accumulate in float64: the Rayleigh quotient of a many-million-element vector in fp32 loses digits
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _backup(ps: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in ps]


@torch.no_grad()
def _restore(ps: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    for p, s in zip(ps, saved):
        p.copy_(s)  # same dtype both sides: a bit-exact copy


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Union[Any, Iterable[Any]],
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``batches``.

    Power iteration :math:`v \\leftarrow Hv / \\lVert Hv \\rVert` with
    :math:`Hv = \\nabla_w \\langle \\nabla_w L(w), v\\rangle` (double backward), the eigenvalue
    estimate being the Rayleigh quotient :math:`v^\\top H v`. Stops after ``iters`` iterations or
    when the estimate changes by less than ``tol`` relative. ``batches`` is one batch or a list of
    batches (the Hessian of their mean loss, each batch weighted equally). The start vector is
    drawn from ``seed``. ``.grad`` is left untouched.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    ps = _params(model)
    batch_list = list(batches) if isinstance(batches, list) else [batches]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype) for p in ps]
    nv = math.sqrt(float(_dot(v, v)))
    v = [x / nv for x in v]

    def hvp(vec: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in ps]
        for batch in batch_list:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                pairs = [(g, x) for g, x in zip(grads, vec) if g is not None]
                if not pairs:
                    continue
                gv = sum((g * x).sum() for g, x in pairs)
                hv = torch.autograd.grad(gv, ps, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach(), alpha=1.0 / len(batch_list))
        return out

    eig = None
    for _ in range(iters):
        hv = hvp(v)
        new = float(_dot(v, hv))
        norm = math.sqrt(float(_dot(hv, hv)))
        if norm == 0.0:
            return 0.0
        v = [h / norm for h in hv]
        if eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-12):
            return new
        eig = new
    return float(eig)


def surrogate_gap(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.0,
) -> float:
    """Surrogate gap :math:`h = L(w + e) - L(w)` (GSAM, Zhuang et al., ICLR 2022) on one batch.

    :math:`e = \\rho\\, T^2 g / \\lVert T g \\rVert` is SAM's perturbation (:math:`T = 1`; ASAM's
    :math:`T = |w| + \\eta` with ``adaptive=True``). The weights are restored bit-exactly and
    ``.grad`` is left untouched. For a quadratic :math:`\\tfrac12 w^\\top H w` it equals
    :math:`\\rho \\lVert g\\rVert + \\tfrac{\\rho^2}{2} \\hat g^\\top H \\hat g`.
    """
    ps = _params(model)
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, ps, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
    t = [(p.detach().abs() + eta) if adaptive else None for p in ps]
    tg = [g if ti is None else ti * g for g, ti in zip(grads, t)]
    norm = math.sqrt(float(_dot(tg, tg)))
    saved = _backup(ps)
    try:
        with torch.no_grad():
            for p, g, ti in zip(ps, grads, t):
                e = g if ti is None else ti * ti * g
                p.add_(e, alpha=rho / (norm + 1e-12))
            perturbed = float(loss_fn(model, batch))
    finally:
        _restore(ps, saved)
    return perturbed - float(loss.detach())


def filter_normalized_direction(
    params: Sequence[Tensor], generator: torch.Generator, ignore_1d: bool = True
) -> list[Tensor]:
    """A Gaussian direction rescaled filter by filter to the weights' norms (Li et al., 2018).

    For a tensor with ``dim() > 1`` each slice along dim 0 (a conv filter, a linear layer's row)
    gets :math:`d_i \\leftarrow d_i \\lVert w_i \\rVert / \\lVert d_i \\rVert`. 1-d tensors (biases,
    norm scales) get a zero direction when ``ignore_1d`` (as in the paper), else the same rule
    with the whole tensor as one filter.
    """
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device=p.device)
        w = p.detach().double()
        if p.dim() <= 1:
            if ignore_1d:
                d.zero_()
            elif d.numel():
                d.mul_(w.norm() / d.norm().clamp_min(1e-12))
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            d.mul_((wn / dn).view(-1, *([1] * (p.dim() - 1))))
        out.append(d.to(p.dtype))
    return out


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    directions: Union[int, Sequence[Direction]] = 1,
    span: float = 1.0,
    steps: int = 21,
    seed: int = 0,
    ignore_1d: bool = True,
) -> dict[str, Any]:
    """Loss on a 1-D or 2-D slice through the weights: :math:`L(w + \\alpha d_1 [+ \\beta d_2])`.

    ``directions`` is 1 or 2 (random filter-normalized directions drawn from ``seed``, see
    :func:`filter_normalized_direction`) or a list of one or two explicit directions (each a list
    of tensors shaped like the trainable parameters). The coordinates run over
    ``linspace(-span, span, steps)``. Returns ``{"coords": [alphas] or [alphas, betas],
    "losses": tensor (steps,) or (steps, steps) indexed [alpha, beta], "center": L(w),
    "directions": the directions}``. The weights are restored bit-exactly.
    """
    ps = _params(model)
    if isinstance(directions, int):
        if directions not in (1, 2):
            raise ValueError(f"directions must be 1, 2 or a list of explicit directions, got {directions}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dirs = [filter_normalized_direction(ps, gen, ignore_1d) for _ in range(directions)]
    else:
        dirs = [list(d) for d in directions]
        if len(dirs) not in (1, 2) or any(len(d) != len(ps) for d in dirs):
            raise ValueError("explicit directions: one or two lists, each with one tensor per trainable parameter")
    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    saved = _backup(ps)
    shape = (steps,) * len(dirs)
    losses = torch.empty(shape, dtype=torch.float64)
    try:
        with torch.no_grad():
            center = float(loss_fn(model, batch))
            for idx in torch.cartesian_prod(*[torch.arange(steps)] * len(dirs)).reshape(-1, len(dirs)).tolist():
                for j, p in enumerate(ps):
                    # w + sum_k c_k d_k from the saved weights each time: no drift across points
                    x = saved[j].double()
                    for k, i in enumerate(idx):
                        x = x + float(coords[i]) * dirs[k][j].double()
                    p.copy_(x.to(p.dtype))
                losses[tuple(idx)] = float(loss_fn(model, batch))
    finally:
        _restore(ps, saved)
    return {"coords": [coords] * len(dirs), "losses": losses, "center": center, "directions": dirs}


def plot_landscape(
    result: dict[str, Any], ax: Optional[Any] = None, label: Optional[str] = None, levels: int = 20
) -> Any:
    """Draw a :func:`loss_landscape` result: a curve (1-D) or filled contours (2-D). Returns the axes."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 4))
    losses = result["losses"]
    if losses.dim() == 1:
        ax.plot(result["coords"][0].numpy(), losses.numpy(), label=label)
        ax.set_xlabel("alpha (filter-normalized direction)")
        ax.set_ylabel("loss")
    else:
        a, b = result["coords"]
        cs = ax.contourf(a.numpy(), b.numpy(), losses.T.numpy(), levels=levels)
        ax.figure.colorbar(cs, ax=ax)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        if label:
            ax.set_title(label)
    return ax
