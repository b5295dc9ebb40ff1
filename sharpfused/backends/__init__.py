"""Backends that implement the primitives of :mod:`sharpfused.ops`.

``torch_ops`` (foreach ops, every device) lives here; the Triton backend is the
``sharpfused.kernels`` package and the CUDA backend wraps the ``sharpfused._C`` extension.

:func:`upload` is the one way host values (launch tables, index lists) reach a device inside a
step: a pageable host-to-device copy synchronizes the stream, so CUDA copies go through pinned
memory, non-blocking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor


def upload(host: Union[Tensor, Sequence[int]], device: torch.device) -> Tensor:
    """``host`` (a CPU tensor, or a list of ints made int64) on ``device``, never blocking the host.

    CPU: the tensor itself. CUDA: pinned staging and a non-blocking copy (torch's host allocator
    reuses the pinned block only after the copy has run). Refused during CUDA graph capture: the
    captured copy would re-read the staging memory at every replay, after it was reused.
    """
    if not isinstance(host, Tensor):
        host = torch.tensor(host, dtype=torch.int64)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sharpfused: host values (a launch table or an index list for new tensor addresses or sizes) "
                "would be copied to the GPU during CUDA graph capture; run the step once on the same tensors "
                "before capturing (the usual warm-up)"
            )
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
