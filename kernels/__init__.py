"""Triton kernels for the primitives of :mod:`sharpfused.ops` (installed as ``sharpfused.kernels``).

One launch per primitive per (device, dtype) group, however many tensors: every kernel walks a
multi-tensor table (:mod:`.table`) and never loops over tensors on the host. fp32/bf16/fp16 are
computed in fp32 and rounded once; float64 (and non-contiguous) groups are refused by
:func:`.table.supports` and sent to the torch backend by the dispatcher (:mod:`sharpfused.ops`).
Reductions are two-stage with a fixed partition: no atomics, deterministic.
Per-step scalars are runtime arguments or device tensors read by the kernel, never constexprs.

Importing this package imports triton: that is how the dispatcher learns that Triton is missing.
"""

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from .combine import combine_
from .dot_norms import dot_norms
from .perturb import perturb_
from .restore import restore_
from .restore_step import restore_adamw_, restore_rmsprop_, restore_sgd_
from .sq_norm import sq_norm
from .table import supports

__all__ = [
    "combine_", "dot_norms", "perturb_", "restore_", "restore_adamw_", "restore_rmsprop_", "restore_sgd_", "sq_norm",
    "supports",
]  # fmt: skip
