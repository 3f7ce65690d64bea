"""An encoded update as one compact byte frame (a single uint8 array on the wire).

A codec's output is a few named arrays and scalars; sent as records, each array costs a
JSON entry of about 80 bytes in the message header plus alignment, more than the whole
payload of a 1-bit update of a small model. The frame keeps them in one buffer::

    u8 version (1) | u8 len, codec id | u8 count, info entries | u8 count, array entries
    | zero padding to 8 | array data, each padded to 8 bytes

An info entry is ``u8 len, key, u8 kind`` then ``u8 len, text`` (kind 0) or ``i64``
(kind 1); an array entry is ``u8 len, name, u8 dtype code, u32 count``. Everything is
little-endian. :func:`unpack` checks every length against the buffer and refuses
garbage with :class:`~fedhive.common.errors.SerdeError`; arrays come back as views.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import NDArray, Scalar

__all__ = ["pack", "unpack"]

VERSION = 1
_DTYPES = ("<u1", "<u2", "<u4", "<u8", "<f2", "<f4")
_CODES = {np.dtype(d): i for i, d in enumerate(_DTYPES)}
_MAX_HEAD = 3 + 256 + 255 * (256 + 1 + 256) + 255 * (256 + 5)  # the largest header


def _text(value: str, what: str) -> bytes:
    data = value.encode("ascii")
    if len(data) > 255:
        raise SerdeError(f"{what} {value[:20]!r}... is longer than 255 bytes")
    return bytes([len(data)]) + data


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def pack(codec_id: str, arrays: Mapping[str, NDArray], info: Mapping[str, Scalar]) -> NDArray:
    """The frame of one encoding (uint8)."""
    head = bytearray([VERSION])
    head += _text(codec_id, "a codec id")
    head.append(len(info))
    for key, value in info.items():
        head += _text(key, "an info key")
        if isinstance(value, str):
            head += b"\x00" + _text(value, "an info value")
        elif isinstance(value, int) and not isinstance(value, bool):
            head += b"\x01" + struct.pack("<q", value)
        else:
            raise SerdeError(f"info {key!r} must be a str or an int, got {value!r}")
    if len(arrays) > 255 or len(info) > 255:
        raise SerdeError("a frame holds at most 255 arrays and 255 info entries")
    head.append(len(arrays))
    parts = []
    for name, arr in arrays.items():
        flat = np.ascontiguousarray(arr).reshape(-1)
        dtype = flat.dtype.newbyteorder("<") if flat.dtype.itemsize > 1 else flat.dtype
        code = _CODES.get(np.dtype(dtype))
        if code is None:
            raise SerdeError(f"payload array {name!r} has dtype {flat.dtype}, not in {_DTYPES}")
        head += _text(name, "an array name") + struct.pack("<BI", code, flat.size)
        parts.append(flat.astype(dtype, copy=False).view(np.uint8))
    at = _pad8(len(head))
    out = np.zeros(at + sum(_pad8(p.size) for p in parts), np.uint8)
    out[: len(head)] = np.frombuffer(bytes(head), np.uint8)
    for p in parts:
        out[at : at + p.size] = p
        at += _pad8(p.size)
    return out


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise SerdeError("the compressed payload's frame is truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def text(self, what: str) -> str:
        raw = self.take(self.byte())
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise SerdeError(f"{what} in the compressed payload is not ASCII") from None


def unpack(frame: object) -> tuple[str, dict[str, NDArray], dict[str, Scalar]]:
    """(codec id, arrays, info) of a frame; :class:`SerdeError` with the reason when the
    buffer is not exactly one well-formed frame."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 1:
        raise SerdeError("a compressed payload is one 1-D uint8 array")
    buf = np.ascontiguousarray(frame)
    if buf.ctypes.data % 8:
        buf = buf.copy()  # numpy allocations are aligned: views of the data will be too
    head = _Reader(bytes(buf[:_MAX_HEAD]))
    if buf.size == 0 or head.byte() != VERSION:
        raise SerdeError(f"a compressed payload frame starts with version {VERSION}")
    codec_id = head.text("the codec id")
    info: dict[str, Scalar] = {}
    for _ in range(head.byte()):
        key = head.text("an info key")
        kind = head.byte()
        if kind == 0:
            value: Scalar = head.text("an info value")
        elif kind == 1:
            value = struct.unpack("<q", head.take(8))[0]
        else:
            raise SerdeError(f"info {key!r} has an unknown kind {kind}")
        if key in info:
            raise SerdeError(f"info {key!r} appears twice in the compressed payload")
        info[key] = value
    entries = []
    for _ in range(head.byte()):
        name = head.text("an array name")
        code, count = struct.unpack("<BI", head.take(5))
        if code >= len(_DTYPES):
            raise SerdeError(f"payload array {name!r} has an unknown dtype code {code}")
        entries.append((name, np.dtype(_DTYPES[code]), count))
    at = _pad8(head.at)
    arrays: dict[str, NDArray] = {}
    for name, dtype, count in entries:
        if name in arrays:
            raise SerdeError(f"payload array {name!r} appears twice")
        nbytes = count * dtype.itemsize
        if at + nbytes > buf.size:
            raise SerdeError(f"payload array {name!r} runs past the end of the frame")
        arrays[name] = buf[at : at + nbytes].view(dtype)
        at += _pad8(nbytes)
    if at != buf.size:
        raise SerdeError(f"the compressed payload has {buf.size - at} bytes past its arrays")
    return codec_id, arrays, info
