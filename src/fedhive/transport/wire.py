"""``Frame`` messages on the wire without protobuf objects: the transport's hot path.

Sending a chunk through a generated ``Frame`` costs three copies of it (the slice that
goes in, the copy inside the object, the serialized bytes) and receiving one costs two
(parsing, then reading ``data``). :func:`message_frame_bytes` writes the protobuf encoding
of MESSAGE frames directly, copying each chunk once, and :func:`parse_frame` reads any
encoding of a ``Frame`` with ``data`` as a view of the received bytes. Both follow the
protobuf wire format of ``proto/fleet.proto`` (fields in number order, defaults left
out), so the other side may use the generated ``Frame`` class; :data:`METHOD` with
:func:`serialize_frame` and :func:`parse_frame` replace the generated stub and servicer
registration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedhive.transport.proto.fleet_pb2 import Frame

__all__ = [
    "METHOD",
    "SERVICE",
    "WireFrame",
    "message_frame_bytes",
    "parse_frame",
    "serialize_frame",
]

SERVICE = "fedhive.v1.Fleet"
METHOD = f"/{SERVICE}/Join"

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_VARINT, _LENGTH, _FIXED64, _FIXED32 = 0, 2, 1, 5
# field number -> (attribute, wire type, conversion); see fleet.proto
_INT32, _UINT32, _UINT64, _BOOL, _STR, _BYTES = range(6)
_FIELDS = {
    1: ("kind", _VARINT, _INT32),
    2: ("message_id", _LENGTH, _STR),
    3: ("total_size", _VARINT, _UINT64),
    4: ("offset", _VARINT, _UINT64),
    5: ("data", _LENGTH, _BYTES),
    6: ("last", _VARINT, _BOOL),
    7: ("protocol_version", _VARINT, _UINT32),
    8: ("node_id", _LENGTH, _STR),
    9: ("token", _LENGTH, _STR),
    10: ("text", _LENGTH, _STR),
    11: ("data_port", _VARINT, _UINT32),
}


@dataclass(slots=True)
class WireFrame:
    """A parsed ``Frame``: the same fields, with ``data`` a view of the received bytes.

    A frame that is not valid protobuf parses as kind ``KIND_UNSPECIFIED`` with the
    reason in ``text``, so a receiver refuses it like any other unexpected frame.
    """

    kind: int = Frame.KIND_UNSPECIFIED
    message_id: str = ""
    total_size: int = 0
    offset: int = 0
    data: bytes | memoryview = b""
    last: bool = False
    protocol_version: int = 0
    node_id: str = ""
    token: str = ""
    text: str = ""
    data_port: int = 0


class _Malformed(ValueError):
    pass


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _chunks(views: list[memoryview], size: int) -> Iterator[list[memoryview]]:
    """Consecutive runs of ``size`` bytes (the last may be shorter) across ``views``."""
    batch: list[memoryview] = []
    room = size
    for view in views:
        start = 0
        while start < len(view):
            take = min(room, len(view) - start)
            batch.append(view[start : start + take])
            start += take
            room -= take
            if room == 0:
                yield batch
                batch, room = [], size
    if batch:
        yield batch


def message_frame_bytes(
    message_id: str, pieces: Sequence[bytes | memoryview], chunk_bytes: int
) -> Iterator[bytes]:
    """Serialized MESSAGE frames carrying ``pieces`` (concatenated), ``chunk_bytes`` each.

    Lazy: each frame is built (one copy of its chunk) only when it is asked for, and the
    pieces are only read, so a model shared by many messages stays one copy in memory.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    total = sum(len(v) for v in views)
    head = _key(1, _VARINT) + _varint(Frame.MESSAGE)
    name = message_id.encode("utf-8")
    if name:
        head += _key(2, _LENGTH) + _varint(len(name)) + name
    last = _key(6, _VARINT) + b"\x01"
    if total == 0:
        yield head + last
        return
    head += _key(3, _VARINT) + _varint(total)
    offset = 0
    for batch in _chunks(views, chunk_bytes):
        size = sum(len(v) for v in batch)
        at = _key(4, _VARINT) + _varint(offset) if offset else b""
        end = last if offset + size == total else b""
        yield b"".join([head, at, _key(5, _LENGTH), _varint(size), *batch, end])
        offset += size


def serialize_frame(frame: Frame | bytes) -> bytes:
    """What gRPC sends for ``frame``: a generated ``Frame`` or bytes already serialized."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(raw):
            raise _Malformed("truncated varint")
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _convert(value: int | memoryview, kind: int) -> object:
    if isinstance(value, memoryview):
        if kind == _BYTES:
            return value
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("string field is not utf-8") from None
    if kind == _INT32:
        low = value & _MASK32
        return low - (1 << 32) if low >= 1 << 31 else low
    if kind == _UINT32:
        return value & _MASK32
    if kind == _BOOL:
        return value != 0
    return value


def _read_value(raw: bytes, pos: int, wire_type: int) -> tuple[int | memoryview | None, int]:
    """Read one field value; ``None`` for the fixed-size types no ``Frame`` field uses."""
    if wire_type == _VARINT:
        return _read_varint(raw, pos)
    if wire_type == _LENGTH:
        length, pos = _read_varint(raw, pos)
        if length > len(raw) - pos:
            raise _Malformed("length-delimited field runs past the end")
        return memoryview(raw)[pos : pos + length], pos + length
    size = {_FIXED64: 8, _FIXED32: 4}.get(wire_type)
    if size is None or pos + size > len(raw):
        raise _Malformed(f"bad wire type {wire_type} or truncated field")
    return None, pos + size


def _parse(raw: bytes) -> WireFrame:
    frame = WireFrame()
    pos = 0
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        value, pos = _read_value(raw, pos, wire_type)
        spec = _FIELDS.get(field)
        if spec is not None and spec[1] == wire_type and value is not None:
            setattr(frame, spec[0], _convert(value, spec[2]))
    return frame


def parse_frame(raw: bytes) -> WireFrame:
    """Parse a serialized ``Frame``; never raises (see :class:`WireFrame`)."""
    try:
        return _parse(raw)
    except _Malformed as exc:
        return WireFrame(text=f"malformed frame: {exc}")
