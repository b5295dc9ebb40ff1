"""Flat, contiguous optimizer-owned buffers with one view per parameter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class FlatBuffer:
    """One contiguous allocation for a bucket of tensors, with a segment table.

    ``flat`` is the storage; ``views[i]`` has the shape of ``like[i]``; ``offsets[i]`` and
    ``numels[i]`` locate it. Allocated once per bucket; a step writes into it in place.
    """

    def __init__(self, like: Sequence[Tensor], dtype: torch.dtype | None = None, zero: bool = False) -> None:
        if not like:
            raise ValueError("FlatBuffer needs at least one tensor")
        dtype = dtype or like[0].dtype
        self.numels = [t.numel() for t in like]
        self.offsets = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += n
        alloc = torch.zeros if zero else torch.empty
        self.flat = alloc(off, dtype=dtype, device=like[0].device)
        self.views = [self.flat[o : o + n].view(t.shape) for o, n, t in zip(self.offsets, self.numels, like)]

    def __len__(self) -> int:
        return len(self.views)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()
