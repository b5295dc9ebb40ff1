"""Distributed training with sharpfused: DDP m-sharpness and FSDP2 checkpoints.

What needs no helper:

* **DDP** (``DistributedDataParallel``): the optimizers work unchanged. DDP averages the
  gradients of every backward, so the first-pass norm and the perturbation are those of the
  global batch, and the result equals a single process on the concatenated batch. The
  optimizer issues no collective of its own: DDP parameters are replicated plain tensors.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``, DTensor parameters): every primitive runs
  on the local shards (``DTensor._local_tensor`` of parameters, gradients and state), and the
  partial sums of a step (squared norms, dot products) are summed over the buckets and
  all-reduced across the mesh's Shard dims in one collective per reduction stage
  (:meth:`sharpfused.SharpnessAware.all_reduce_partials`). Replicate dims (HSDP) are not
  summed, so nothing is counted twice. Full parameters are never gathered by the optimizer.

What the helpers here add:

* :func:`local_perturbation`: the m-sharpness variant of SAM (Foret et al., ICLR 2021, Sec. 4):
  each replica perturbs with the gradient of its own micro-batch of size m,
  :math:`e_k = \\rho\\, g_k / \\lVert g_k \\rVert` with :math:`g_k = \\nabla L_k(w)`, and only the
  perturbed-point gradients are averaged: :math:`g = \\frac1K \\sum_k \\nabla L_k(w + e_k)`.
* :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`: the adapter between a
  :class:`~sharpfused.SharpnessAware` optimizer (whose ``state_dict`` nests the base optimizer's
  under ``"base_optimizer"``) and ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .optim.base import SharpnessAware, local_tensor

__all__ = ["get_optimizer_state_dict", "local_perturbation", "set_optimizer_state_dict"]


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def local_perturbation(model: nn.Module) -> Iterator[None]:
    r"""Run the first (perturbation) forward/backward without gradient averaging: m-sharpness.

    .. math::
        e_k = \rho\, g_k / (\lVert g_k \rVert + \epsilon),\quad g_k = \nabla L_k(w)
        \ \text{(replica k's local batch)},\qquad
        g = \tfrac1K \textstyle\sum_k \nabla L_k(w + e_k)

    (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021: m-sharpness with m = the per-replica batch size.) Usage::

        with sharpfused.distributed.local_perturbation(ddp_model):
            loss_fn(ddp_model(x), y).backward()   # local gradient, no all-reduce
            opt.first_step(zero_grad=True)        # local norm, local perturbation
        loss_fn(ddp_model(x), y).backward()       # averaged by DDP as usual
        opt.second_step(zero_grad=True)

    The context is DDP's ``no_sync()``. The optimizer needs no flag: with DDP it never
    all-reduces anything itself (it only reduces partial sums of sharded DTensor parameters),
    so under ``no_sync`` its global norm is the local norm of the local gradient. Every
    first-pass quantity is local (e.g. GSAM's saved clean gradient); the second pass is
    averaged. ``first_step(zero_grad=True)`` must clear the local gradients before the
    synchronized backward, or they would be averaged into it.

    A model that is not distributed gets a no-op (m = the whole batch). FSDP2 models are
    refused: a sharded parameter has no local full gradient to perturb with.
    """
    if _is_fsdp2(model):
        raise TypeError(
            "local_perturbation() supports DistributedDataParallel models; under FSDP2 each rank "
            "holds a shard of every parameter and no local full gradient, so m-sharpness does not apply"
        )
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None:
        yield
        return
    with no_sync():
        yield


# ------------------------------------------------------------------------------ checkpoints


def _check(optimizer: Any) -> SharpnessAware:
    if not isinstance(optimizer, SharpnessAware):
        raise TypeError(
            f"expected a sharpfused optimizer (SharpnessAware), got {type(optimizer).__name__}; for a plain "
            "torch optimizer use torch.distributed.checkpoint.state_dict directly"
        )
    return optimizer


def _initialize_state(optimizer: SharpnessAware) -> None:
    """Create every state entry with one step on zero gradients at lr = 0 (weights unchanged).

    Like torch's own ``_init_optim_state``, so that a fresh optimizer has the tensors a
    checkpoint is loaded into. e = rho * 0 / (0 + eps) = 0, restore is exact, and the base
    update is w - 0 * d = w. Collective (every rank must call it), as the step is.
    """
    if optimizer.base_optimizer.state or optimizer._has_grads():
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], Tensor) else 0.0
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def closure() -> None:
        for p in params:
            p.grad = torch.zeros_like(p)

    try:
        optimizer.step(closure)
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)


def _fqns(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def get_optimizer_state_dict(model: nn.Module, optimizer: SharpnessAware, options: Optional[Any] = None) -> dict:
    """The optimizer state, keyed by parameter names, ready for ``torch.distributed.checkpoint``.

    ``{"base_optimizer": torch's get_optimizer_state_dict(model, optimizer.base_optimizer),
    "sharpness_aware": {"state": {fqn: {name: tensor}}, "other": {key: value}}}``: the base
    optimizer's state (momentum, Adam moments; DTensors under FSDP2) in torch's own format, and
    the algorithm's state (e.g. SSAM masks, LookSAM's g_v; empty for SAM, GSAM, XSAM) keyed
    by parameter name. A fresh optimizer is first initialized (one step on zero gradients at
    lr 0, weights unchanged) so that the dict can be the target of ``dcp.load``. Collective.

    ``options`` is passed to torch (``StateDictOptions``).
    """
    optimizer = _check(optimizer)
    from torch.distributed.checkpoint import state_dict as tsd

    _initialize_state(optimizer)
    base = tsd.get_optimizer_state_dict(model, optimizer.base_optimizer, options=options)
    names = _fqns(model)
    own: dict[str, dict] = {}
    other: dict[str, Any] = {}
    for key, value in optimizer.state.items():
        if isinstance(key, Tensor):
            if id(key) not in names:
                raise ValueError(f"a parameter of shape {tuple(key.shape)} optimized here is not in the model")
            own[names[id(key)]] = dict(value)
        else:
            other[str(key)] = value
    return {"base_optimizer": base, "sharpness_aware": {"state": own, "other": other}}


def set_optimizer_state_dict(
    model: nn.Module, optimizer: SharpnessAware, state_dict: dict, options: Optional[Any] = None
) -> None:
    """Load a dict made by :func:`get_optimizer_state_dict` (possibly through ``dcp.load``).

    The base optimizer is loaded by torch's ``set_optimizer_state_dict`` (which replaces its
    param-group list: the wrapper is pointed at the new one, so both keep sharing it), the
    algorithm's own entries are copied in place, and the buckets are rebuilt at the next step.
    Resuming gives the uninterrupted run. Collective.
    """
    optimizer = _check(optimizer)
    from torch.distributed.checkpoint import state_dict as tsd

    tsd.set_optimizer_state_dict(model, optimizer.base_optimizer, state_dict["base_optimizer"], options=options)
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    own = state_dict.get("sharpness_aware", {"state": {}, "other": {}})
    by_name = dict(model.named_parameters(remove_duplicate=False))
    for fqn, entries in own["state"].items():
        p = by_name[fqn]
        st = optimizer.state[p]
        for name, value in entries.items():
            cur = st.get(name)
            if isinstance(cur, Tensor) and isinstance(value, Tensor):
                with torch.no_grad():
                    local_tensor(cur).copy_(local_tensor(value))
            else:
                st[name] = value
    for key, value in own["other"].items():
        optimizer.state[key] = value
    optimizer.reset_buckets()
