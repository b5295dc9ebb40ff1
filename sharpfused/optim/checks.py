"""Hyperparameter validation: a clear error naming the parameter and the allowed range."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def _host_value(value: Any) -> Any:
    """A hyperparameter as a host number when reading it is free (a number, or a CPU tensor), else None."""
    if isinstance(value, Tensor):
        return value.item() if value.device.type == "cpu" else None
    return value


def _check_number(name: str, value: Any, low: float = 0.0, *, strict: bool = False, where: str = "") -> None:
    """A real number (numpy scalars included) or a 1-element tensor, finite and >= ``low`` (> when strict).

    CPU tensors are read and checked; device tensors are not read back (no host sync): the caller
    owns their range, as documented.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}{where} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}{where} must be a real number, got a {value.dtype} tensor")
        value = _host_value(value)
        if value is None:
            return
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{where} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        rng = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name}{where} must be a finite number {rng}, got {value}")


def _as_python(value: Any) -> Any:
    """numpy scalars (numbers.Real that are not Python numbers) as Python floats; anything else as it is."""
    if isinstance(value, (bool, Tensor)) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # np.float32, and np.float64 (a float subclass)
        return float(value)
    return value


def check_rho(name: str, value: Any, where: str) -> None:
    _check_number(name, value, where=where)


def check_nonneg(name: str, value: Any, where: str) -> None:
    _check_number(name, value, where=where)


def check_positive(name: str, value: Any, where: str) -> None:
    _check_number(name, value, strict=True, where=where)


def check_bool(name: str, value: Any, where: str) -> None:
    """True or False; 0 and 1 (ints, numpy bools) too, as the popular SAM port accepts them."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):  # numpy.bool_ / numpy 2's bool
        return
    raise TypeError(f"{name}{where} must be True or False (or 0 / 1), got {value!r}")


def check_unit(name: str, value: Any, where: str) -> None:
    """A number in [0, 1]."""
    _check_number(name, value, where=where)
    host = _host_value(value)
    if host is not None and host > 1:
        raise ValueError(f"{name}{where} must be in [0, 1], got {float(host)}")
