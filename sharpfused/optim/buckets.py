"""Buckets: the parameters of one (param group, device, dtype, sharding), as the kernels see them.

A bucket holds the parameters' kernel views (a DTensor's local shard, a complex tensor's real
view), its flat buffers (the backup, an algorithm's state) and the base optimizer's state view for
the fused step; the primitives are its methods (``b.perturb_(...)`` on the bucket's backend).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..buffers import FlatBuffer
from ..lists import Tensors


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a kernel reads: a DTensor's local shard (shares its storage), else ``t`` itself."""
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
    if mod is not None and isinstance(t, mod.DTensor):
        return t._local_tensor
    return t


def kernel_view(t: Tensor) -> Tensor:
    """The real tensor a kernel reads and writes for ``t``: its local shard (DTensor), and for a complex
    tensor its ``view_as_real`` (as torch.optim's own steps treat complex parameters)."""
    t = local_tensor(t)
    return torch.view_as_real(t) if t.is_complex() else t


def reduction_key(p: Tensor) -> Optional[tuple]:
    """``(mesh, mesh dims p is sharded over)`` for a sharded DTensor, else None (nothing to reduce).

    Partial sums over a local shard are summed across the Shard dims of the mesh only: a
    Replicate dim holds the same values on every rank and must not be counted twice.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None or not isinstance(p, mod.DTensor):
        return None
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"parameter of shape {tuple(p.shape)} has a Partial placement; sharded or replicated only")
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else None


class Bucket:
    """The parameters of one param group on one (device, dtype) that have gradients this step.

    ``backup`` is a flat buffer in the parameter dtype (exact restore); algorithms may hang
    more flat buffers on ``extra`` (saved gradients, masks).

    ``params`` are the tensors kernels read and write: the parameters themselves, or for
    DTensor parameters (FSDP2) their local shards. ``sources`` are the parameters (state keys,
    ``.grad``). ``reduce`` is None, or the (mesh, shard dims) whose partial sums are all-reduced.
    """

    __slots__ = (
        "group", "group_index", "params", "sources", "reduce", "backend", "backup", "extra", "base_state", "plain",
        "held_grads",
    )

    def __init__(
        self,
        group: dict,
        group_index: int,
        params: list[Tensor],
        backend: str,
        reduce: Optional[tuple] = None,
    ) -> None:
        self.group = group
        self.group_index = group_index
        self.sources = params
        self.params = Tensors([kernel_view(p) for p in params])  # described once (sharpfused.lists)
        # no DTensor and no complex parameter: a gradient is its own kernel view (grads() skips the views)
        self.plain = all(v is p for v, p in zip(self.params, params))
        self.reduce = reduce
        self.backend = backend
        self.backup = FlatBuffer(self.params)
        self.extra: dict[str, Any] = {}
        self.base_state: Optional[dict[str, Any]] = None  # fused base step's view of base state
        self.held_grads: Optional[list[Tensor]] = None  # see hold_grads

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def grads(self) -> list[Tensor]:
        """The kernel views of the parameters' ``.grad`` now (read once while :func:`hold_grads` holds them)."""
        if self.held_grads is not None:
            return self.held_grads
        if self.plain:  # device, dtype and sizes are the parameters' (torch enforces it for .grad)
            gs = Tensors.grads_of(self.params, [p.grad for p in self.sources])  # a listcomp: dynamo traces it
            if not gs.info.contiguous:  # a sparse gradient reads as non-contiguous
                refuse_sparse(self.sources)
            return gs
        refuse_sparse(self.sources)
        return [kernel_view(p.grad) for p in self.sources]

    def buffer(self, name: str, dtype: Optional[torch.dtype] = None, zero: bool = False) -> FlatBuffer:
        """A flat buffer shaped like the bucket's params, allocated on first use and kept."""
        buf = self.extra.get(name)
        if buf is None:
            buf = self.extra[name] = FlatBuffer(self.params, dtype=dtype, zero=zero)
        return buf


class hold_grads:
    """``with hold_grads(buckets):`` each bucket's :meth:`Bucket.grads` is read once and kept for the
    block: for code in which no ``.grad`` is assigned (one step of the optimizer, no user code), so
    that the norm and the update of a pass do not both walk the parameters."""

    __slots__ = ("buckets",)

    def __init__(self, buckets: list[Bucket]) -> None:
        self.buckets = buckets

    def __enter__(self) -> None:
        for b in self.buckets:
            b.held_grads = None
            b.held_grads = b.grads()

    def __exit__(self, *exc: Any) -> None:
        for b in self.buckets:
            b.held_grads = None


def refuse_sparse(params: list[Tensor]) -> None:
    """A clear error when a parameter's gradient is sparse (the kernels take dense tensors only)."""
    p = next((p for p in params if p.grad is not None and p.grad.layout != torch.strided), None)
    if p is not None:
        raise RuntimeError(
            f"sharpfused does not support sparse gradients (a parameter of shape {tuple(p.shape)} has one of "
            f"layout {p.grad.layout}); use a dense embedding or a dense optimizer"
        )


def _on_bucket(name: str) -> Callable[..., Any]:
    def method(self: Bucket, *args: Any, **kwargs: Any) -> Any:
        return getattr(ops, name)(*args, backend=self.backend, **kwargs)  # looked up per call: wrappable

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f":func:`sharpfused.ops.{name}` on the bucket's backend (``b.{name}(...)``)."
    return method


# the primitives as bucket methods, so algorithm files do not repeat ``backend=b.backend``
for _name in ops.PRIMITIVES:
    setattr(Bucket, _name, _on_bucket(_name))
del _name
