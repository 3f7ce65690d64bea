"""A lean binary content for replies that carry one byte buffer instead of a model.

A compressed fit reply (:mod:`fedhive.compression`) has no model arrays: its update is one
uint8 frame in ``extras``. As a record payload (:mod:`fedhive.common.serde`) its JSON
header (the array entry, the record lists, the metrics and status as scalar triples, the
padding to 64 bytes) takes about 450 bytes, more than a quarter of a 1-bit update of a
12k-parameter model. :func:`encode` writes such a reply as::

    magic b"FHIVEPKR" | u8 version (1) | u8 status code | u64 num_examples
    | u16 n, status message (utf-8) | u8 count, metrics | u8 n, record name
    | u8 n, array name | the buffer, to the end of the content

A metric is ``u8 n, key (utf-8) | u8 tag | value``: tag 0 bool (u8 0/1), 1 int (i64),
2 float (f64), 3 str (u32 n, utf-8), 4 bytes (u32 n, data). Everything is little-endian.
A reply qualifies (:func:`packable`) when its parameters are empty, its extras are one
array record holding one 1-D uint8 array and nothing else, and its metrics are plain
scalars that fit these fields; any other content keeps the record payload, which the
decoder tells apart by its magic. :func:`decode` checks every length against the buffer
and every value it reads, and refuses garbage with
:class:`~fedhive.common.errors.SerdeError`; the buffer comes back as a view of the
received bytes (no copy).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import Code, FitRes, Parameters, RecordDict, Scalar, Status
from fedhive.transport.limits import MAX_NUM_EXAMPLES

__all__ = ["MAGIC", "decode", "encode", "packable", "size"]

MAGIC = b"FHIVEPKR"
VERSION = 1
_HEAD = struct.Struct("<8sBBQ")  # magic, version, status code, num_examples
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_I64, _F64 = struct.Struct("<q"), struct.Struct("<d")
_CODES = {int(c) for c in Code}


def _fixed_sizes(res: Any) -> tuple[int, ...] | None:
    """Byte lengths of the variable fields of ``res`` (status message, metric keys and
    values, names), or None when ``res`` does not qualify."""
    if type(res) is not FitRes or res.parameters.arrays:
        return None
    extras = res.extras
    if (
        type(extras) is not RecordDict
        or extras.config_records
        or extras.metric_records
        or len(extras.array_records) != 1
    ):
        return None
    ((rec_name, record),) = extras.array_records.items()
    if type(record) is not dict or len(record) != 1:
        return None
    ((name, array),) = record.items()
    if type(array) is not np.ndarray or array.dtype != np.uint8 or array.ndim != 1:
        return None
    n = res.num_examples
    message = res.status.message
    if type(n) is not int or not 0 <= n <= MAX_NUM_EXAMPLES or type(message) is not str:
        return None
    if type(res.metrics) is not dict or len(res.metrics) > 255:
        return None
    out = []
    for text, limit in ((message, 0xFFFF), (rec_name, 255), (name, 255)):
        if type(text) is not str:
            return None
        length = len(text.encode("utf-8", "surrogatepass"))
        if length > limit:
            return None
        out.append(length)
    for key, value in res.metrics.items():
        value_len = _metric_len(value)
        if type(key) is not str or value_len is None:
            return None
        length = len(key.encode("utf-8", "surrogatepass"))
        if length > 255:
            return None
        out += [length, value_len]
    return tuple(out)


def _metric_len(value: object) -> int | None:
    kind = type(value)
    if kind is bool:
        return 1
    if kind is int:
        return 8 if -(1 << 63) <= value < (1 << 63) else None  # type: ignore[operator]
    if kind is float:
        return 8
    if kind is str:
        return 4 + len(value.encode("utf-8", "surrogatepass"))  # type: ignore[attr-defined]
    if kind is bytes:
        return 4 + len(value)  # type: ignore[arg-type]
    return None


def packable(content: object) -> bool:
    """Whether ``content`` travels as a packed reply."""
    return _fixed_sizes(content) is not None


def size(res: object) -> int | None:
    """``len(encode(res))`` without encoding it; ``None`` if ``res`` is not
    :func:`packable`."""
    lengths = _fixed_sizes(res)
    if lengths is None or not isinstance(res, FitRes):
        return None
    ((array,),) = (tuple(r.values()) for r in res.extras.array_records.values())
    metrics = len(res.metrics)
    # head, u16 message, u8 count, u8 per key and per tag, u8 per name, the buffer
    return _HEAD.size + 2 + 1 + 2 * metrics + 2 + sum(lengths) + array.nbytes


def encode(res: object) -> list[bytes | memoryview] | None:
    """``res`` as pieces (the header, then a view of the buffer); ``None`` if it is not
    :func:`packable`."""
    if not isinstance(res, FitRes) or _fixed_sizes(res) is None:
        return None
    ((rec_name, record),) = res.extras.array_records.items()
    ((name, array),) = record.items()
    out = bytearray(_HEAD.pack(MAGIC, VERSION, int(res.status.code), res.num_examples))
    message = res.status.message.encode("utf-8", "surrogatepass")
    out += _U16.pack(len(message)) + message
    out += _U8.pack(len(res.metrics))
    for key, value in res.metrics.items():
        out += _short(key)
        if type(value) is bool:
            out += b"\x00" + _U8.pack(int(value))
        elif type(value) is int:
            out += b"\x01" + _I64.pack(value)
        elif type(value) is float:
            out += b"\x02" + _F64.pack(value)
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            out += b"\x03" + _U32.pack(len(data)) + data
        else:
            data = bytes(value)  # type: ignore[arg-type]  # packable: bytes
            out += b"\x04" + _U32.pack(len(data)) + data
    out += _short(rec_name) + _short(name)
    buffer: Any = np.ascontiguousarray(array)
    return [bytes(out), memoryview(buffer).cast("B")]


def _short(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return _U8.pack(len(data)) + data


class _Reader:
    def __init__(self, view: memoryview, max_header: int | None) -> None:
        self.view, self.at, self.max_header = view, 0, max_header

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.view):
            raise SerdeError("the packed reply is truncated")
        if self.max_header is not None and self.at + n > self.max_header:
            raise SerdeError(f"the packed reply's header exceeds {self.max_header} bytes")
        out = self.view[self.at : self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack(self.take(fmt.size))[0]

    def text(self, length: int, what: str) -> str:
        try:
            return bytes(self.take(length)).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise SerdeError(f"{what} in the packed reply is not utf-8") from None


def decode(view: memoryview, max_header_bytes: int | None = None) -> FitRes:
    """The reply in a packed content (``view``, from its magic to its end); the buffer is
    a view of ``view`` (writable when ``view`` is). ``max_header_bytes`` bounds what
    precedes the buffer."""
    r = _Reader(view, max_header_bytes)
    magic, version, code, num_examples = _HEAD.unpack(r.take(_HEAD.size))
    if magic != MAGIC or version != VERSION:
        raise SerdeError(f"a packed reply starts with {MAGIC!r} and version {VERSION}")
    if code not in _CODES:
        raise SerdeError(f"unknown status code {code}")
    if num_examples > MAX_NUM_EXAMPLES:
        raise SerdeError(f"num_examples must be in [0, 2**53], got {num_examples}")
    message = r.text(r.unpack(_U16), "the status message")
    metrics: dict[str, Scalar] = {}
    for _ in range(r.unpack(_U8)):
        key = r.text(r.unpack(_U8), "a metric key")
        if key in metrics:
            raise SerdeError(f"metric {key!r} appears twice in the packed reply")
        metrics[key] = _metric(r, key)
    rec_name = r.text(r.unpack(_U8), "the record name")
    name = r.text(r.unpack(_U8), "the array name")
    data = view[r.at :]
    array = np.frombuffer(data, np.uint8) if len(data) else np.zeros(0, np.uint8)
    return FitRes(
        Status(Code(code), message),
        Parameters(arrays=[]),
        int(num_examples),
        metrics,
        extras=RecordDict({rec_name: {name: array}}),
    )


def _metric(r: _Reader, key: str) -> Scalar:
    tag = r.unpack(_U8)
    if tag == 0:
        flag = r.unpack(_U8)
        if flag > 1:
            raise SerdeError(f"metric {key!r}: a bool is 0 or 1, got {flag}")
        return bool(flag)
    if tag == 1:
        return int(r.unpack(_I64))
    if tag == 2:
        return float(r.unpack(_F64))  # NaN and Inf too, as in a record payload
    if tag == 3:
        return r.text(r.unpack(_U32), f"metric {key!r}")
    if tag == 4:
        return bytes(r.take(r.unpack(_U32)))
    raise SerdeError(f"metric {key!r} has an unknown tag {tag}")
