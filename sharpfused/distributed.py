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
  Every algorithm keeps the replicas bit-identical under it (the ones whose update or state
  uses a first-pass quantity average that quantity, at a stated cost) or is refused.
* :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict`: the adapter between a
  :class:`~sharpfused.SharpnessAware` optimizer (whose ``state_dict`` nests the base optimizer's
  under ``"base_optimizer"``) and ``torch.distributed.checkpoint``. Getting a state dict never
  changes the optimizer; torch's own functions refuse a sharpfused optimizer (they would drop
  the base optimizer's state).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .optim.base import SharpnessAware, local_tensor

__all__ = ["get_optimizer_state_dict", "local_perturbation", "set_optimizer_state_dict"]

#: what to use instead of m-sharpness when an algorithm refuses it
_ALTERNATIVE = (
    "train without local_perturbation (plain DDP: every pass averaged, the perturbation of the global "
    "batch), or use an algorithm that supports m-sharpness (SAM, ASAM, BiSAM, SSAM, FriendlySAM, GSAM, "
    "XSAM, LookSAM, BSAM; see docs/distributed.md)"
)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


# ------------------------------------------------------------------------------ m-sharpness


class _Context:
    """One active ``local_perturbation(model)``: the model's parameters and its process group."""

    __slots__ = ("params", "group")

    def __init__(self, model: nn.Module, group: Any) -> None:
        self.params = frozenset(id(p) for p in model.parameters())
        self.group = group


def _context_for(optimizer: SharpnessAware) -> Optional[_Context]:
    """The innermost active context whose model shares parameters with ``optimizer``, else None."""
    for ctx in reversed(SharpnessAware._local_contexts):
        if any(id(p) in ctx.params for g in optimizer.param_groups for p in g["params"]):
            return ctx
    return None


class LocalStep:
    """What an optimizer knows of a step whose first pass ran under :func:`local_perturbation`.

    Set by ``SharpnessAware.new_step`` (``opt._local``) for that step only. It averages, over
    the replicas of the DDP model's process group, what the algorithm says enters its update
    or its state (:meth:`SharpnessAware.average_local`), and the gradients of an update pass
    that ran inside the context too (:meth:`SharpnessAware.update_pass`). Every average is
    one ``all_reduce`` (SUM of the values pre-divided by the world size, as DDP does) of one
    flat buffer per bucket; all replicas receive the same bytes, so they stay identical.
    """

    __slots__ = ("group", "world", "averaged")

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.averaged: set = set()  # bucket buffers already averaged in this step

    def __deepcopy__(self, memo: dict) -> LocalStep:
        return self  # a process group is a handle of this process: shared, not copied

    def __reduce__(self) -> tuple:
        return (type(None), ())  # a pickled optimizer carries no process group

    def _all_reduce_mean(self, flat: Tensor) -> None:
        import torch.distributed as dist

        if self.world > 1:
            flat.div_(self.world)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

    def average(self, opt: SharpnessAware, buckets: list, name: Optional[str], tensors: Optional[list]) -> None:
        if tensors is not None:
            for t in tensors:
                if not t.is_contiguous():
                    raise ValueError("average_local(tensors=...) takes contiguous tensors (one all-reduce each)")
                self._all_reduce_mean(t)
            return
        if name is not None:
            for b in buckets:
                key = (id(b), name)
                if key not in self.averaged:  # once per step (XSAM's search_alpha and second_step share it)
                    self._all_reduce_mean(b.extra[name].flat if name in b.extra else b.buffer(name).flat)
                    self.averaged.add(key)
            return
        self.average_grads(opt, buckets)

    def average_grads(self, opt: SharpnessAware, buckets: list, scratch_name: str = "local_mean") -> None:
        """``.grad`` <- its replica average: through a flat scratch buffer per bucket (``scratch_name``;
        "local_mean" is +1x parameters, allocated only when needed), one all-reduce each; gradients
        outside the buckets (a parameter without a gradient in the first pass) one all-reduce per tensor."""
        def views(b: Any) -> list:
            return b.buffer(scratch_name).views

        for b in buckets:
            opt.copy([b], views, lambda b: b.grads())
            self._all_reduce_mean(b.buffer(scratch_name).flat)
            opt.copy([b], lambda b: b.grads(), views)
        for _, p in opt.with_grads(outside=buckets):
            g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            self._all_reduce_mean(g)
            if g is not p.grad:
                p.grad.copy_(g)

    def update_pass(self, opt: SharpnessAware, buckets: list, scratch_name: str = "local_mean") -> None:
        if _context_for(opt) is not None:  # this backward ran without DDP's averaging too
            self.average_grads(opt, buckets, scratch_name)


def begin_local_step(optimizer: SharpnessAware) -> Optional[LocalStep]:
    """Called by ``SharpnessAware.new_step`` at the start of a step: a :class:`LocalStep` when the
    step starts inside :func:`local_perturbation` of a model that shares parameters with the
    optimizer, else None. Refuses (before anything is perturbed) an algorithm that does not
    declare how it keeps replicas identical (``m_sharpness = None``)."""
    ctx = _context_for(optimizer)
    if ctx is None:
        return None
    kind = type(optimizer).m_sharpness
    name = type(optimizer).__name__
    if kind not in ("local", "averaged"):
        why = getattr(type(optimizer), "m_sharpness_refusal", None) or (
            f"{name} does not declare how its update and state stay identical across replicas when the "
            "first pass is local (class attribute m_sharpness)"
        )
        raise TypeError(
            f"{name} does not support m-sharpness (sharpfused.distributed.local_perturbation): {why}. Nothing "
            f"was changed. Instead, {_ALTERNATIVE}"
        )
    return LocalStep(ctx.group)


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

    ``opt.step(closure)`` inside the context works too: the optimizer then averages the
    update pass's gradients itself (the all-reduce DDP would have done, not overlapped with
    the backward).

    The context is DDP's ``no_sync()``; while it is active, an optimizer whose parameters the
    model holds knows that the step it starts has a local first pass. The perturbation is
    always the replica's own. What else of the first pass enters the update or the optimizer's
    state is averaged over the replicas by the algorithm, so that the replicas stay
    bit-identical (weights and state) at the cost it documents, or the algorithm is refused
    before anything moves (``TypeError``):

    * SAM, ASAM, BiSAM: nothing to average (the first backward saves DDP's all-reduce).
    * GSAM (clean gradient), XSAM (ascent), LookSAM (clean gradient; a reuse step's gradient),
      BSAM (g_0), FriendlySAM (the gradient its momentum takes in): +1 all-reduce of 1x
      parameters per step, one per bucket.
    * SSAM: +1 all-reduce of the Fisher (or random) scores per mask refresh, so every replica
      keeps the same mask.
    * SAMPa: refused (its two gradients are both taken inside ``step(closure)``).

    A replica whose local first-pass gradient is not finite carries that into the averaged
    pass, so every replica skips the step. ``first_step(zero_grad=True)`` (or
    ``step(closure)``) must clear the local gradients before the synchronized backward, or
    they would be averaged into it. XSAM's ascent passes after the first belong inside the
    context too.

    A model that is not distributed gets a no-op (m = the whole batch). FSDP models are
    refused: a sharded parameter has no local full gradient to perturb with.
    """
    if _is_fsdp(model):
        raise TypeError(
            "local_perturbation() supports DistributedDataParallel models; under FSDP (FSDP2 included) each "
            "rank holds a shard of every parameter and no local full gradient, so m-sharpness does not apply"
        )
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None:
        yield
        return
    import torch.distributed as dist

    ctx = _Context(model, getattr(model, "process_group", None) or dist.group.WORLD)
    before = SharpnessAware._local_contexts
    SharpnessAware._local_contexts = before + (ctx,)
    try:
        with no_sync():
            yield
    finally:
        SharpnessAware._local_contexts = tuple(c for c in SharpnessAware._local_contexts if c is not ctx)


# ------------------------------------------------------------------------------ checkpoints


def _check(optimizer: Any) -> SharpnessAware:
    if not isinstance(optimizer, SharpnessAware):
        raise TypeError(
            f"expected a sharpfused optimizer (SharpnessAware), got {type(optimizer).__name__}; for a plain "
            "torch optimizer use torch.distributed.checkpoint.state_dict directly"
        )
    if optimizer._perturbed:
        raise RuntimeError(
            f"{type(optimizer).__name__} is between first_step() and second_step(): the model holds the "
            "perturbed weights w + e, so neither it nor the optimizer can be checkpointed (or loaded) now. "
            "Finish the step first (or call abort_step() to put the weights back)"
        )
    return optimizer


_TORCH_DCP = "torch.distributed.checkpoint.state_dict"


def _torch_dcp_frame() -> Any:
    """The frame of torch.distributed.checkpoint.state_dict that (indirectly) called us, if any."""
    f = sys._getframe(2)
    for _ in range(12):
        if f is None:
            return None
        if f.f_globals.get("__name__") == _TORCH_DCP:
            return f
        f = f.f_back
    return None


def refuse_torch_checkpoint(optimizer: SharpnessAware, api: str) -> None:
    """Raise when ``torch.distributed.checkpoint.state_dict`` works on a sharpfused optimizer itself.

    torch's get/set_optimizer_state_dict would initialize a fresh optimizer with a hidden step
    (``_init_optim_state``: step() without a closure) and keep only the wrapper's ``state`` and
    ``param_groups``, silently dropping the nested base optimizer state (momentum, Adam
    moments). Called from ``SharpnessAware.state_dict``/``load_state_dict`` and from a step
    pre-hook; when torch had already zeroed the gradients and set lr = 0 for its hidden step,
    both are put back first, so the refused call leaves the optimizer as it was.
    """
    f = _torch_dcp_frame()
    if f is None:
        return
    if f.f_code.co_name == "_init_optim_state":
        lrs = list(f.f_locals.get("lrs") or [])
        for group in optimizer.param_groups:
            if "lr" in group and lrs:
                group["lr"] = lrs.pop(0)
            for p in group["params"]:
                p.grad = None  # torch only gets here when no parameter had a gradient
    raise TypeError(
        f"torch.distributed.checkpoint.state_dict cannot {api} a sharpfused optimizer "
        f"({type(optimizer).__name__}) directly: it would run a hidden step on a fresh one and drop the base "
        "optimizer's state nested in it. Use sharpfused.distributed.get_optimizer_state_dict(model, opt) and "
        "sharpfused.distributed.set_optimizer_state_dict(model, opt, state_dict) instead (same format for dcp)"
    )


def step_pre_hook(optimizer: SharpnessAware, args: tuple, kwargs: dict) -> None:
    """Registered on every sharpfused optimizer: a ``step()`` without a closure outside a step is
    what torch's ``_init_optim_state`` calls; refuse it with the right advice (see above)."""
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if closure is None and not optimizer._perturbed:
        refuse_torch_checkpoint(optimizer, "initialize")


def _initialize_state(optimizer: SharpnessAware) -> None:
    """One step on zero gradients at lr = 0, which creates every state entry (weights unchanged).

    Only ever run on throwaway state (see :func:`_scratch_state`). e = rho * 0 / (0 + eps) = 0,
    restore is exact, and the base update is w - 0 * d = w. Collective, as a step is. The step
    hooks are bypassed (the unwrapped step runs), so that no user hook sees it.
    """
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], Tensor) else 0.0
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]

    def closure() -> None:
        for p in params:
            p.grad = torch.zeros_like(p)

    step = type(optimizer).step
    step = getattr(step, "__wrapped__", step)
    try:
        step(optimizer, closure)
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _scratch_state(optimizer: SharpnessAware, step: bool) -> Iterator[None]:
    """Run with throwaway optimizer state; afterwards everything is exactly as it was.

    The optimizer's and the base optimizer's attributes (their ``state`` dicts included, which
    are swapped for empty ones), every param group's entries, the gradients (``.grad`` is None
    inside), and with ``step``: the weights and the random number generators (SSAM's random
    mask draws from them). What is made inside (the tensors of the state dict) lives on in what
    the caller keeps, detached from the optimizer.
    """
    base = optimizer.base_optimizer
    saved, base_saved = dict(optimizer.__dict__), dict(base.__dict__)
    groups = [dict(g) for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    weights = [local_tensor(p).detach().clone() for p in params] if step else None
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=step):
        try:
            optimizer.state = defaultdict(dict)
            base.state = defaultdict(dict)
            optimizer._run = copy.copy(optimizer._run)  # the step's state object: the saved one stays untouched
            optimizer._run.buckets, optimizer._run.bucket_key = [], None  # (the old buckets too)
            for p in params:
                p.grad = None
            yield
        finally:
            optimizer.__dict__.clear()
            optimizer.__dict__.update(saved)
            base.__dict__.clear()
            base.__dict__.update(base_saved)
            for g, entries in zip(optimizer.param_groups, groups):
                g.clear()
                g.update(entries)
            with torch.no_grad():
                for i, (p, grad) in enumerate(zip(params, grads)):
                    p.grad = grad
                    if weights is not None and not torch.equal(local_tensor(p), weights[i]):
                        local_tensor(p).copy_(weights[i])


def _fqns(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def _own_state(model: nn.Module, optimizer: SharpnessAware) -> dict:
    names = _fqns(model)
    own: dict[str, dict] = {}
    other: dict[str, Any] = {}
    for key, value in optimizer.state.items():
        if isinstance(key, Tensor):
            if id(key) not in names:
                raise ValueError(f"a parameter of shape {tuple(key.shape)} optimized here is not in the model")
            own[names[id(key)]] = dict(value)
        else:
            other[str(key)] = dict(value) if isinstance(value, dict) else value
    return {"state": own, "other": other}


def get_optimizer_state_dict(model: nn.Module, optimizer: SharpnessAware, options: Optional[Any] = None) -> dict:
    """The optimizer state, keyed by parameter names, ready for ``torch.distributed.checkpoint``.

    ``{"base_optimizer": torch's get_optimizer_state_dict(model, optimizer.base_optimizer),
    "sharpness_aware": {"state": {fqn: {name: tensor}}, "other": {key: value}, "fresh": bool}}``:
    the base optimizer's state (momentum, Adam moments; DTensors under FSDP2) in torch's own
    format, the algorithm's state (e.g. SSAM masks, LookSAM's g_v; empty for SAM, GSAM, XSAM)
    keyed by parameter name, and whether the optimizer is fresh (no state yet).

    Never changes the optimizer. For a fresh optimizer the dict must still hold every entry a
    trained one has (it is the target ``dcp.load`` fills in place), so its entries are made by
    one step on zero gradients at lr 0 on throwaway state, and the optimizer is left exactly
    as it was: no state, same weights, gradients, hyperparameters and random generators. The
    ``fresh`` flag is a plain value, which ``dcp.load`` replaces by the saved one: loading a
    trained checkpoint into this dict gives the trained state, loading a fresh one gives a
    fresh optimizer (see :func:`set_optimizer_state_dict`). Collective (every rank must call
    it). Refused between first_step() and second_step().

    ``options`` is passed to torch (``StateDictOptions``).
    """
    optimizer = _check(optimizer)
    from torch.distributed.checkpoint import state_dict as tsd

    base = optimizer.base_optimizer
    fresh = not optimizer.state and not base.state
    own = None
    if fresh or not base.state:
        # torch's get_optimizer_state_dict also runs a hidden step on a base optimizer without
        # state (_init_optim_state): both only ever see throwaway state
        with _scratch_state(optimizer, step=True):
            if fresh:
                _initialize_state(optimizer)
                own = _own_state(model, optimizer)
            base_sd = tsd.get_optimizer_state_dict(model, base, options=options)
    else:
        base_sd = tsd.get_optimizer_state_dict(model, base, options=options)
    if own is None:  # the optimizer's own (not throwaway) state
        own = _own_state(model, optimizer)
    own["fresh"] = fresh
    return {"base_optimizer": base_sd, "sharpness_aware": own}


def set_optimizer_state_dict(
    model: nn.Module, optimizer: SharpnessAware, state_dict: dict, options: Optional[Any] = None
) -> None:
    """Load a dict made by :func:`get_optimizer_state_dict` (possibly through ``dcp.load``).

    The base optimizer is loaded by torch's ``set_optimizer_state_dict`` (which replaces its
    param-group list: the wrapper is pointed at the new one, so both keep sharing it), the
    algorithm's own entries are copied in place, and the buckets are rebuilt at the next step.
    Resuming gives the uninterrupted run. A dict of a fresh optimizer (``"fresh": True``) gives
    a fresh optimizer: its hyperparameters, and no state. Collective. Refused between
    first_step() and second_step().
    """
    optimizer = _check(optimizer)
    from torch.distributed.checkpoint import state_dict as tsd

    tsd.set_optimizer_state_dict(model, optimizer.base_optimizer, state_dict["base_optimizer"], options=options)
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    own = state_dict.get("sharpness_aware", {"state": {}, "other": {}})
    if own.get("fresh", False):  # the entries are placeholders made on throwaway state
        optimizer.base_optimizer.state.clear()
        optimizer.state.clear()
        optimizer.reset_buckets()
        return
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
        optimizer.state[key] = dict(value) if isinstance(value, dict) else value
    optimizer.reset_buckets()
