"""Where differential-privacy noise comes from.

Two sources share one small interface (``standard_normal(shape)`` and ``private``):

- :class:`SecureGaussian` (the default everywhere): standard normal samples built from
  ``os.urandom`` bytes, the operating system's cryptographically secure generator. Each
  pair of uniforms becomes a pair of normals by the Box-Muller transform (Box & Muller
  1958, "A Note on the Generation of Random Normal Deviates"). Nothing is seeded, so no
  run, resumed or not, can replay the noise. Floating-point normals leak through the
  gaps of their representation (Mironov 2012, "On Significance of the Least Significant
  Bits for Differential Privacy"; Jin et al. 2022, "Are We There Yet? Timing and
  Floating-Point Attacks on Differential Privacy Systems"); following Holohan & Braghin
  2021, "Secure Random Sampling in Differential Privacy", each output is the sum of four
  independent normals divided by two, which keeps the distribution N(0, 1) and makes
  the attack exponentially harder. This costs 4x the random bytes (32 bytes per output).
- :class:`SeededGaussian`: numpy's PCG64 seeded by the caller. For reproducible
  experiments and statistical tests only: anyone who knows the seed can subtract the
  noise, so every component that uses it marks its output ``dp_not_private``.

Memory: a draw of ``n`` values holds the random bytes (32 n) and a few float64 work
arrays of ``n`` values while it runs.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from fedhive.common.records import NDArray

__all__ = ["NoiseSource", "SecureGaussian", "SeededGaussian", "secure_uniform"]

_TWO_POW_MINUS_53 = 2.0**-53


class NoiseSource(Protocol):
    """Draws standard normal values; ``private`` is False when the draws can be replayed."""

    private: bool

    def standard_normal(self, shape: tuple[int, ...]) -> NDArray: ...


def secure_uniform(size: int) -> NDArray:
    """``size`` float64 values uniform on [0, 1), 53 random bits each, from ``os.urandom``."""
    raw = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


def _box_muller(size: int) -> NDArray:
    pairs = (size + 1) // 2
    uniforms = secure_uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log1p(-uniforms[:pairs]))  # 1 - u lies in (0, 1]
    angle = (2.0 * math.pi) * uniforms[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


class SecureGaussian:
    """Standard normals from the operating system's secure generator; never replayable.

    ``hardened`` (default) sums four normals and halves the sum (Holohan & Braghin 2021)
    to blunt floating-point attacks.

    Example::

        noise = SecureGaussian().standard_normal((3, 2))
    """

    private = True

    def __init__(self, hardened: bool = True) -> None:
        self.hardened = hardened

    def __repr__(self) -> str:
        return f"SecureGaussian(hardened={self.hardened})"

    def standard_normal(self, shape: tuple[int, ...]) -> NDArray:
        size = math.prod(shape)
        if not self.hardened:
            return _box_muller(size).reshape(shape)
        total = _box_muller(size)
        for _ in range(3):
            total += _box_muller(size)
        total *= 0.5
        return total.reshape(shape)


class SeededGaussian:
    """Replayable standard normals for tests and reproducible experiments: NOT private.

    Example::

        noise = SeededGaussian(seed=7).standard_normal((4,))
    """

    private = False

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"SeededGaussian(seed={self.seed})"

    def standard_normal(self, shape: tuple[int, ...]) -> NDArray:
        return self._rng.standard_normal(shape)
