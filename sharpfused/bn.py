"""BatchNorm running statistics during the second (perturbed) forward pass.

SAM runs two forward passes per step on the same batch. The second one is taken at the
perturbed weights w + e and must not update BatchNorm's running mean/var (nor its batch
counter) a second time. Set ``track_running_stats = False`` on every BatchNorm module for
that pass: the module still normalizes with the batch statistics, and leaves its buffers
untouched -- exactly what the first pass would have done minus the update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_SAVED = "_sharpfused_track_running_stats"


def _bn_modules(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm modules of ``model`` from updating running statistics (call before the 2nd forward)."""
    for m in _bn_modules(model):
        if not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
        m.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` (call before the next step's first forward)."""
    for m in _bn_modules(model):
        if hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: BatchNorm running statistics of ``model`` are not updated inside.

    >>> with frozen_bn_stats(model):
    ...     loss_fn(model(x), y).backward()   # second forward/backward of a SAM step
    """
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
