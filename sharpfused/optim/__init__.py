"""The algorithms, each a short file written in primitives."""

from .aesam import AESAM
from .base import SharpnessAware
from .bisam import BiSAM
from .bsam import BSAM
from .esam import ESAM
from .friendly import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .mesa import MESA
from .msam import MSAM
from .rst import RST
from .sam import SAM
from .sampa import SAMPa
from .ssam import SSAM
from .xsam import XSAM

__all__ = ["SAM", "SharpnessAware", "BSAM", "BiSAM", "FriendlySAM", "GSAM", "LookSAM", "SAMPa", "SSAM", "XSAM"]
__all__ += ["ESAM", "MESA"]  # sharpness_selection, trajectory_kl: sharpfused.<name> or their modules
__all__ += ["AESAM", "MSAM", "RST"]
