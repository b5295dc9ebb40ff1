"""Triton kernels for the primitives of :mod:`sharpfused.ops` (installed as ``sharpfused.kernels``)."""
