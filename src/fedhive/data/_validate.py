"""Argument checks shared by the data loaders and partitioners (raise :class:`ConfigError`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError

__all__ = ["check_float", "check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int, refusing bools, non-integers and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, *, positive: bool) -> float:
    """A finite real number: ``> 0`` when ``positive``, else ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value}")
    return float(value)
