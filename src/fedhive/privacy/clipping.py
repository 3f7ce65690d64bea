"""Clipping model updates to an L2 norm, and the adaptive clip-norm rule.

An update is a client's new parameters minus the global model they started from. Its norm
is taken over all layers together (one flat vector), in float64.

Adaptive clipping follows Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private
Learning with Adaptive Clipping." NeurIPS 2021: each round the clip norm moves
geometrically towards the ``target_quantile`` of the update norms,
``C <- C * exp(-lr * (b - target_quantile))``, where ``b`` is the (noisy) fraction of
updates that were not clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedhive.common.records import NDArray, NDArrays

__all__ = ["clip_update", "l2_norm", "model_update", "next_clipping_norm"]


def model_update(new: Sequence[NDArray], reference: Sequence[NDArray]) -> NDArrays:
    """``new - reference`` layer by layer, in float64 (new arrays; inputs untouched)."""
    return [np.subtract(n, r, dtype=np.float64) for n, r in zip(new, reference, strict=True)]


def l2_norm(arrays: Sequence[NDArray]) -> float:
    """The L2 norm of all layers taken as one vector."""
    total = 0.0
    for arr in arrays:
        flat = np.asarray(arr, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(update: NDArrays, clipping_norm: float) -> tuple[NDArrays, float]:
    """Scale ``update`` in place so its norm is at most ``clipping_norm``.

    Returns the (same) arrays and the norm before clipping. The scale factor is
    ``min(1, C / norm)``, so the direction is kept; after scaling the norm is ``C`` up to
    float64 rounding, and it is re-checked so that it never exceeds ``C``.
    """
    norm = l2_norm(update)
    if norm > clipping_norm:
        factor = clipping_norm / norm
        for arr in update:
            arr *= factor
        # Rounding can leave the norm an ulp above C; shrink once more in that case.
        after = l2_norm(update)
        if after > clipping_norm:
            shrink = np.nextafter(clipping_norm / after, 0.0)
            for arr in update:
                arr *= shrink
    return update, norm


def next_clipping_norm(
    clipping_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Andrew et al.'s geometric update: ``C * exp(-lr * (b - target_quantile))``."""
    return clipping_norm * math.exp(-lr * (unclipped_fraction - target_quantile))
