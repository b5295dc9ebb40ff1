"""Tensor lists described once: what the dispatcher and the kernels' launch tables read of a list.

Every primitive call checks its lists (one device and dtype? contiguous?) and the GPU backends key
their launch tables by the tensors' addresses and sizes. For a list of 148 tensors that is some
40-120 us of Python per list per call -- more than the kernels take. The lists an optimizer
passes are mostly its own, fixed for a bucket's life: the parameters' kernel views and the flat
buffers' views. A :class:`Tensors` is such a list with its :class:`ListInfo` computed once, at
construction; mutating it is refused, so the description cannot go stale. Any other list (a
user's, fresh gradients) is described at each call, exactly as before.

A bucket's gradient list (``Tensors.grads_of``) takes device, dtype and sizes from the parameters
-- torch refuses a ``.grad`` of another dtype, device or shape -- and scans only what can change
from one step to the next: the addresses and the contiguity.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

_KIND = operator.attrgetter("device", "dtype")


class ListInfo:
    """One list's layout: ``device`` and ``dtype`` (None when the tensors differ), ``contiguous``
    (every tensor), ``ptrs`` and ``numels`` (each tensor's address and size). The addresses are
    read when first asked for (the Triton launch tables key on them; the CUDA path never does)."""

    __slots__ = ("device", "dtype", "contiguous", "numels", "_xs", "_ptrs")

    def __init__(
        self,
        device: Optional[torch.device],
        dtype: Optional[torch.dtype],
        contiguous: bool,
        xs: Sequence[Tensor],
        numels: tuple[int, ...],
    ) -> None:
        self.device, self.dtype, self.contiguous, self.numels = device, dtype, contiguous, numels
        self._xs, self._ptrs = xs, None

    @property
    def ptrs(self) -> tuple[int, ...]:
        if self._ptrs is None:
            self._ptrs = tuple(map(Tensor.data_ptr, self._xs))
        return self._ptrs


def describe(xs: Sequence[Tensor]) -> ListInfo:
    """Scan every tensor of ``xs``."""
    kinds = set(map(_KIND, xs))
    device, dtype = next(iter(kinds)) if len(kinds) == 1 else (None, None)
    return ListInfo(device, dtype, all(map(Tensor.is_contiguous, xs)), xs, tuple(map(Tensor.numel, xs)))


def info(xs: Sequence[Tensor]) -> ListInfo:
    """The description of ``xs``: kept by a :class:`Tensors`, else scanned now."""
    known = getattr(xs, "info", None)
    return known if known is not None else describe(xs)


def _frozen(self: Tensors, *args: Any, **kwargs: Any) -> Any:
    raise TypeError("a Tensors list is described once and cannot change; build a new list instead")


class Tensors(list):
    """A list of tensors described once (:attr:`info`); it refuses to change."""

    __slots__ = ("info",)

    def __init__(self, tensors: Sequence[Tensor], info: Optional[ListInfo] = None) -> None:
        super().__init__(tensors)
        self.info = describe(list(self)) if info is None else info  # a copy: no reference cycle

    @classmethod
    def grads_of(cls, params: Tensors, grads: list[Tensor]) -> Tensors:
        """The gradients of ``params`` (same device, dtype and sizes, as torch enforces for
        ``.grad``): only their addresses and contiguity are read."""
        p = params.info
        return cls(grads, ListInfo(p.device, p.dtype, all(map(Tensor.is_contiguous, grads)), grads, p.numels))

    def __reduce__(self) -> tuple:
        # a copy (copy.deepcopy, pickle) holds other tensors: described anew, never the old addresses
        return (Tensors, (list(self),))

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _frozen
    append = extend = insert = pop = remove = clear = sort = reverse = _frozen
