"""Machinery shared by every sharpness-aware optimizer: buckets, protocol, base step, state.

An algorithm subclasses :class:`SharpnessAware` and says its update in primitives
(:mod:`sharpfused.ops`); it never touches foreach ops, Triton or the extension itself.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import operator
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops, spec
from ..buffers import FlatBuffer
from . import adapters
from .buckets import (  # noqa: F401  (re-exported)
    Bucket,
    hold_grads,
    kernel_view,
    local_tensor,
    reduction_key,
    refuse_sparse,
)
from .checks import (  # noqa: F401  (re-exported: algorithm files import them from here)
    _as_python,
    _check_number,
    _host_value,
    check_bool,
    check_nonneg,
    check_positive,
    check_rho,
    check_unit,
)

EPS = spec.NORM_EPS  # added to norms before dividing, as in the papers
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_NONES = itertools.repeat(None)  # operator.is_'s second argument, for a C-level map


def detached(x: Any) -> Any:
    """A loss kept on the optimizer (``last_perturbed_loss``, ...) without its autograd graph."""
    return x.detach() if isinstance(x, Tensor) else x


def _like_param(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (a shard-shaped tensor) as a DTensor laid out like parameter ``p``, sharing storage."""
    return type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


class _StepState:
    """What a step sets on its optimizer: kept on this plain object (``opt._run``), not as the
    optimizer's own attributes, because torch 2.11's dynamo cannot trace an attribute set on an
    ``Optimizer`` instance ("Attempted setattr on a user-defined object that does not have an
    AttributeMutation mutation_type") and traces one on a plain object. The optimizer reads (and,
    outside a step, writes) them through properties of the same names (see ``_run_attr``); code
    inside a step writes ``self._run.<name>``."""

    def __init__(self) -> None:
        self.perturbed = False  # between first_step and second_step
        self.nonfinite: Optional[Tensor] = None  # this step's non-finite flag (0-d bool, on the device)
        self.unchecked: list[Tensor] = []  # reductions of this step not yet folded into ``nonfinite``
        self.local: Any = None  # m-sharpness: this step's local-pass context
        self.commit_needs_host = False  # the commit of this step reads the skip flag on the host once
        self.last_step_skipped: Optional[Tensor] = None
        self.skipped_steps: Optional[Tensor] = None
        self.last_perturbed_loss: Any = None
        self.opt_called = False  # torch's LR schedulers read optimizer._opt_called
        self.in_step = False  # inside step(): first_step/second_step leave the step hooks to it
        # id(param) -> (id(grad), version) after zero_grad(set_to_none=False), or the three lists it is made of
        self.zeroed: Any = {}
        self.bucket_key: Optional[tuple] = None
        self.buckets: list = []
        self.grads_bucketed = False  # this step: exactly the buckets' parameters have gradients
        self.created: list[tuple[Bucket, str, list[Tensor]]] = []  # see SharpnessAware._clear_pending
        self.commits: list[tuple[str, tuple]] = []
        self.rollbacks: list[tuple[str, tuple]] = []


def _params_key(ps: list[Tensor]) -> tuple:
    """The bucket key of these parameters: who they are and where their storage is (a DTensor's
    local shard's); the buckets are rebuilt when it changes."""
    ids = tuple(map(id, ps))
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
    if mod is not None:
        ps = [p._local_tensor if isinstance(p, mod.DTensor) else p for p in ps]
    return ids + tuple(map(Tensor.data_ptr, ps))


def _nonfinite(x: Tensor, *more: Tensor) -> Tensor:
    """0-d bool on the device: any entry of ``x`` (or of ``more``) inf or NaN. ``x * 0`` is 0 (or -0)
    exactly where ``x`` is finite and NaN elsewhere, and ``add(y, alpha=0)`` adds ``y * 0``: n + 1
    device ops for n tensors (``~isfinite(x).all()`` decomposes into five each), never an overflow."""
    t = x.mul(0)
    for y in more:
        t = t.add(y.to(t.device), alpha=0)
    bad = t.ne(0)
    return bad.any() if bad.dim() else bad


def _flag(opt: SharpnessAware) -> Optional[Tensor]:
    """This step's non-finite flag, the reductions noted since the last read folded in first."""
    run = opt._run
    if run.unchecked:
        bad = _nonfinite(*run.unchecked)
        run.unchecked = []
        run.nonfinite = bad if run.nonfinite is None else run.nonfinite | bad.to(run.nonfinite.device)
    return run.nonfinite


def _run_attr(name: str, default: Any = None) -> property:
    """Attribute ``name`` of the optimizer, kept on ``opt._run`` (``default`` until a step sets it)."""
    return property(lambda self: getattr(self._run, name, default), lambda self, v: setattr(self._run, name, v))


def _torch_pre_hook(opt: SharpnessAware, args: tuple, kwargs: dict) -> None:
    """Registered with torch.optim (runs before ``step()``): refuses torch.distributed.checkpoint's
    hidden step, then fires the user's pre-hooks unless ``first_step()`` already did (``step()`` as
    second_step, what GradScaler.step calls)."""
    from ..distributed import step_pre_hook

    step_pre_hook(opt, args, kwargs)
    if not opt._perturbed:
        opt._fire_user_hooks(0, args, kwargs)


def _torch_post_hook(opt: SharpnessAware, args: tuple, kwargs: dict) -> None:
    opt._fire_user_hooks(1, args, kwargs)


def _in_step(step: Callable) -> Callable:
    """``step`` marked on the optimizer while it runs (first_step/second_step inside it fire no hooks)."""

    @functools.wraps(step)
    def marked(self: SharpnessAware, *args: Any, **kwargs: Any) -> Any:
        _refuse_plain_lightning(self, args[0] if args else kwargs.get("closure"))
        run = self._run
        prev, run.in_step = run.in_step, True
        try:
            return step(self, *args, **kwargs)
        finally:
            run.in_step = prev

    return marked


def _aborts_on_error(second_step: Callable) -> Callable:
    """``second_step`` that aborts the step (weights restored bit-exactly, no state moved) when it
    raises -- a refused input, the base optimizer's own error -- before the exception propagates."""

    @functools.wraps(second_step)
    def guarded(self: SharpnessAware, *args: Any, **kwargs: Any) -> Any:
        try:
            return second_step(self, *args, **kwargs)
        except BaseException:
            if self._run.perturbed:
                self.abort_step()
            raise

    return guarded


def _refuse_plain_lightning(opt: SharpnessAware, closure: Any) -> None:
    """Lightning's automatic optimization calls ``optimizer.step(closure)`` with its precision plugin's
    closure wrapper; from a plain LightningModule that step is silently wrong under gradient
    accumulation (the perturbation of the last micro-batch only) and mixes BatchNorm statistics and
    logged losses over both passes. sharpfused.integrations.lightning.SAMLightningModule does it
    right; refuse the plain module with that alternative (a cheap check of the closure's type)."""
    if not isinstance(closure, functools.partial) or getattr(closure.func, "__qualname__", "") != "Precision._wrap_closure":
        return
    module = closure.args[0] if closure.args else None
    if getattr(module, "_sharpfused_lightning", False) or not getattr(module, "automatic_optimization", False):
        return  # the integration's module, or manual optimization (the user places the passes)
    raise RuntimeError(
        f"{type(opt).__name__} is stepped by Lightning's automatic optimization from {type(module).__name__}, a "
        "plain LightningModule: derive it from sharpfused.integrations.lightning.SAMLightningModule instead "
        "(one Lightning step = one complete sharpness-aware step: gradient accumulation over every pass, "
        "BatchNorm statistics and the logged loss once per step, fp16, gradient_clip_val)"
    )


def _has_pre_hooks(base: Optimizer) -> bool:
    from torch.optim import optimizer as _o

    return bool(_o._global_optimizer_pre_hooks or base._optimizer_step_pre_hooks)


def _base_hooks(base: Optimizer, kind: int) -> None:
    """The base optimizer's step hooks (its own and torch's global ones), as ``base.step()`` would run
    them: the fused base step is that step."""
    from torch.optim import optimizer as _o

    if kind == 0:
        hooks = [*_o._global_optimizer_pre_hooks.values(), *base._optimizer_step_pre_hooks.values()]
    else:
        hooks = [*base._optimizer_step_post_hooks.values(), *_o._global_optimizer_post_hooks.values()]
    for hook in hooks:
        out = hook(base, (base,), {})
        if out is not None and kind == 0:
            raise RuntimeError(
                f"a step pre-hook of {type(base).__name__} returned new arguments; the fused base step has none "
                "to replace (return None)"
            )


class SharpnessAware(Optimizer):
    """Base of sharpfused's optimizers: wraps a base optimizer and shares its ``param_groups``.

    Subclasses set :attr:`hyper` (name -> validator) and implement ``first_step``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _in_step(cls.__dict__["step"])
        if "second_step" in cls.__dict__:
            cls.second_step = _aborts_on_error(cls.__dict__["second_step"])

    #: per-group hyperparameters of the algorithm, validated at construction and in add_param_group
    hyper: dict[str, Callable[[str, Any, str], None]] = {}
    #: 0-d bool device tensor after each step: True when the step was skipped (non-finite gradients)
    last_step_skipped = _run_attr("last_step_skipped")
    #: 0-d int64 device tensor: how many steps were skipped so far (counted on the device; read it to log)
    skipped_steps = _run_attr("skipped_steps")
    #: the loss of the second (perturbed) pass of step(closure)
    last_perturbed_loss = _run_attr("last_perturbed_loss")
    _perturbed = _run_attr("perturbed")
    #: this step's non-finite flag (0-d bool on the device, or None): read, it folds in the reductions noted so far
    _nonfinite = property(_flag)
    #: the LocalStep of a step whose first pass ran under local_perturbation, else None (set by new_step)
    _local = _run_attr("local")
    _commit_needs_host = _run_attr("commit_needs_host")
    _opt_called = _run_attr("opt_called")
    _bucket_key = _run_attr("bucket_key")
    _buckets = _run_attr("buckets")
    _created = _run_attr("created")
    _commits = _run_attr("commits")
    _rollbacks = _run_attr("rollbacks")
    #: torch.amp.GradScaler contract: ``scaler.step(opt)`` sets ``opt.grad_scale`` (the loss scale, or
    #: None once unscaled) and ``opt.found_inf`` and calls ``opt.step()``, which here is second_step()
    _step_supports_amp_scaling = True
    #: m-sharpness (a first pass under sharpfused.distributed.local_perturbation, DDP): "local" -- nothing
    #: of that pass but the perturbation enters the update or the state; "averaged" -- what does is
    #: averaged over the replicas (average_local / update_pass) before it is used; None -- refused
    m_sharpness: Optional[str] = None
    #: the local_perturbation contexts active now (set by sharpfused.distributed)
    _local_contexts: tuple = ()

    def __init__(
        self,
        params: Iterable,
        base_optimizer: Any,
        defaults: dict[str, Any],
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(backend, str) or (backend != "auto" and backend not in ops.BACKENDS):
            raise ValueError(
                f"backend must be 'auto' or one of {', '.join(repr(b) for b in ops.BACKENDS)}, got {backend!r}"
            )
        for k, v in defaults.items():
            defaults[k] = _as_python(v)
            self.hyper[k](k, defaults[k], "")
        instance = isinstance(base_optimizer, Optimizer)
        target = getattr(base_optimizer, "func", base_optimizer)  # a functools.partial's class
        if isinstance(target, SharpnessAware) or (inspect.isclass(target) and issubclass(target, SharpnessAware)):
            raise TypeError(
                f"base_optimizer is a sharpfused optimizer ({getattr(target, '__name__', type(target).__name__)}): a "
                "sharpness-aware optimizer cannot be the base of another (both would perturb and restore); give "
                "the torch optimizer itself, e.g. torch.optim.SGD"
            )
        if not instance and not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, Optimizer)):
            if not callable(base_optimizer):
                raise TypeError(
                    "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), a callable "
                    f"that builds one from the param groups (e.g. functools.partial), or an optimizer instance, got "
                    f"{base_optimizer!r}"
                )
        bn_model = base_kwargs.pop("bn_model", None)
        if bn_model is not None and not isinstance(bn_model, torch.nn.Module):
            raise TypeError(f"bn_model must be the torch.nn.Module whose BatchNorm layers to freeze, got {type(bn_model).__name__}")
        max_grad_norm = base_kwargs.pop("max_grad_norm", None)
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, strict=True)
        if instance and base_kwargs:
            raise TypeError(
                f"keyword arguments {sorted(base_kwargs)} are for building a base optimizer, but "
                "base_optimizer is already an instance"
            )
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or of param-group dicts, got a Tensor")
        params = list(params)
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters to optimize")
        self._base_ready = False
        self._run = _StepState()
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        #: BatchNorm layers of this module keep their running statistics while the weights are perturbed
        self.bn_model = bn_model
        # (pre, post) user step hooks, fired with a SAM step's semantics (see register_step_pre_hook)
        self._user_step_hooks: tuple[OrderedDict, OrderedDict] = (OrderedDict(), OrderedDict())
        super().__init__(params, defaults)
        if instance:
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if mine != theirs:
                raise ValueError("params must be the same parameters the base_optimizer instance optimizes")
            self.base_optimizer = base_optimizer
            for group in base_optimizer.param_groups:
                for k, v in defaults.items():
                    group.setdefault(k, v)
        else:
            built = base_optimizer(self.param_groups, **base_kwargs)
            if not isinstance(built, Optimizer) or isinstance(built, SharpnessAware):
                raise TypeError(
                    f"base_optimizer({', '.join(['param_groups'] + [f'{k}=...' for k in base_kwargs])}) returned "
                    f"{type(built).__name__}, not a torch.optim.Optimizer"
                )
            self.base_optimizer = built
        self.param_groups = self.base_optimizer.param_groups
        clash = sorted(set(self.hyper) & set(self.base_optimizer.defaults))
        if clash:
            raise ValueError(
                f"{type(self).__name__}'s hyperparameter {', '.join(map(repr, clash))} has the same name as "
                f"{type(self.base_optimizer).__name__}'s: the param groups are shared, so one would silently "
                "take the other's value; use another base optimizer (e.g. torch.optim.SGD or AdamW)"
            )
        for k, v in self.base_optimizer.defaults.items():
            self.defaults.setdefault(k, v)
        self._base_ready = True
        for group in self.param_groups:
            self._check_group(group)
        self._bucket_key: Optional[tuple] = None
        self._buckets: list[Bucket] = []
        self._run.perturbed = False
        self._clear_pending()
        # torch.optim's step wrapper calls these around step(); user hooks go through them (see
        # register_step_pre_hook)
        super().register_step_pre_hook(_torch_pre_hook)
        super().register_step_post_hook(_torch_post_hook)
        _watch_base(self)

    # ---------------------------------------------------------------- pass indicator, hooks, repr
    @property
    def perturbed(self) -> bool:
        """True between ``first_step()`` and ``second_step()``: the weights are at the perturbed point.

        A closure (or a framework's training step) reads it to tell its passes apart, e.g. to log the
        loss of the first pass only; ``step(closure)`` runs the closure with it False, then True.
        """
        return self._run.perturbed

    def register_step_pre_hook(self, hook: Callable) -> Any:
        """``hook(optimizer, args, kwargs)``, called once per step before the first pass's update:
        at ``first_step()`` (or when ``step()`` starts). Return None (arguments cannot be replaced)."""
        return self._register_user_hook(0, hook)

    def register_step_post_hook(self, hook: Callable) -> Any:
        """``hook(optimizer, args, kwargs)``, called once per step after the base optimizer's step:
        at the end of ``second_step()`` (or of ``step()``)."""
        return self._register_user_hook(1, hook)

    def _register_user_hook(self, kind: int, hook: Callable) -> Any:
        from torch.utils.hooks import RemovableHandle

        hooks = self._user_step_hooks[kind]
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _fire_user_hooks(self, kind: int, args: tuple = (), kwargs: Optional[dict] = None) -> None:
        for hook in list(self._user_step_hooks[kind].values()):
            out = hook(self, args or (self,), kwargs or {})
            if out is not None and kind == 0:
                raise RuntimeError(
                    f"a step pre-hook of {type(self).__name__} returned {type(out).__name__}: it fires at "
                    "first_step(), whose arguments cannot be replaced; return None"
                )

    def _repr_settings(self) -> dict[str, Any]:
        """Constructor settings that are not per-group hyperparameters (XSAM's steps, ...), for repr."""
        return {}

    def __repr__(self) -> str:
        base = repr(self.base_optimizer).replace("\n", "\n    ")
        hyper = ", ".join(f"{k}={self.defaults[k]!r}" for k in self.hyper if k in self.defaults)
        hyper += "".join(f", {k}={v!r}" for k, v in self._repr_settings().items())
        extra = f", max_grad_norm={self.max_grad_norm}" if self.max_grad_norm is not None else ""
        return f"{type(self).__name__}({hyper}, backend={self.backend!r}{extra},\n    base_optimizer={base})"

    # ---------------------------------------------------------------- param groups
    def _check_group(self, group: dict) -> None:
        index = next((i for i, g in enumerate(self.param_groups) if g is group), "new")
        where = f" (param group {index})"
        for k, check in self.hyper.items():
            group[k] = _as_python(group[k])
            check(k, group[k], where)
        for p in group["params"]:
            ops.resolve(self.backend, p.device)
            if p.is_complex() and group.get("adaptive", False):
                raise ValueError(
                    f"adaptive=True{where}: ASAM's weight |w| + eta is not defined for complex parameters (one "
                    f"of shape {tuple(p.shape)} is {p.dtype}); put complex parameters in a group with adaptive=False"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's add_param_group; the group is validated before it is added, so a bad value
        raises and leaves the optimizer (and its base optimizer) as it was."""
        if not getattr(self, "_base_ready", False):
            super().add_param_group(param_group)  # during Optimizer.__init__
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif isinstance(params, set):
            raise TypeError("param_group['params'] must be an ordered collection of tensors, got a set")
        elif params is not None:
            param_group["params"] = list(params)
        for k, v in self.defaults.items():
            if k in self.hyper:
                param_group.setdefault(k, v)
        trial = dict(param_group)
        for k, v in self.base_optimizer.defaults.items():
            trial.setdefault(k, v)
        self._check_group(trial)  # raises before anything is added
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._check_group(self.param_groups[-1])
        self._run.bucket_key = None

    # ---------------------------------------------------------------- buckets
    def _params_with_grads(self) -> list[Tensor]:
        """Every parameter that has a gradient now, in group order (a listcomp: dynamo traces it)."""
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _grad_key(self) -> tuple:
        """Which parameters have a gradient now, and where their storage is: the buckets are rebuilt
        when this changes. C-level maps over the parameters (a step's host cost). A sparse gradient
        is refused where a bucket reads its gradients (``Bucket.grads``)."""
        return _params_key(self._params_with_grads())

    def with_grads(self, outside: Optional[list[Bucket]] = None) -> list[tuple[int, Tensor]]:
        """(group index, parameter) of every parameter with a gradient now, in group order; with
        ``outside``, only those that are not in these buckets (they got a gradient in a later pass)."""
        skip = set() if outside is None else {id(p) for b in outside for p in b.sources}
        return [
            (gi, p)
            for gi, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.grad is not None and id(p) not in skip
        ]

    def _make_buckets(self, params: list[tuple[int, Tensor]]) -> list[Bucket]:
        """One bucket per (param group, device, dtype, sharding) of ``params`` (from :meth:`with_grads`)."""
        by: dict[tuple, list[Tensor]] = {}
        for gi, p in params:
            by.setdefault((gi, p.device, p.dtype, reduction_key(p)), []).append(p)
        return [
            Bucket(self.param_groups[gi], gi, ps, ops.resolve(self.backend, dev), red)
            for (gi, dev, _, red), ps in by.items()
        ]

    def buckets(self) -> list[Bucket]:
        """Buckets of the parameters that have gradients now; rebuilt only when that set changes."""
        key = self._grad_key()
        if key != self._bucket_key:
            old = self._buckets
            self._run.buckets = self._make_buckets(self.with_grads())
            self._run.bucket_key = key
            self._unpin(old)
        return self._buckets

    def _unpin(self, old: list[Bucket]) -> None:
        """State of parameters left out of the new buckets becomes standalone copies, so that views of
        the old buckets' flat buffers do not keep those buffers alive (memory stays flat when the
        set of parameters with gradients changes); parameters in the new buckets move to new
        buffers at their next ``state_buffer``."""
        if not old:
            return
        inside = {id(p) for b in self._buckets for p in b.sources}
        storages = {buf.flat.untyped_storage().data_ptr() for b in old for buf in b.extra.values()}
        for b in old:
            for p in b.sources:
                st = self.state.get(p) if id(p) not in inside else None
                for k, v in list((st or {}).items()):
                    if isinstance(v, Tensor) and local_tensor(v).untyped_storage().data_ptr() in storages:
                        st[k] = v.clone()

    # ---------------------------------------------------------------- building blocks
    def global_norm(self, buckets: list[Bucket], xs: Optional[Callable[[Bucket], list[Tensor]]] = None) -> Tensor:
        """sqrt(sum over buckets of sq_norm), with each group's ASAM weight when ``adaptive``.

        ``xs`` picks the tensors of a bucket (its gradients by default).
        """
        return self.global_sq_norm(buckets, xs).sqrt()

    def global_sq_norm(self, buckets: list[Bucket], xs: Optional[Callable[[Bucket], list[Tensor]]] = None) -> Tensor:
        """The square of :meth:`global_norm` (what :meth:`perturb` takes as ``sq``: no sqrt launch)."""
        parts = []
        for b in buckets:
            g = b.group
            adaptive = g.get("adaptive", False)
            parts.append(
                b.sq_norm(xs(b) if xs else b.grads(), b.params if adaptive else None, g.get("eta", 0.0))
            )
        return self.note_finite(self.all_reduce_partials(buckets, parts))

    def note_finite(self, total: Tensor) -> Tensor:
        """Remember (on the device) whether a reduction of this step is non-finite; returns ``total``.

        Every norm and dot product of a step passes through here, so an inf/NaN gradient of any
        pass marks the step for skipping at no extra pass over memory. The check itself waits
        until the flag is read (``_nonfinite``): the reductions of a step are then checked together,
        in n + 1 device ops for n of them.
        """
        self._run.unchecked = [*self._run.unchecked, total]  # a new list: copies of _run share none
        return total

    def all_reduce_partials(self, buckets: list[Bucket], parts: list[Tensor]) -> Tensor:
        """Sum per-bucket partial sums (``parts[i]`` from ``buckets[i]``, equal shapes) into the global sum.

        Buckets of sharded DTensor parameters (FSDP2) hold local shards: their partials are
        summed locally, then all-reduced across the mesh's Shard dims in ONE collective per
        mesh (per sharded mesh dim), so the result equals the unsharded sum. Buckets of plain
        tensors (single process, DDP: replicated weights, gradients already averaged) are
        summed as they are. Any algorithm that sums over buckets must go through here.
        """
        total: Optional[Tensor] = None
        sharded: dict[tuple, Tensor] = {}
        for b, part in zip(buckets, parts):
            if b.reduce is None:
                total = part if total is None else total + part.to(total.device)
            else:
                acc = sharded.get(b.reduce)
                sharded[b.reduce] = part if acc is None else acc + part.to(acc.device)
        for (mesh, dims), acc in sharded.items():
            import torch.distributed as dist

            for d in dims:
                dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            total = acc if total is None else total + acc.to(total.device)
        assert total is not None
        return total

    @staticmethod
    def inverse_norm(norm: Tensor) -> Tensor:
        """1 / (norm + eps), or 0 when the norm is not finite: a perturbation scaled by it is then
        dropped (``perturb_`` leaves w as it is for a zero scale), so the next forward pass of a
        step that will be skipped still runs at finite weights (BatchNorm buffers stay finite)."""
        # 1/inf is 0 already; NaN -> 0: three device ops, the same bits as a where() on isfinite
        return torch.nan_to_num((norm + EPS).reciprocal(), nan=0.0)

    def perturb(
        self,
        buckets: list[Bucket],
        norm: Optional[Tensor] = None,
        rho_key: str = "rho",
        save: bool = True,
        *,
        sq: Optional[Tensor] = None,
    ) -> None:
        """w <- w + rho * T^2 g / (||T g|| + eps) per bucket, saving w for exact restore.

        Give the norm, or its square as ``sq`` (from :meth:`global_sq_norm`): the kernel then
        computes rho / (sqrt(sq) + eps) itself (the same bits as :meth:`inverse_norm`, no scalar
        launches)."""
        inv = None if sq is not None else self.inverse_norm(norm)
        for b in buckets:
            g = b.group
            eta = g.get("eta", 0.0) if g.get("adaptive", False) else None
            backup = b.backup.views if save else None
            if inv is None:
                b.perturb_(b.params, b.grads(), backup, g[rho_key], eta, norm_sq=sq)
            else:
                b.perturb_(b.params, b.grads(), backup, inv * g[rho_key], eta)

    def restore(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            b.restore_(b.params, b.backup.views)

    # ---------------------------------------------------------------- algorithm state (additive helpers)
    def global_dot_norms(
        self, buckets: list[Bucket], a: Callable[[Bucket], list[Tensor]], b: Callable[[Bucket], list[Tensor]]
    ) -> Tensor:
        """(<a,b>, ||a||^2, ||b||^2) summed over every bucket: one ``dot_norms`` per bucket."""
        return self.note_finite(
            self.all_reduce_partials(buckets, [ops.dot_norms(a(bk), b(bk), backend=bk.backend) for bk in buckets])
        )

    def copy(self, buckets: list[Bucket], dst: Callable[[Bucket], list[Tensor]], src: Callable[[Bucket], list[Tensor]]) -> None:
        """dst <- src, bit-exact, per bucket (``restore_`` is a copy)."""
        for b in buckets:
            b.restore_(dst(b), src(b))

    def state_buffer(self, b: Bucket, name: str, dtype: Optional[torch.dtype] = None) -> tuple[FlatBuffer, bool]:
        """A flat buffer of bucket ``b`` that is also algorithm state: its views are ``self.state[p][name]``.

        So it is saved by ``state_dict``, filled back by ``load_state_dict``, and carried over
        when buckets are rebuilt (copied once into the new buffer). Returns ``(buffer, valid)``:
        ``valid`` is False when some parameter had no saved value (the algorithm must write it).
        """
        buf = b.extra.get(name)
        if buf is not None:
            return buf, True
        buf = b.buffer(name, dtype=dtype, zero=True)
        created = []
        for p, view in zip(b.sources, buf.views):
            old = self.state[p].get(name) if p in self.state else None
            if old is None:
                created.append(p)
            else:
                view.copy_(kernel_view(old))
            self.state[p][name] = view if local_tensor(p) is p else _like_param(p, view)
        if created:  # dropped again if this step does not complete (see _finish_step)
            self._created.append((b, name, created))
        return buf, not created

    def created_now(self, b: Bucket, name: str) -> list[bool]:
        """Per parameter of ``b``: whether this step created its ``name`` entry (it has no value yet)."""
        ids = {id(p) for bk, n, ps in self._created if bk is b and n == name for p in ps}
        return [id(p) in ids for p in b.sources]

    # ---------------------------------------------------------------- state moves only when a step completes
    def _clear_pending(self) -> None:
        run = self._run
        #: (bucket, state name, params whose entry this step created)
        run.created = []
        #: (method name, args): ``getattr(self, name)(*args, skipped)`` at the end of a completed step,
        #: with the host skip flag (None when not read). Names, not closures, so that a copy taken
        #: mid-step commits into itself.
        run.commits = []
        #: (method name, args): ``getattr(self, name)(*args)`` when a step is aborted (in reverse order)
        run.rollbacks = []
        #: a commit of this step needs the skip flag on the host
        self._run.commit_needs_host = False
        self._run.local = None  # m-sharpness: set again by new_step for the step it starts

    def _drop_created(self) -> None:
        """Remove the state entries this step created: no state appears on a step that did not happen."""
        for b, name, params in self._created:
            b.extra.pop(name, None)
            for p in params:
                st = self.state.get(p)
                if st is not None:
                    st.pop(name, None)
                    if not st:
                        del self.state[p]

    def _finish_step(self) -> None:
        """End of a completed step: commit staged algorithm state; on a skipped step drop what it created.

        A step that creates state (the first one, or one that builds state for new parameters)
        reads the skip flag on the host once, so that a skipped first step leaves no state behind;
        later steps keep their state unchanged on the device, without a sync.
        """
        skipped: Optional[bool] = None
        flag = self.last_step_skipped
        if flag is not None and (self._created or self._commit_needs_host):
            skipped = bool(flag)
        for name, args in self._commits:
            getattr(self, name)(*args, skipped)
        if skipped:
            self._drop_created()
        self._clear_pending()

    # ---------------------------------------------------------------- base step
    def _fused_kind(self) -> Optional[adapters.Adapter]:
        """The adapter that fuses the base optimizer's step (optim/adapters.py), or None: unfused."""
        return adapters.lookup(self.base_optimizer)

    def _prepare_base_state(self, b: Bucket, kind: adapters.Adapter) -> bool:
        """Point the bucket at the base optimizer's state tensors, creating them like torch does
        (again when the group's state layout changed, e.g. SGD's momentum to or from 0)."""
        layout = kind.layout(b.group)
        st = self.base_optimizer.state
        v = b.base_state
        # the view holds the state's tensors: valid while the base optimizer's state entries are the
        # ones it was made from (a load, state.clear(), an entry deleted, replaced or added makes it
        # stale: rebuilt). Every entry, in order, by identity: no parameter is hashed (a Python call each)
        if (
            v is not None
            and v["layout"] == layout
            and v["state"] is st
            and len(st) == len(v["entries"])
            and all(map(operator.is_, st.values(), v["entries"]))
        ):
            return True
        view = kind.prepare(self.base_optimizer, b)
        if view is None:
            return False
        view["layout"] = layout
        view["state"], view["entries"] = st, list(st.values())
        b.base_state = view
        return True

    def unless_skipped(self, value: Any, skipped: float) -> Any:
        """``value``, or ``skipped`` once a reduction of this step was non-finite: a device tensor, no sync.

        With :func:`sharpfused.ops.combine_` (a zero coefficient drops its term) this keeps an
        algorithm's running state unchanged on a skipped step, whatever the gradients hold.
        """
        flag = self._nonfinite
        if flag is None:
            return value
        other = torch.full((), skipped, dtype=torch.float64, device=flag.device)  # a fill: no host-to-device copy
        if isinstance(value, Tensor):
            value = value.to(flag.device)
        return torch.where(flag, other, value)

    def final_grad_check(
        self, buckets: list[Bucket], extra: list[tuple[str, list[Tensor]]]
    ) -> tuple[Optional[Tensor], Tensor]:
        """(grad_coef, skip) for the final gradients now in ``.grad``, all on the device.

        One read of the final gradients gives their norm: non-finite marks the step skipped
        (with any non-finite reduction of the earlier passes and GradScaler's ``found_inf``);
        ``grad_coef`` folds GradScaler's unscale (1/``grad_scale``) and ``max_grad_norm``
        clipping (min(1, max/(||g||+1e-6)), on the unscaled norm) into one factor.
        """
        sq = self.all_reduce_partials(buckets, [b.sq_norm(b.grads()) for b in buckets])
        for backend, grads in extra:  # gradients that appeared in a later pass (see _unbucketed_grads)
            sq = sq + ops.sq_norm(grads, backend=backend).to(sq.device)
        self.note_finite(sq)
        skip = self._nonfinite  # every reduction of the step, checked at once
        found = getattr(self, "found_inf", None)  # set by GradScaler.step()
        if found is not None:
            skip = skip | (found.to(skip.device) != 0)
        self._run.nonfinite = skip  # what commits after the base step see (unless_skipped)
        coef: Optional[Tensor] = None
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            coef = scale.to(sq.device, torch.float32).reciprocal()
        if self.max_grad_norm is not None:
            norm = sq.sqrt() if coef is None else sq.sqrt() * coef
            clip = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            coef = clip if coef is None else coef * clip
        return coef, skip

    def _unbucketed_grads(self, buckets: list[Bucket]) -> list[tuple[str, list[Tensor]]]:
        """Gradients of parameters outside the buckets (not perturbed: they had no gradient in
        the first pass), grouped by device; empty in the usual case where the set is unchanged."""
        if buckets is self._buckets:  # a count, cheaper than the bucket key
            inside = [p for b in buckets for p in b.sources if p.grad is not None]
            if len(self._params_with_grads()) == len(inside):
                # no parameter outside the buckets has a gradient (the usual case); when each of
                # theirs has one, _mark_grads can take the buckets' parameters as they are
                self._run.grads_bucketed = len(inside) == sum(len(b.sources) for b in buckets)
                return []
        by: dict[tuple, list[Tensor]] = {}
        later = self.with_grads(outside=buckets)
        refuse_sparse([p for _, p in later])
        for _, p in later:
            g = kernel_view(p.grad)
            by.setdefault((g.device, g.dtype), []).append(g)
        return [(ops.resolve(self.backend, dev), gs) for (dev, _), gs in by.items()]

    def _later_buckets(self, buckets: list[Bucket]) -> list[Bucket]:
        """Buckets (this step only) of the parameters with a gradient outside ``buckets``; backup = w."""
        later = self._make_buckets(self.with_grads(outside=buckets))
        for b in later:
            b.restore_(b.backup.views, b.params)
        return later

    def restore_and_base_step(self, buckets: list[Bucket]) -> None:
        """Restore w exactly and take the base optimizer's step with the gradients now in ``.grad``.

        For the torch.optim classes of optim/adapters.py (SGD, Adam, AdamW, RMSprop) this is one
        fused primitive per bucket that writes the base optimizer's own state and honours a skip
        on the device (no host sync); any other base optimizer gets restore + ``base.step()``,
        which needs one host read of the skip flag.
        Sets ``last_step_skipped``.
        """
        if not buckets:
            self._run.last_step_skipped = None  # no gradient anywhere: nothing was checked
            self.base_optimizer.step()
            return
        extra = self._unbucketed_grads(buckets)
        held = hold_grads(buckets)  # read once for the check and the fused step, unless a hook runs between
        with held:
            coef, skip = self.final_grad_check(buckets, extra)
            self._restore_and_step(buckets, extra, coef, skip, held)

    def _restore_and_step(
        self, buckets: list[Bucket], extra: list, coef: Optional[Tensor], skip: Tensor, held: hold_grads
    ) -> None:
        self._run.last_step_skipped = skip
        if self.skipped_steps is None:
            self._run.skipped_steps = torch.zeros((), dtype=torch.int64, device=skip.device)
        elif self.skipped_steps.device != skip.device:  # the parameters moved: the count goes on
            self._run.skipped_steps = self.skipped_steps.to(skip.device)
        self.skipped_steps.add_(skip)
        kind = self._fused_kind()
        later = self._later_buckets(buckets) if kind is not None and extra else []
        # parameters that got a gradient only in a later pass (not perturbed) are stepped by the same
        # fused primitive, from a backup of their current weights
        fused = kind is not None and all(self._prepare_base_state(b, kind) for b in buckets + later)
        if fused:
            buckets = buckets + later
        else:
            self.restore(buckets)
            for b in buckets:
                b.base_state = None  # base.step() may create or replace state tensors
                if coef is not None:
                    b.combine_(b.grads(), b.grads(), coef, 0.0)
            if coef is not None:
                for backend, grads in extra:
                    ops.combine_(grads, grads, coef.to(grads[0].device), 0.0, backend=backend)
            if not bool(skip):  # the one host sync: a third-party step cannot be skipped on the device
                self.base_optimizer.step()
            else:  # the base's step hooks fire on a skipped step, as around the fused step (which skips on the device)
                _base_hooks(self.base_optimizer, 0)
                _base_hooks(self.base_optimizer, 1)
            return
        if _has_pre_hooks(self.base_optimizer):
            held.__exit__()  # a hook may assign .grad: the fused step reads the gradients again
        _base_hooks(self.base_optimizer, 0)
        self._fused_base_step(buckets, kind, coef, skip)
        _base_hooks(self.base_optimizer, 1)

    def _fused_base_step(
        self, buckets: list[Bucket], kind: adapters.Adapter, coef: Optional[Tensor], skip: Tensor
    ) -> None:
        # A step that creates the base optimizer's state reads the skip flag once on the host (the
        # first step only), so that a skipped first step leaves no state behind.
        skipped = bool(skip) if any(b.base_state["init"] for b in buckets) else None
        for b in buckets:
            c = None if coef is None else coef.to(b.device)
            kind.step(self.base_optimizer, b, b.base_state, c, skip.to(b.device), skipped)

    # ---------------------------------------------------------------- protocol
    def _begin_first(self) -> list[Bucket]:
        if self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called twice: call second_step() after the second "
                "forward/backward before starting the next step"
            )
        if not self._run.in_step:
            self._fire_user_hooks(0)
        self.new_step()
        return self.buckets()

    def new_step(self) -> None:
        """Start a step: forget the last step's non-finite mark (first_step calls this)."""
        self._run.nonfinite = None
        self._run.unchecked = []
        self._run.grads_bucketed = False
        self._clear_pending()
        if SharpnessAware._local_contexts:  # m-sharpness: refuses an algorithm that cannot keep replicas identical
            from ..distributed import begin_local_step

            self._run.local = begin_local_step(self)

    def average_local(
        self, buckets: list[Bucket], name: Optional[str] = None, tensors: Optional[list[Tensor]] = None
    ) -> None:
        """m-sharpness: replace a first-pass quantity by its average over the replicas when this
        step's first pass ran under ``sharpfused.distributed.local_perturbation``; else nothing.
        ``name``: that flat buffer of every bucket (once per step); ``tensors``: these contiguous
        tensors; neither: the gradients in ``.grad``. One all-reduce per bucket (per tensor)."""
        if self._local is not None:
            self._local.average(self, buckets, name, tensors)

    def update_pass(self, buckets: list[Bucket], scratch: str = "local_mean") -> None:
        """After a backward whose gradients enter the update: if it ran inside local_perturbation
        (e.g. ``step(closure)`` inside it, or LookSAM's reuse step) they are averaged here, one
        all-reduce per bucket through the flat buffer ``scratch``; nothing otherwise (DDP did it)."""
        if self._local is not None:
            self._local.update_pass(self, buckets, scratch)

    def _end_first(self, zero_grad: bool) -> None:
        """End of first_step: mark the step perturbed; with ``zero_grad``, clear the gradients for pass 2.

        When pass 1 was not finite (the step will be skipped), the smallest parameter gets a NaN
        gradient to accumulate into, so the second pass's gradients carry the overflow too:
        ``GradScaler`` then sees it (and backs off), and under DDP every replica sees it. Decided
        on the device; nothing changes when pass 1 was finite (the gradient starts at zeros).
        """
        self._run.perturbed = True
        self._bn_frozen(True)
        self._next_pass(zero_grad)

    def _mark_stepped(self) -> None:
        """What torch's LR schedulers check (``_opt_called``): on this optimizer and on the base one
        (a scheduler may be attached to either; the fused base step never calls ``base.step()``)."""
        self._run.opt_called = True
        base = self.base_optimizer
        if not torch.compiler.is_compiling() and not getattr(base, "_opt_called", False):
            base._opt_called = True  # once, eagerly: dynamo cannot set it on an Optimizer (torch 2.11)

    @contextmanager
    def _bn_frozen_pass(self) -> Iterator[None]:
        """A pass (outside first_step/second_step) whose BatchNorm statistics must not advance."""
        self._bn_frozen(True)
        try:
            yield
        finally:
            self._bn_frozen(False)

    def _bn_frozen(self, frozen: bool) -> None:
        """BatchNorm running statistics of ``bn_model`` stay as they are while the weights are perturbed."""
        if self.bn_model is not None:
            from ..bn import disable_running_stats, enable_running_stats

            (disable_running_stats if frozen else enable_running_stats)(self.bn_model)

    def _next_pass(self, zero_grad: bool) -> None:
        """Between two passes of a step: with ``zero_grad``, clear the gradients (and carry a
        non-finite mark into the next pass, see :meth:`_end_first`)."""
        if not zero_grad:
            return
        self.zero_grad()
        flag = self._nonfinite
        if flag is None or not self._buckets:
            return
        p = min((p for b in self._buckets for p in b.sources if p.numel() > 0), key=Tensor.numel, default=None)
        if p is None:
            return
        grad = torch.zeros_like(p)
        kernel_view(grad).masked_fill_(flag.to(grad.device), float("nan"))
        p.grad = grad

    def _begin_second(self) -> list[Bucket]:
        if not self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() called without first_step(): a step is "
                "first_step() (perturb, after the first backward), a second forward/backward at the "
                "perturbed weights, then second_step() (restore and update); or use step(closure)"
            )
        self.fill_missing_grads(self._buckets)
        self.update_pass(self._buckets)
        return self._buckets

    @staticmethod
    def fill_missing_grads(buckets: list[Bucket]) -> None:
        """A parameter of the step's buckets with no gradient in a later pass gets a zero gradient
        (it is then restored and stepped with the rest); call after each later pass's backward."""
        for b in buckets:
            if any(map(operator.is_, map(_GRAD, b.sources), _NONES)):
                for p in b.sources:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)

    def _end_second(self, zero_grad: bool) -> None:
        self._finish_step()
        self._run.perturbed = False
        self._mark_stepped()
        self._bn_frozen(False)
        if zero_grad:
            self.zero_grad()
        else:
            self._mark_grads(self._run.grads_bucketed)  # this step's gradients: not the next step's first pass
        if not self._run.in_step:
            self._fire_user_hooks(1)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w bit-exactly and take the base step with the gradient now in ``.grad``
        (the perturbed-point gradient, for SAM and every algorithm that does not override this)."""
        self.restore_and_base_step(self._begin_second())
        self._end_second(zero_grad)

    @torch.no_grad()
    def abort_step(self) -> None:
        """Put the weights back (bit-exactly) if a step was left perturbed, e.g. by an exception
        raised inside a closure, and forget the half-done step: no state moves, and the gradients
        (of the perturbed point) are cleared. Safe to call at any time."""
        if self._perturbed:
            if self._buckets:
                self.restore(self._buckets)
            self.zero_grad(set_to_none=True)  # gradients of the half-done step (at w + e) are stale
        for name, args in reversed(self._rollbacks):
            getattr(self, name)(*args)
        self._drop_created()
        self._clear_pending()
        self._run.perturbed = False
        self._bn_frozen(False)

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Run the passes of ``step(closure)``; on any exception the step is aborted before it
        propagates: weights restored, no state moved, and the gradients of the passes that ran
        cleared (as a completed ``step(closure)`` leaves them), so the next step starts clean."""
        try:
            yield
        except BaseException:
            self.abort_step()
            self.zero_grad(set_to_none=True)
            raise

    def _has_grads(self) -> bool:
        return any(p.grad is not None for g in self.param_groups for p in g["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's. After ``set_to_none=False`` the zero-filled gradients do not count as a
        first pass for ``step(closure)`` until a backward writes into them."""
        super().zero_grad(set_to_none)
        self._mark_grads()

    def _mark_grads(self, bucketed: bool = False) -> None:
        """Remember which gradient tensors are there now (after a step, after zero_grad): one that is
        still there, unwritten, later is not a new first pass. ``bucketed``: the parameters with a
        gradient are exactly the buckets' (known from this step's second pass)."""
        if bucketed:
            ps = [p for b in self._buckets for p in b.sources]
        else:
            ps = self._params_with_grads()
        ids = list(map(id, ps))
        gs = list(map(_GRAD, ps))
        # ids and versions now (C-level maps); the dict is built only when step(closure) asks
        self._run.zeroed = (ids, list(map(id, gs)), list(map(_VERSION, gs)))

    def has_first_pass_grads(self) -> bool:
        """Whether ``step(closure)`` finds the first pass's gradients in ``.grad``: a gradient tensor
        that is new since the last step or ``zero_grad``, or that a backward wrote into. A gradient
        that is the same tensor but was written in place (``zero_grad(set_to_none=False)`` of the
        model or the base optimizer zeroes in place, as a backward accumulates) is told apart by
        its values: one host read, only in that case."""
        return self._first_pass_grads()

    def _first_pass_grads(self) -> bool:
        marks, written = self._run.zeroed, []
        if isinstance(marks, tuple):
            marks = self._run.zeroed = dict(zip(marks[0], zip(marks[1], marks[2])))
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                mark = marks.get(id(p))
                seen = mark is not None and mark[0] == id(p.grad)
                if not seen and p.grad._version == 0:
                    return True  # a gradient tensor made since, untouched (a backward, or set by hand)
                if not seen or mark[1] != p.grad._version:
                    written.append(p.grad)  # written in place since it was made or seen
        if not written:
            return False
        return any(bool(x.ne(0).any()) for x in written)  # zeroed in place, or accumulated into

    def _finish_perturbed(self, closure: Optional[Callable[..., Any]], **kwargs: Any) -> Any:
        """``step()`` after ``first_step()``: ``closure`` (if given, with ``kwargs``) runs the second
        pass, then ``second_step()`` -- what a framework's optimizer step (or GradScaler.step) does.
        With a closure the gradients are cleared afterwards, as ``step(closure)`` leaves them."""
        with self.guarded():
            if closure is None:
                self.second_step(zero_grad=False)
                return None
            return self._last_passes(torch.enable_grad()(closure), **kwargs)

    def _last_passes(self, closure: Callable[..., Any], **kwargs: Any) -> Any:
        """After ``first_step()``: the passes still due (:meth:`remaining_passes`), the last pass
        (its loss kept in ``_last_pass_loss``), ``second_step()``; returns the last pass's loss."""
        self.remaining_passes(closure)
        loss = detached(closure(**kwargs))
        setattr(self._run, self._last_pass_loss, loss)
        self.second_step(zero_grad=True)
        return loss

    #: where step(closure) keeps the loss of a step's last pass
    _last_pass_loss = "last_perturbed_loss"

    def remaining_passes(self, closure: Callable[[], Any]) -> None:
        """The passes between ``first_step()`` and the last one (XSAM's ascents, BSAM's bilateral
        pass) when ``step(closure)`` completes a step begun by hand; none for two-pass algorithms."""

    def step_accumulated(self, loss_fn: Callable[..., Any], micro_batches: Iterable[Any]) -> Any:
        """One step over several micro-batches: every pass runs ``loss_fn(batch)`` on each of them and
        backpropagates ``loss / len(micro_batches)``, so the step equals the step on their union
        (same-size micro-batches and a mean loss). ``loss_fn`` returns the loss without calling
        backward; keyword arguments of the pass (BiSAM's ``perturbation``) are passed on. Returns the
        first pass's mean loss."""
        batches = list(micro_batches)
        if not batches:
            raise ValueError("step_accumulated needs at least one micro-batch")

        def closure(**kwargs: Any) -> Any:
            total = None
            for mb in batches:
                loss = loss_fn(mb, **kwargs)
                (loss / len(batches)).backward()
                total = loss.detach() if total is None else total + loss.detach()
            return total / len(batches)

        return self.step(closure)

    #: how to take a step by hand, for the error of step() without a closure
    _by_hand = "call first_step() and second_step() around the second forward/backward"

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One full step. ``closure`` recomputes the loss and its gradients (zero_grad is done here).

        If gradients are already present they are used for the first pass; otherwise the closure
        runs for it too. Then ``first_step()``, the passes an algorithm declares between it and the
        last one (:meth:`remaining_passes`: XSAM's ascents, BSAM's bilateral pass), the last pass
        and ``second_step()``; a ``first_step()`` that returns False has finished the step (LookSAM's
        reuse steps). Returns the first-pass loss (None when the first pass used gradients that were
        already there); the last pass's loss is kept in ``last_perturbed_loss`` (BSAM:
        ``last_min_loss``). Gradients are cleared (set to None) at the end, so that the
        perturbed-point gradients never seed the next step's first pass. After ``first_step()``,
        ``step()`` finishes the step begun by hand (what ``GradScaler.step(opt)`` calls).
        """
        if self._perturbed:
            return self._finish_perturbed(closure)
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward; or {self._by_hand}"
            )
        closure = torch.enable_grad()(closure)
        loss = None
        with self.guarded():
            if not self._first_pass_grads():
                loss = closure()
            if self.first_step(zero_grad=True) is not False:
                self._last_passes(closure)
        return loss

    # ---------------------------------------------------------------- state
    def _check_not_perturbed(self, what: str) -> None:
        if self._perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() between first_step() and second_step(): the model holds the "
                "perturbed weights w + e, so neither it nor the optimizer can be checkpointed now. Take "
                "checkpoints after second_step() (or call abort_step() first to put the weights back)"
            )

    def state_dict(self) -> dict[str, Any]:
        """Our state plus the base optimizer's (``"base_optimizer"``): resuming is exact.

        Refused between ``first_step()`` and ``second_step()`` (the weights are perturbed then):
        a checkpoint, of the model as of the optimizer, belongs after a completed step.
        """
        _refuse_torch_checkpoint(self, "get the state dict of")
        self._check_not_perturbed("state_dict")
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict`. A step left half done (perturbed weights) is
        aborted first, so the weights are back at w before the state is replaced."""
        _refuse_torch_checkpoint(self, "load a state dict into")
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() needs a dict made by a sharpfused optimizer's state_dict() "
                f"(with a 'base_optimizer' entry); got one with keys {keys}, which looks like a plain torch.optim "
                "state dict: load that into opt.base_optimizer.load_state_dict() instead"
            )
        groups = state_dict.get("param_groups", [])
        for i, g in enumerate(groups):
            missing = [k for k in self.hyper if k not in g]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict(): param group {i} of the state dict lacks "
                    f"{', '.join(missing)}; it was not made by a {type(self).__name__}"
                )
        self.abort_step()
        state_dict = dict(state_dict)
        base = state_dict.pop("base_optimizer")
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base)
        self.base_optimizer.param_groups = self.param_groups
        self.reset_buckets()

    def __getstate__(self) -> dict[str, Any]:
        """Everything (the base optimizer, buckets, step flags), so that a deep copy or a pickle
        continues bit-identically; buckets are only kept mid-step (they hold the backup then)."""
        state = self.__dict__.copy()
        if not self._perturbed:
            run = state["_run"] = copy.copy(self._run)
            run.buckets, run.bucket_key = [], None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _watch_base(self)
        # addresses differ in a copy: buckets are rebuilt at the next step; a copy taken mid-step
        # keeps its buckets (they hold the backup), keyed by the copied parameters
        self._run.bucket_key = None
        self._run.grads_bucketed = False
        if self._perturbed and self._buckets:
            inside = {id(p) for b in self._buckets for p in b.sources}
            self._run.bucket_key = _params_key([p for g in self.param_groups for p in g["params"] if id(p) in inside])

    def reset_buckets(self) -> None:
        """Forget buckets and cached views of state (after state tensors were replaced, e.g. by a load)."""
        self._run.bucket_key = None
        self._run.buckets = []
        self._run.perturbed = False


SharpnessAware.step = _in_step(SharpnessAware.step)
SharpnessAware.second_step = _aborts_on_error(SharpnessAware.second_step)


def _refuse_torch_checkpoint(opt: SharpnessAware, api: str) -> None:
    """torch.distributed.checkpoint.state_dict's functions on a sharpfused optimizer raise, naming ours."""
    from ..distributed import refuse_torch_checkpoint

    refuse_torch_checkpoint(opt, api)


def _base_pre_load(opt: SharpnessAware, base: Optimizer, state_dict: dict) -> None:
    """``opt.base_optimizer.load_state_dict()`` between the passes would replace the state under a
    half-done step: refused, as ``opt.load_state_dict`` aborts first."""
    if opt._perturbed:
        raise RuntimeError(
            f"{type(opt).__name__}.base_optimizer.load_state_dict() between first_step() and second_step(): "
            "finish the step (second_step()) or call abort_step() first"
        )


def _base_post_load(opt: SharpnessAware, base: Optimizer) -> None:
    """After ``opt.base_optimizer.load_state_dict()``: torch gave the base new param-group dicts and
    new state tensors. The optimizer takes the new groups as its own (a torch state dict lacks the
    sharpfused hyperparameters: they are kept from the old groups) and drops its views of the old
    state, so the next step reads and writes the loaded tensors."""
    old, new = opt.param_groups, base.param_groups
    if new is not old:
        for ng, og in zip(new, old):
            for k, val in og.items():
                ng.setdefault(k, val)
        opt.param_groups = new
    opt.reset_buckets()


def _watch_base(opt: SharpnessAware) -> None:
    """Hooks on the base optimizer's load_state_dict (again after a copy: torch.optim does not keep
    an optimizer's hooks through deepcopy or pickle)."""
    base = opt.base_optimizer
    if getattr(base, "_sharpfused_watched", None) is opt:
        return
    base.register_load_state_dict_pre_hook(functools.partial(_base_pre_load, opt))
    base.register_load_state_dict_post_hook(functools.partial(_base_post_load, opt))
    base._sharpfused_watched = opt
