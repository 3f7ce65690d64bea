"""Randomized Hadamard rotations in blocks, and stable seeded draws.

A block of ``2**m`` values is rotated by ``H D / sqrt(2**m)``: ``D`` is a diagonal of
random signs, ``H`` the Walsh-Hadamard matrix. ``H`` of size ``a * b`` is the Kronecker
product of the ones of sizes ``a`` and ``b``, so a block reshaped to ``(a, b)`` is
rotated by two small matrix products (``H_a X H_b``): BLAS instead of ``m`` butterfly
passes over the whole array.

Seeded draws use ``PCG64.random_raw``, whose stream numpy keeps stable across versions,
so a client and a server with different numpy versions draw the same signs and indices.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedhive.common.records import NDArray

__all__ = ["hadamard", "random_signs", "rotate", "sample_indices", "unrotate"]


@lru_cache(maxsize=16)
def hadamard(size: int) -> NDArray:
    """The ``size x size`` Walsh-Hadamard matrix (``size`` a power of two), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def _factors(block: int) -> tuple[int, int]:
    m = block.bit_length() - 1
    a = 1 << (m // 2)
    return a, block // a


def random_signs(seed: int, count: int) -> NDArray:
    """``count`` random signs (+1/-1, float32) drawn from ``seed``."""
    words = np.random.PCG64(seed).random_raw(-(-count // 64))
    bits = np.unpackbits(np.asarray(words, "<u8").view(np.uint8), count=count, bitorder="little")
    signs = bits.astype(np.float32)
    signs *= -2.0
    signs += 1.0
    return signs


def _transform(blocks: NDArray, block: int) -> NDArray:
    a, b = _factors(block)
    x = blocks.reshape(-1, a, b)
    y = (x.reshape(-1, b) @ hadamard(b)).reshape(-1, a, b)
    out = np.matmul(hadamard(a), y)
    out *= np.float32(1.0 / np.sqrt(block))
    return out.reshape(-1, block)


def rotate(x: NDArray, block: int, seed: int) -> NDArray:
    """``x`` (float32, 1-D) zero-padded to whole blocks and rotated: shape (blocks, block)."""
    count = -(-x.size // block)
    padded = np.zeros(count * block, np.float32)
    padded[: x.size] = x
    padded *= random_signs(seed, padded.size)
    return _transform(padded, block)


def unrotate(blocks: NDArray, block: int, seed: int, size: int) -> NDArray:
    """The inverse of :func:`rotate` (``H`` is symmetric and orthogonal once scaled)."""
    out = _transform(blocks, block).reshape(-1)
    out *= random_signs(seed, out.size)
    return out[:size]


def sample_indices(seed: int, size: int, k: int) -> NDArray:
    """``k`` distinct indices in ``[0, size)``, sorted, drawn uniformly from ``seed``."""
    bits = np.random.PCG64(seed)
    if 4 * k > size:  # dense: rank random keys
        keys = bits.random_raw(size)
        return np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64)
    chosen = np.empty(0, np.int64)
    while chosen.size < k:
        draw = (np.asarray(bits.random_raw(2 * (k - chosen.size) + 16)) % size).astype(np.int64)
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
    return np.sort(chosen[:k])
