"""Messages as bytes (never pickle).

Wire layout: ``[u64 LE length of meta][meta][content]``. ``meta`` is a short binary
header with the metadata and the error (:mod:`fedhive.transport.meta`); ``content`` is a
fedhive record payload whose config record ``"kind"`` names the content type, arrays in
``array_records`` and configs and metrics in ``config_records``; a fit reply that carries
one byte buffer instead of a model (a compressed update) travels as a packed reply
instead (:mod:`fedhive.transport.packed`). The named ``extras`` of ``FitIns``,
``FitRes``, ``EvaluateIns`` and ``EvaluateRes`` travel as records of the same payload,
their names prefixed with ``"x/"`` (so the message's size limit covers them as it covers
the model), and the records of a ``RecordDict`` content with ``"c/"``. The content is
encoded apart from the metadata, so a model sent to many clients is encoded once, and as
pieces (see :func:`~fedhive.common.serde.encode_record_pieces`): the arrays are never
copied into it.
Decoding validates the kind and every field it reads; anything malformed raises
:class:`~fedhive.common.errors.SerdeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quote
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.message import Message
from fedhive.common.records import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    NDArray,
    Parameters,
    RecordDict,
    Scalar,
    Status,
    check_scalar_mapping,
)
from fedhive.common.wire_size import (
    Unsized,
    framed,
    record_dict_layout,
    record_dict_size,
    scalar_list_size,
)
from fedhive.transport import meta, packed
from fedhive.transport.limits import MAX_NUM_EXAMPLES

if TYPE_CHECKING:
    from fedhive.common.serde import HeaderLimits, Pieces

__all__ = [
    "decode_message",
    "decode_wire",
    "content_size",
    "encode_content",
    "encode_message",
    "encode_meta",
    "meta_size",
    "encode_wire",
]

_CUSTOM_PREFIX = "c/"
_EXTRAS_PREFIX = "x/"


def _num_examples(res: dict[str, Scalar]) -> int:
    value = _field(res, "num_examples", int)
    if not 0 <= value <= MAX_NUM_EXAMPLES:
        raise SerdeError(f"num_examples must be in [0, 2**53], got {value}")
    return int(value)


def _params_record(parameters: Parameters) -> dict[str, NDArray]:
    return {str(i): a for i, a in enumerate(parameters.arrays)}


def _params_from(rd: RecordDict) -> Parameters:
    record = rd.array_records.get("parameters", {})
    if list(record) != [str(i) for i in range(len(record))]:
        raise SerdeError("parameters record must hold arrays named 0, 1, 2, ... in order")
    return Parameters(arrays=list(record.values()))


def _status(res: Any) -> dict[str, Scalar]:
    return {"status_code": int(res.status.code), "status_message": res.status.message}


def _status_from(res: dict[str, Scalar]) -> Status:
    code = _field(res, "status_code", int)
    try:
        return Status(Code(code), str(_field(res, "status_message", str)))
    except ValueError:
        raise SerdeError(f"unknown status code {code}") from None


def _field(record: dict[str, Scalar], key: str, kind: type) -> Any:
    if key not in record:
        raise SerdeError(f"missing field {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SerdeError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _put(records: Any, rd: RecordDict, prefix: str, what: str) -> None:
    """Add the records of ``records`` to ``rd``, each name prefixed with ``prefix``."""
    if not isinstance(records, RecordDict):
        raise SerdeError(f"{what} must be a RecordDict, got {type(records).__name__}")
    for name, arrays in records.array_records.items():
        rd.array_records[prefix + name] = arrays
    for name, values in records.config_records.items():
        rd.config_records[prefix + name] = values
    for name, numbers in records.metric_records.items():
        rd.metric_records[prefix + name] = numbers


def _take(rd: RecordDict, prefix: str) -> RecordDict:
    """The records of ``rd`` whose names start with ``prefix``, the prefix removed."""

    def strip(group: dict[str, Any]) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in group.items() if k.startswith(prefix)}

    return RecordDict(strip(rd.array_records), strip(rd.config_records), strip(rd.metric_records))


def _encode_content(content: Any, rd: RecordDict) -> str:
    cfg = rd.config_records
    if isinstance(content, FitIns | FitRes | EvaluateIns | EvaluateRes):
        _put(content.extras, rd, _EXTRAS_PREFIX, f"{type(content).__name__}.extras")
    if isinstance(content, FitIns | EvaluateIns):
        rd.array_records["parameters"] = _params_record(content.parameters)
        cfg["config"] = dict(content.config)
        return type(content).__name__
    if isinstance(content, FitRes):
        rd.array_records["parameters"] = _params_record(content.parameters)
        cfg["metrics"] = dict(content.metrics)
        cfg["res"] = {"num_examples": content.num_examples, **_status(content)}
        return "FitRes"
    if isinstance(content, EvaluateRes):
        cfg["metrics"] = dict(content.metrics)
        cfg["res"] = {
            "loss": float(content.loss),
            "num_examples": content.num_examples,
            **_status(content),
        }
        return "EvaluateRes"
    if isinstance(content, GetParametersIns | GetPropertiesIns):
        cfg["config"] = dict(content.config)
        return type(content).__name__
    if isinstance(content, GetParametersRes):
        rd.array_records["parameters"] = _params_record(content.parameters)
        cfg["res"] = _status(content)
        return "GetParametersRes"
    if isinstance(content, GetPropertiesRes):
        cfg["config"] = dict(content.properties)
        cfg["res"] = _status(content)
        return "GetPropertiesRes"
    if isinstance(content, RecordDict):
        _put(content, rd, _CUSTOM_PREFIX, "content")
        return "RecordDict"
    if content is None:
        return "None"
    raise SerdeError(f"cannot send content of type {type(content).__name__}")


def _custom(rd: RecordDict) -> RecordDict:
    return _take(rd, _CUSTOM_PREFIX)


def _extras(rd: RecordDict) -> RecordDict:
    return _take(rd, _EXTRAS_PREFIX)


def _config(rd: RecordDict, name: str) -> dict[str, Scalar]:
    return check_scalar_mapping(rd.config_records.get(name, {}), name)


_DECODERS: dict[str, Callable[[RecordDict], Any]] = {
    "FitIns": lambda rd: FitIns(_params_from(rd), _config(rd, "config"), extras=_extras(rd)),
    "EvaluateIns": lambda rd: EvaluateIns(
        _params_from(rd), _config(rd, "config"), extras=_extras(rd)
    ),
    "FitRes": lambda rd: FitRes(
        _status_from(_config(rd, "res")),
        _params_from(rd),
        _num_examples(_config(rd, "res")),
        _config(rd, "metrics"),
        extras=_extras(rd),
    ),
    "EvaluateRes": lambda rd: EvaluateRes(
        _status_from(_config(rd, "res")),
        _field(_config(rd, "res"), "loss", float),
        _num_examples(_config(rd, "res")),
        _config(rd, "metrics"),
        extras=_extras(rd),
    ),
    "GetParametersIns": lambda rd: GetParametersIns(_config(rd, "config")),
    "GetPropertiesIns": lambda rd: GetPropertiesIns(_config(rd, "config")),
    "GetParametersRes": lambda rd: GetParametersRes(
        _status_from(_config(rd, "res")), _params_from(rd)
    ),
    "GetPropertiesRes": lambda rd: GetPropertiesRes(
        _status_from(_config(rd, "res")), _config(rd, "config")
    ),
    "RecordDict": _custom,
    "None": lambda rd: None,
}


_LEN = struct.Struct("<Q")


def encode_content(content: Any) -> Pieces:
    """The content part of a message as pieces (shareable between messages).

    The pieces view the content's arrays without copying them: keep the arrays unchanged
    until the pieces have been sent.
    """
    from fedhive.common.serde import encode_record_pieces

    pieces = packed.encode(content)
    if pieces is not None:
        return pieces
    rd = RecordDict()
    rd.config_records["kind"] = {"kind": _encode_content(content, rd)}
    return encode_record_pieces(rd)


def encode_meta(message: Message) -> bytes:
    """The meta part of ``message``'s encoding (:mod:`fedhive.transport.meta`)."""
    return meta.encode(message)


def content_size(content: Any) -> int:
    """``sum(map(len, encode_content(content)))``, computed without encoding where the
    length model covers the content (:mod:`fedhive.common.wire_size`)."""
    try:
        lean = packed.size(content)
        if lean is not None:
            return lean
        if type(content) in (FitRes, EvaluateRes):
            return _reply_size(content)
        rd = RecordDict()
        rd.config_records["kind"] = {"kind": _encode_content(content, rd)}
        return record_dict_size(rd)
    except Unsized:
        return sum(len(piece) for piece in encode_content(content))


# (reply type, (dtype, shape) of each array) -> (JSON header length, data section length)
# of such a reply with no metrics, 0 examples, status OK "" and loss 0.0: a round's replies
# share their layout and differ in these values only.
_SKELETONS: dict[tuple[Any, ...], tuple[int, int]] = {}
_SKELETON_CACHE = 16


def _reply_size(res: FitRes | EvaluateRes) -> int:
    """The encoded length of a reply: its layout's skeleton (computed once per layout)
    plus the lengths its values add. Raises ``Unsized`` where not modelled."""
    extras = res.extras
    status = res.status
    message = status.message
    if (
        type(extras) is not RecordDict
        or extras.array_records
        or extras.config_records
        or extras.metric_records
        or type(res.num_examples) is not int
        or type(message) is not str
    ):
        raise Unsized
    fit = type(res) is FitRes
    arrays = res.parameters.arrays if fit else ()  # type: ignore[union-attr]
    if any(type(a) is not np.ndarray for a in arrays):
        raise Unsized
    key = (fit, *[(a.dtype, a.shape) for a in arrays])
    layout = _SKELETONS.get(key)
    if layout is None:
        if fit:
            skeleton: Any = FitRes(Status(Code.OK, ""), res.parameters, 0, {})  # type: ignore[union-attr]
        else:
            skeleton = EvaluateRes(Status(Code.OK, ""), 0.0, 0, {})
        rd = RecordDict()
        rd.config_records["kind"] = {"kind": _encode_content(skeleton, rd)}
        layout = record_dict_layout(rd)
        if len(_SKELETONS) >= _SKELETON_CACHE:
            _SKELETONS.clear()
        _SKELETONS[key] = layout
    header, end = layout
    # the values' lengths beyond the skeleton's: 0x0 (3), "" (2), [] (2) and 0.0 (5)
    header += (
        len(hex(res.num_examples))
        + len(hex(int(status.code)))
        + len(_quote(message))
        + scalar_list_size(res.metrics)
        - 10
    )
    if not fit:
        loss = float(res.loss)  # type: ignore[union-attr]
        header += len(repr(loss)) - 3
    return framed(header) + end


def meta_size(message: Message) -> int:
    """``len(encode_meta(message))``, computed without encoding."""
    return meta.size(message)


def encode_wire(message: Message, content: Pieces | None = None) -> Pieces:
    """The message as pieces (length prefix, meta, content pieces); see the module doc."""
    meta = encode_meta(message)
    body = content if content is not None else encode_content(message.content)
    return [_LEN.pack(len(meta)), meta, *body]


def decode_wire(data: bytearray | memoryview, limits: HeaderLimits | None = None) -> Message:
    """Rebuild a message; arrays are views into ``data`` when it is writable.

    ``limits`` bound the headers of the meta and content parts (how much JSON a peer can
    make this side parse, and how many arrays list).
    """
    from fedhive.common.serde import decode_record_dict

    view = memoryview(data)
    if len(view) < _LEN.size:
        raise SerdeError("message shorter than its length prefix")
    (meta_len,) = _LEN.unpack_from(view)
    if meta_len > len(view) - _LEN.size:
        raise SerdeError(f"meta part of {meta_len} bytes overruns a {len(view)}-byte message")
    if limits is not None and meta_len > limits.max_header_bytes:
        raise SerdeError(f"meta part of {meta_len} bytes exceeds {limits.max_header_bytes}")
    metadata, error = meta.decode(bytes(view[_LEN.size : _LEN.size + meta_len]))
    body = view[_LEN.size + meta_len :]
    if bytes(body[: len(packed.MAGIC)]) == packed.MAGIC:
        content = packed.decode(body, limits.max_header_bytes if limits else None)
        return Message(metadata, content, error)
    rd = decode_record_dict(body, limits)
    kind = _field(_config(rd, "kind"), "kind", str)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise SerdeError(f"unknown content kind {kind!r}")
    return Message(metadata, decoder(rd), error)


def encode_message(message: Message) -> bytes:
    """The whole message as one bytes object."""
    return b"".join(encode_wire(message))


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Decode :func:`encode_message` output (``bytes`` are copied once to stay writable)."""
    return decode_wire(bytearray(data) if isinstance(data, bytes) else data)
