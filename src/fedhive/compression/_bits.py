"""Packing unsigned integers of ``width`` bits into bytes, and back (vectorized numpy).

Widths 1, 2, 4 and 8 take a few whole-array operations; 16 is a little-endian view; other
widths up to 16 go through bit planes (slower, 8 x the count in temporaries).
"""

from __future__ import annotations

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import NDArray

__all__ = ["byte_table", "lookup", "pack", "packed_nbytes", "unpack"]

#: Widths whose values never straddle a byte: :func:`lookup` maps their packed bytes.
BYTE_WIDTHS = (1, 2, 4, 8)


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
        return _pack_small(flat.astype(np.uint8, copy=False), width)
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
        return _unpack_small(data, width, count)
    if 1 <= width <= 16:
        bits = np.unpackbits(data, count=count * width, bitorder="little").reshape(count, width)
        weights = (1 << np.arange(width, dtype=np.uint16)).astype(np.uint16)
        return (bits.astype(np.uint16) * weights).sum(axis=1, dtype=np.uint16)
    raise SerdeError(f"bit width must be 1..16, got {width}")


def _pack_small(v: NDArray, width: int) -> NDArray:
    """2- or 4-bit values (uint8) packed: the values of each output byte, read as one
    little-endian word, are folded into its low byte by shifts (``v | v >> 4`` for two
    nibbles), a few passes over words instead of one per value in a byte."""
    per = 8 // width
    if v.size % per:
        v = np.concatenate([v, np.zeros(per - v.size % per, np.uint8)])
    word = v.view("<u2" if width == 4 else "<u4")
    folded = np.bitwise_or(word, np.right_shift(word, 8 - width))
    if width == 2:
        folded |= np.right_shift(folded, 12)
    return folded.astype(np.uint8)


def _unpack_small(data: NDArray, width: int, count: int) -> NDArray:
    """The inverse of :func:`_pack_small`: each byte spread over a word, one value per
    byte, masked."""
    if width == 4:
        word = data.astype("<u2")
        word |= word << 4
        word &= np.uint16(0x0F0F)
    else:
        word = data.astype("<u4")
        word |= word << 12
        word |= word << 6
        word &= np.uint32(0x03030303)
    return word.view(np.uint8)[:count]


def byte_table(values: NDArray, width: int) -> NDArray:
    """For a width in :data:`BYTE_WIDTHS` and ``values`` (``2**width`` entries): row ``b``
    holds ``values[v]`` for each of the ``8 // width`` values packed in byte ``b``, in
    order (little-endian), so one row gather per byte decodes and looks up at once."""
    if width not in BYTE_WIDTHS or values.shape != (1 << width,):
        raise SerdeError(f"a byte table takes 2**width values, width in {BYTE_WIDTHS}")
    per = 8 // width
    shifts = np.arange(per) * width
    codes = (np.arange(256)[:, None] >> shifts) & ((1 << width) - 1)
    return np.ascontiguousarray(values[codes])


def lookup(data: NDArray, table: NDArray, out: NDArray) -> NDArray:
    """``values[v]`` for every value packed in the bytes ``data`` (:func:`byte_table`
    ``table``), into the flat ``out`` of ``data.size * table.shape[1]`` elements.

    The rows are gathered whole (an 8- to 32-byte move per byte), through an unsigned
    integer view of the table where a row is one such word.
    """
    rows = table.shape[1] * table.itemsize
    if rows in (1, 2, 4, 8):
        words = table.view(f"<u{rows}").reshape(256)
        np.take(words, data, out=out.view(f"<u{rows}"), mode="wrap")
    else:
        np.take(table, data, axis=0, out=out.reshape(data.size, -1), mode="wrap")
    return out
