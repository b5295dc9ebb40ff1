"""sharpfused: sharpness-aware optimizers (SAM and successors) as a few fused kernels per step."""

from . import distributed, losses, metrics, ops
from ._build import build_extension
from .bn import disable_running_stats, enable_running_stats, frozen_bn_stats
from .optim import BSAM, GSAM, SAM, SSAM, XSAM, BiSAM, FriendlySAM, LookSAM, SAMPa, SharpnessAware
from .optim.aesam import AESAM
from .optim.esam import ESAM, sharpness_selection
from .optim.mesa import MESA, trajectory_kl
from .optim.msam import MSAM
from .optim.rst import RST

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "BSAM",
    "BiSAM",
    "FriendlySAM",
    "GSAM",
    "LookSAM",
    "SAMPa",
    "SSAM",
    "XSAM",
    "ESAM",
    "MESA",
    "sharpness_selection",
    "trajectory_kl",
    "AESAM",
    "MSAM",
    "RST",
    "losses",
    "metrics",
    "SharpnessAware",
    "distributed",
    "build_extension",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_bn_stats",
    "ops",
]
