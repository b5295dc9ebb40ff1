"""The algorithms, each a short file written in primitives."""

from .base import SharpnessAware
from .sam import SAM

__all__ = ["SAM", "SharpnessAware"]
