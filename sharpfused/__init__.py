"""sharpfused: sharpness-aware optimizers (SAM and successors) as a few fused kernels per step."""

from . import distributed, losses, metrics, ops
from ._build import build_extension
from .bn import disable_running_stats, enable_running_stats, frozen_bn_stats
from .optim import BSAM, GSAM, SAM, SSAM, XSAM, BiSAM, FriendlySAM, LookSAM, SAMPa, SharpnessAware

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
