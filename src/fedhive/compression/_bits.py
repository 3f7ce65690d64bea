"""Packing unsigned integers of ``width`` bits into bytes, and back (vectorized numpy).

Widths 1, 2, 4 and 8 take a few whole-array operations; 16 is a little-endian view; other
widths up to 16 go through bit planes (slower, 8 x the count in temporaries).
"""

from __future__ import annotations

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import NDArray

__all__ = ["pack", "packed_nbytes", "unpack"]


def packed_nbytes(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits take once packed."""
    return -(-count * width // 8)


def pack(values: NDArray, width: int) -> NDArray:
    """``values`` (unsigned, each below ``2**width``) packed little-endian into uint8."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if width == 8:
        return flat.astype(np.uint8, copy=False)
    if width == 16:
        return flat.astype("<u2", copy=False).view(np.uint8)
    if width == 1:
        return np.packbits(flat.astype(np.bool_, copy=False), bitorder="little")
    if width in (2, 4):
        per = 8 // width
        count = flat.size
        padded = -(-count // per) * per
        v = flat.astype(np.uint8, copy=False)
        if padded != count:
            v = np.concatenate([v, np.zeros(padded - count, np.uint8)])
        grid = v.reshape(-1, per)
        out = grid[:, 0].copy()
        for j in range(1, per):
            out |= grid[:, j] << np.uint8(j * width)
        return out
    if 1 <= width <= 16:
        planes = (flat.astype(np.uint16)[:, None] >> np.arange(width, dtype=np.uint16)) & 1
        return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")
    raise SerdeError(f"bit width must be 1..16, got {width}")


def unpack(data: NDArray, width: int, count: int) -> NDArray:
    """The ``count`` values of ``width`` bits in ``data`` (uint8 or uint16 for width 16);
    :class:`SerdeError` unless ``data`` has exactly the packed size."""
    if data.dtype != np.uint8 or data.ndim != 1:
        raise SerdeError(f"packed data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
    expected = packed_nbytes(count, width)
    if data.size != expected:
        raise SerdeError(
            f"{count} values of {width} bits take {expected} bytes, the payload has {data.size}"
        )
    if width == 8:
        return data
    if width == 16:
        return data.view("<u2")
    if width == 1:
        return np.unpackbits(data, count=count, bitorder="little")
    if width in (2, 4):
        per = 8 // width
        mask = np.uint8((1 << width) - 1)
        out = np.empty((data.size, per), np.uint8)
        for j in range(per):
            np.bitwise_and(data >> np.uint8(j * width), mask, out=out[:, j])
        return out.reshape(-1)[:count]
    if 1 <= width <= 16:
        bits = np.unpackbits(data, count=count * width, bitorder="little").reshape(count, width)
        weights = (1 << np.arange(width, dtype=np.uint16)).astype(np.uint16)
        return (bits.astype(np.uint16) * weights).sum(axis=1, dtype=np.uint16)
    raise SerdeError(f"bit width must be 1..16, got {width}")
