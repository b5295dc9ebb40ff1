"""Flat, contiguous optimizer-owned buffers with one view per parameter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .lists import Tensors

#: every segment of a flat buffer starts at a multiple of this many bytes, so that the kernels'
#: 16-byte vector accesses apply to every view (the allocation itself is at least this aligned)
ALIGN_BYTES = 16


class FlatBuffer:
    """One contiguous allocation for a bucket of tensors, with a segment table.

    ``flat`` is the storage; ``views[i]`` has the shape of ``like[i]``; ``offsets[i]`` and
    ``numels[i]`` locate it. Each segment starts on a 16-byte boundary (:data:`ALIGN_BYTES`): the
    gaps between segments (at most 15 bytes each) are zero and belong to no view. ``numel`` counts
    the views' elements; :meth:`dense` / :meth:`assign` read and write them as one 1-d tensor
    without the gaps. Allocated once per bucket; a step writes into it in place.
    """

    def __init__(self, like: Sequence[Tensor], dtype: torch.dtype | None = None, zero: bool = False) -> None:
        if not like:
            raise ValueError("FlatBuffer needs at least one tensor")
        dtype = dtype or like[0].dtype
        step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        self.numels = [t.numel() for t in like]
        self.offsets = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += -(-n // step) * step
        self.numel = sum(self.numels)
        self.padded = off != self.numel
        alloc = torch.zeros if zero or self.padded else torch.empty  # the gaps are zero: a whole-buffer
        self.flat = alloc(off, dtype=dtype, device=like[0].device)  # all-reduce or broadcast stays finite
        # described once (sharpfused.lists): the dispatcher and the launch tables read no tensor of it
        self.views = Tensors([self.flat[o : o + n].view(t.shape) for o, n, t in zip(self.offsets, self.numels, like)])

    def __len__(self) -> int:
        return len(self.views)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def dense(self) -> Tensor:
        """The views' elements in order as one 1-d tensor (``flat`` itself when there are no gaps)."""
        if not self.padded:
            return self.flat
        return torch.cat([v.reshape(-1) for v in self.views])

    def assign(self, values: Tensor) -> None:
        """Write ``values`` (1-d, :attr:`numel` elements, in view order) into the views."""
        if values.numel() != self.numel:
            raise ValueError(f"FlatBuffer.assign: {values.numel()} values for {self.numel} elements")
        if not self.padded:
            self.flat.copy_(values)
            return
        for v, part in zip(self.views, values.split(self.numels)):
            v.copy_(part.view(v.shape))
