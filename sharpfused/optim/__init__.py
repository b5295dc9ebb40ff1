"""The algorithms, each a short file written in primitives."""

from .base import SharpnessAware
from .bisam import BiSAM
from .bsam import BSAM
from .friendly import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .sam import SAM
from .sampa import SAMPa
from .ssam import SSAM
from .xsam import XSAM

__all__ = ["SAM", "SharpnessAware", "BSAM", "BiSAM", "FriendlySAM", "GSAM", "LookSAM", "SAMPa", "SSAM", "XSAM"]
