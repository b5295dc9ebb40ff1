"""Backends that implement the primitives of :mod:`sharpfused.ops`.

``torch_ops`` (foreach ops, every device) lives here; the Triton backend is the
``sharpfused.kernels`` package and the CUDA backend wraps the ``sharpfused._C`` extension.
"""
