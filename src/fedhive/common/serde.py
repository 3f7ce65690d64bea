"""Wire format for arrays, scalar mappings and records (gRPC, checkpoints, client state).

Every payload starts with a 16-byte prefix followed by a JSON header (utf-8)::

    offset 0   8 bytes   magic: b"FHIVEARR" (arrays), b"FHIVEREC" (RecordDict),
                         b"FHIVESCL" (scalar mapping)
    offset 8   uint32 LE format version (currently 1)
    offset 12  uint32 LE header length H in bytes
    offset 16  H bytes   JSON header; for arrays and records it is padded with spaces so
                         that the data section starts at D = 16 + H, a multiple of 64
    offset D   data      raw little-endian C-order array buffers

The array header is ``{"codec": int, "arrays": [{"name", "dtype", "shape", "offset",
"nbytes"}, ...]}`` (records add ``"records"``). ``offset`` is relative to D and a multiple
of 64; ``nbytes == prod(shape) * itemsize``. Buffers never overlap and the payload ends
exactly at the end of the last buffer (``max(offset + nbytes)``; D when there is no data).
``codec`` is an opaque id in ``[0, 65535]`` (0 = raw) kept for layers that compress.
Zero-size arrays get offset 0. A RecordDict header adds ``"records": {"array_records":
[[name, n_arrays], ...], "config_records": [[name, scalars], ...], "metric_records": ...}``
and names its arrays ``"<record index>/<key>"``, in record order.

Scalars are ``[key, tag, value]`` triples with tag ``bool`` (JSON bool), ``int`` (hex
string; decoding refuses values outside ``[-2**63, 2**64 - 1]``), ``float`` (``repr``
string, incl. ``nan``/``inf``/``-0.0``), ``str`` or ``bytes`` (base64). A scalar payload
has no data section: it ends with the header.

Encoding can stop short of the final copy: :func:`encode_record_pieces` returns the
payload as a list of pieces (prefix and header as ``bytes``, then each array's buffer as a
``memoryview`` of the array itself), so a large model can be streamed without ever being
copied into one payload. Decoding builds arrays as views into one writable buffer: a
``bytearray`` or writable ``memoryview`` is used as is (zero copies), ``bytes`` is copied
once. Everything in the header is validated and any problem raises
:class:`~fedhive.common.errors.SerdeError`.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import NDArray, Parameters, RecordDict, Scalar, check_scalar_mapping

__all__ = [
    "DecodedArrays",
    "FORMAT_VERSION",
    "HeaderLimits",
    "decode_arrays",
    "decode_parameters",
    "decode_record_dict",
    "decode_scalars",
    "encode_arrays",
    "encode_parameters",
    "encode_record_dict",
    "encode_record_pieces",
    "encode_scalars",
]

FORMAT_VERSION = 1
ARRAYS_MAGIC = b"FHIVEARR"
RECORDS_MAGIC = b"FHIVEREC"
SCALARS_MAGIC = b"FHIVESCL"
_PREFIX = struct.Struct("<8sII")
_ALIGN = 64
_MAX_CODEC = 0xFFFF
_MAX_NDIM = 64
_DTYPE_NAMES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128")  # fmt: skip
_DTYPES: dict[str, np.dtype[Any]] = {n: np.dtype(n).newbyteorder("<") for n in _DTYPE_NAMES}
_ALLOWED = ", ".join(_DTYPE_NAMES)
_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})
_BytesLike = bytes | bytearray | memoryview
Pieces = list[bytes | memoryview]


@dataclass(frozen=True)
class HeaderLimits:
    """The most a decoded header may hold: its length in bytes and its number of arrays."""

    max_header_bytes: int
    max_arrays: int


@dataclass(frozen=True)
class DecodedArrays:
    """What :func:`decode_arrays` returns: names, arrays (writable views) and codec id."""

    names: list[str]
    arrays: list[NDArray]
    codec: int


def _fail(message: str) -> NoReturn:
    raise SerdeError(message)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _prepare(array: Any, index: int) -> NDArray:
    """``array`` as a C-contiguous little-endian array of an allowed dtype."""
    if not isinstance(array, np.ndarray | np.generic):
        _fail(f"array {index} must be a numpy array, got {type(array).__name__}")
    dtype = array.dtype
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in _DTYPES:
        _fail(f"array {index} has unsupported dtype {dtype!s} ({dtype.str}); allowed: {_ALLOWED}")
    return np.asarray(array, dtype=_DTYPES[dtype.name], order="C")


def _check_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(count)]
    out = list(names)
    if len(out) != count:
        _fail(f"got {len(out)} names for {count} arrays")
    if not all(isinstance(name, str) for name in out) or len(set(out)) != len(out):
        _fail(f"array names must be unique str, got {out!r}")
    return out


def _frame(magic: bytes, header: dict[str, Any], pad: bool) -> bytes:
    """Prefix plus JSON header; padded with spaces to a multiple of 64 when ``pad``."""
    try:
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise SerdeError(f"cannot encode header: {exc}") from exc
    if pad:
        raw += b" " * (_align(_PREFIX.size + len(raw)) - _PREFIX.size - len(raw))
    return _PREFIX.pack(magic, FORMAT_VERSION, len(raw)) + raw


def _pack(
    magic: bytes, arrays: Sequence[Any], names: Sequence[str] | None, codec: int, **extra: Any
) -> Pieces:
    """The payload as pieces: prefix and header, then padding and array buffers (views)."""
    prepared = [_prepare(a, i) for i, a in enumerate(arrays)]
    table: list[dict[str, Any]] = []
    pieces: Pieces = []
    end = 0  # bytes of the data section written so far
    for name, arr in zip(_check_names(names, len(prepared)), prepared, strict=True):
        offset = _align(end) if arr.nbytes else 0
        entry = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)}
        table.append({**entry, "offset": offset, "nbytes": arr.nbytes})
        if arr.nbytes:
            if offset > end:
                pieces.append(bytes(offset - end))
            pieces.append(arr.reshape(-1).view(np.uint8).data.toreadonly())
            end = offset + arr.nbytes
    header = {"codec": _expect_int(codec, "codec", _MAX_CODEC), "arrays": table, **extra}
    return [_frame(magic, header, pad=True), *pieces]


def encode_arrays(
    arrays: Sequence[NDArray], names: Sequence[str] | None = None, *, codec: int = 0
) -> bytes:
    """Encode ``arrays`` (default names ``"0"``, ``"1"``, ...) into one payload."""
    return b"".join(_pack(ARRAYS_MAGIC, arrays, names, codec))


def _as_buffer(data: Any) -> memoryview:
    """A writable flat byte view of ``data``; only immutable input is copied (once)."""
    if isinstance(data, bytes | bytearray):
        return memoryview(bytearray(data) if isinstance(data, bytes) else data)
    if not isinstance(data, memoryview):
        _fail(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")
    try:
        view = data.cast("B") if data.c_contiguous else None
    except (TypeError, ValueError) as exc:  # released view, odd format
        raise SerdeError(f"cannot read memoryview as bytes: {exc}") from exc
    if view is None:
        _fail("memoryview must be C-contiguous")
    return memoryview(bytearray(view)) if view.readonly else view


def _reject_constant(name: str) -> NoReturn:
    _fail(f"header contains non-standard JSON constant {name}")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        _fail("header has a JSON object with duplicate keys")
    return out


def _read_header(
    buf: memoryview, magic: bytes, max_header_bytes: int | None = None
) -> tuple[Any, int]:
    """Check the prefix and parse the JSON header; returns it and where it ends."""
    if len(buf) < _PREFIX.size:
        _fail(f"payload too short: {len(buf)} bytes, need at least {_PREFIX.size}")
    found, version, length = _PREFIX.unpack_from(buf, 0)
    if found != magic:
        _fail(f"bad magic {found!r}, expected {magic!r}: not a fedhive payload of this kind")
    if version != FORMAT_VERSION:
        newer = "a newer fedhive; upgrade to read it" if version > FORMAT_VERSION else "unknown"
        _fail(f"unsupported format version {version} ({newer}); this reads {FORMAT_VERSION}")
    end = _PREFIX.size + length
    if max_header_bytes is not None and length > max_header_bytes:
        _fail(f"header of {length} bytes is over the limit of {max_header_bytes}")
    if end > len(buf):
        _fail(f"header length {length} runs past the end of the {len(buf)}-byte payload")
    try:
        text = bytes(buf[_PREFIX.size : end]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError, MemoryError) as exc:  # SerdeError is a ValueError
        raise SerdeError(f"header is not valid JSON: {exc}") from exc
    return header, end


def _expect_dict(obj: Any, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.keys() != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        _fail(f"{what} must be an object with keys {sorted(keys)}, got {got}")
    return obj


def _expect_int(value: Any, what: str, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(f"{what} must be a non-negative int, got {value!r}")
    if high is not None and value > high:
        _fail(f"{what} must be at most {high}, got {value}")
    return value


def _expect_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(f"{what} must be a list, got {type(value).__name__}")
    return value


def _parse_entry(obj: Any, index: int) -> tuple[str, np.dtype[Any], list[int], int, int]:
    what = f"array entry {index}"
    entry = _expect_dict(obj, _ENTRY_KEYS, what)
    name, dtype_name = entry["name"], entry["dtype"]
    if not isinstance(name, str):
        _fail(f"{what}: name must be str, got {name!r}")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        _fail(f"{what}: unsupported dtype {dtype_name!r}; allowed: {_ALLOWED}")
    shape = _expect_list(entry["shape"], f"{what}: shape")
    if len(shape) > _MAX_NDIM:
        _fail(f"{what}: {len(shape)} dimensions, at most {_MAX_NDIM} allowed")
    dims = [_expect_int(d, f"{what}: shape[{i}]") for i, d in enumerate(shape)]
    dtype = _DTYPES[dtype_name]
    offset = _expect_int(entry["offset"], f"{what}: offset")
    nbytes = _expect_int(entry["nbytes"], f"{what}: nbytes")
    needed = math.prod(dims) * dtype.itemsize
    if needed != nbytes:
        _fail(f"{what}: shape {dims} of {dtype_name} needs {needed} bytes, nbytes is {nbytes}")
    if offset % _ALIGN:
        _fail(f"{what}: offset {offset} is not a multiple of {_ALIGN}")
    return name, dtype, dims, offset, nbytes


def _check_layout(spans: list[tuple[int, int]], data_len: int) -> None:
    """Buffers lie inside the data section, do not overlap, and the last one ends it."""
    for i, (offset, nbytes) in enumerate(spans):
        if offset + nbytes > data_len:
            _fail(f"array {i} ([{offset}, {offset + nbytes})) is outside the {data_len}-byte data")
    used = sorted((o, n) for o, n in spans if n)
    for (o1, n1), (o2, _) in itertools.pairwise(used):
        if o1 + n1 > o2:
            _fail(f"overlapping buffers: [{o1}, {o1 + n1}) and one starting at {o2}")
    end = max((o + n for o, n in used), default=0)
    if data_len != end:
        _fail(f"payload has {data_len - end} trailing bytes after the last buffer")


def _view(buf: memoryview, start: int, dtype: np.dtype[Any], dims: list[int]) -> NDArray:
    try:
        return np.frombuffer(buf, dtype=dtype, count=math.prod(dims), offset=start).reshape(dims)
    except (ValueError, OverflowError, TypeError, MemoryError) as exc:
        raise SerdeError(f"cannot build array of shape {dims}: {exc}") from exc


def _unpack(
    data: Any, magic: bytes, extra: frozenset[str] = frozenset(), limits: HeaderLimits | None = None
) -> tuple[dict[str, Any], DecodedArrays]:
    buf = _as_buffer(data)
    raw, start = _read_header(buf, magic, limits.max_header_bytes if limits else None)
    header = _expect_dict(raw, frozenset({"codec", "arrays"}) | extra, "header")
    if start % _ALIGN:
        _fail(f"data section starts at {start}, not a multiple of {_ALIGN}")
    codec = _expect_int(header["codec"], "codec", _MAX_CODEC)
    listed = _expect_list(header["arrays"], "arrays")
    if limits is not None and len(listed) > limits.max_arrays:
        _fail(f"header lists {len(listed)} arrays, more than the {limits.max_arrays} allowed")
    entries = [_parse_entry(e, i) for i, e in enumerate(listed)]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        _fail("array names are not unique")
    _check_layout([(e[3], e[4]) for e in entries], len(buf) - start)
    arrays = [_view(buf, start + off, dt, dims) for _, dt, dims, off, _ in entries]
    return header, DecodedArrays(names=names, arrays=arrays, codec=codec)


def decode_arrays(data: _BytesLike) -> DecodedArrays:
    """Decode a payload of :func:`encode_arrays`; arrays are writable views (see module doc)."""
    return _unpack(data, ARRAYS_MAGIC)[1]


def _scalar_to_json(key: str, value: Scalar) -> list[Any]:
    if isinstance(value, bool):
        return [key, "bool", value]
    if isinstance(value, int):
        return [key, "int", hex(value)]
    if isinstance(value, float):
        return [key, "float", repr(value)]
    if isinstance(value, str):
        return [key, "str", value]
    return [key, "bytes", base64.b64encode(value).decode("ascii")]


#: Decoded integers lie in [INT_MIN, INT_MAX]: every int64 and uint64 (protobuf's range),
#: and nothing too long to print (Python refuses to write ints of over 4,300 digits).
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
_MAX_HEX = len(hex(INT_MIN))


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_HEX:
        raise ValueError(f"integer of {len(text)} hex characters is outside the 64-bit range")
    value = int(text, 16)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError("integer outside the 64-bit range [-2**63, 2**64 - 1]")
    return value


_FROM_JSON: dict[str, tuple[type, Callable[[Any], Scalar]]] = {
    "bool": (bool, bool),
    "int": (str, _bounded_int),
    "float": (str, float),
    "str": (str, str),
    "bytes": (str, lambda v: base64.b64decode(v.encode("ascii"), validate=True)),
}


def _short(value: Any) -> str:
    """``repr(value)``, cut short: error messages quote what a peer sent, not all of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _scalar_from_json(tag: Any, value: Any, what: str) -> Scalar:
    kind, parse = _FROM_JSON.get(tag, (None, None)) if isinstance(tag, str) else (None, None)
    if kind is None or parse is None or not isinstance(value, kind):
        _fail(f"{what}: unknown tag {_short(tag)} or value {_short(value)} of the wrong type")
    try:
        return parse(value)
    except ValueError as exc:  # includes binascii.Error and UnicodeEncodeError
        raise SerdeError(f"{what}: bad {tag} value {_short(value)}: {exc}") from exc


def _scalars_to_json(values: Mapping[str, Any], what: str) -> list[list[Any]]:
    return [_scalar_to_json(k, v) for k, v in check_scalar_mapping(values, what).items()]


def _scalars_from_json(obj: Any, what: str) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for i, item in enumerate(_expect_list(obj, what)):
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
            _fail(f"{what}[{i}] must be a [key, tag, value] list with a str key, got {item!r}")
        if item[0] in out:
            _fail(f"{what}: duplicate key {item[0]!r}")
        out[item[0]] = _scalar_from_json(item[1], item[2], f"{what}[{item[0]!r}]")
    return out


def encode_scalars(values: Mapping[str, Scalar]) -> bytes:
    """Encode a config/metrics mapping; types (bool, int, float, str, bytes) survive."""
    return _frame(SCALARS_MAGIC, {"values": _scalars_to_json(values, "values")}, pad=False)


def decode_scalars(data: _BytesLike, max_header_bytes: int | None = None) -> dict[str, Scalar]:
    """Decode a payload of :func:`encode_scalars` (refused unparsed when its header is
    longer than ``max_header_bytes``)."""
    buf = _as_buffer(data)
    raw, end = _read_header(buf, SCALARS_MAGIC, max_header_bytes)
    if end != len(buf):
        _fail(f"payload has {len(buf) - end} trailing bytes after the header")
    header = _expect_dict(raw, frozenset({"values"}), "header")
    return _scalars_from_json(header["values"], "values")


_RECORD_GROUPS = frozenset({"array_records", "config_records", "metric_records"})


def _numbers(values: Mapping[str, Scalar], what: str) -> dict[str, int | float]:
    out = {k: v for k, v in values.items() if isinstance(v, int | float)}
    if len(out) != len(values):
        bad = next(k for k in values if k not in out)
        _fail(f"{what}[{bad!r}] must be int or float, got {values[bad]!r}")
    return out


def _metrics_to_json(name: str, record: Mapping[str, Any]) -> list[list[Any]]:
    what = f"metric_records[{name!r}]"
    return _scalars_to_json(_numbers(check_scalar_mapping(record, what), what), what)


def encode_record_pieces(rd: RecordDict) -> Pieces:
    """The payload of :func:`encode_record_dict` as pieces whose concatenation it is.

    Array buffers are not copied: each is a read-only view of the array it encodes (or of
    a little-endian, C-ordered copy when the array is neither), so the arrays must not
    change until the pieces have been consumed.
    """
    arrays: list[Any] = []
    names: list[str] = []
    layout: list[list[Any]] = []
    groups = (rd.array_records, rd.config_records, rd.metric_records)
    if not all(isinstance(name, str) for group in groups for name in group):
        _fail(f"record names must be str, got {[list(group) for group in groups]!r}")
    for i, (rec_name, record) in enumerate(rd.array_records.items()):
        if not all(isinstance(k, str) for k in record):
            _fail(f"keys of array record {rec_name!r} must be str, got {list(record)!r}")
        layout.append([rec_name, len(record)])
        names += [f"{i}/{key}" for key in record]
        arrays += list(record.values())
    records = {
        "array_records": layout,
        "config_records": [
            [n, _scalars_to_json(r, f"config_records[{n!r}]")] for n, r in rd.config_records.items()
        ],
        "metric_records": [[n, _metrics_to_json(n, r)] for n, r in rd.metric_records.items()],
    }
    return _pack(RECORDS_MAGIC, arrays, names, 0, records=records)


def encode_record_dict(rd: RecordDict) -> bytes:
    """Encode all three record groups of ``rd`` (order kept) into one array payload."""
    return b"".join(encode_record_pieces(rd))


def _named_items(obj: Any, what: str) -> list[tuple[str, Any]]:
    items = _expect_list(obj, what)
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            _fail(f"{what}[{i}] must be a [name, value] list with a str name, got {item!r}")
    if len({item[0] for item in items}) != len(items):
        _fail(f"{what}: duplicate record names")
    return [(item[0], item[1]) for item in items]


def _array_records(obj: Any, decoded: DecodedArrays) -> dict[str, dict[str, NDArray]]:
    out: dict[str, dict[str, NDArray]] = {}
    pos = 0
    for i, (name, count) in enumerate(_named_items(obj, "array_records")):
        count = _expect_int(count, f"array_records[{name!r}] size", len(decoded.names) - pos)
        record: dict[str, NDArray] = {}
        span = slice(pos, pos + count)
        for arr_name, arr in zip(decoded.names[span], decoded.arrays[span], strict=True):
            if not arr_name.startswith(f"{i}/"):
                _fail(f"array {arr_name!r} does not belong to array record {i} ({name!r})")
            record[arr_name[len(f"{i}/") :]] = arr
        out[name] = record
        pos += count
    if pos != len(decoded.names):
        _fail(f"array records hold {pos} arrays but the payload has {len(decoded.names)}")
    return out


def _metric_records(obj: Any) -> dict[str, dict[str, int | float]]:
    out: dict[str, dict[str, int | float]] = {}
    for name, entries in _named_items(obj, "metric_records"):
        what = f"metric_records[{name!r}]"
        out[name] = _numbers(_scalars_from_json(entries, what), what)
    return out


def decode_record_dict(data: _BytesLike, limits: HeaderLimits | None = None) -> RecordDict:
    """Decode a payload of :func:`encode_record_dict`; arrays are writable views.

    With ``limits`` a header longer than ``limits.max_header_bytes`` is refused before it
    is parsed, and one listing more than ``limits.max_arrays`` arrays before any entry is
    read (what a peer may make the receiver parse and allocate).
    """
    header, decoded = _unpack(data, RECORDS_MAGIC, frozenset({"records"}), limits)
    groups = _expect_dict(header["records"], _RECORD_GROUPS, "records")
    configs = {
        name: _scalars_from_json(entries, f"config_records[{name!r}]")
        for name, entries in _named_items(groups["config_records"], "config_records")
    }
    return RecordDict(
        _array_records(groups["array_records"], decoded),
        configs,
        _metric_records(groups["metric_records"]),
    )


def encode_parameters(p: Parameters, *, codec: int = 0) -> bytes:
    """Encode the arrays of ``p`` (see :func:`encode_arrays`)."""
    return encode_arrays(p.arrays, codec=codec)


def decode_parameters(data: _BytesLike) -> Parameters:
    """Decode a payload of :func:`encode_parameters` into ``Parameters(arrays=...)``."""
    return Parameters(arrays=decode_arrays(data).arrays)
