"""Encoded updates and models as named records (``extras``), and their validation.

An update (client model minus the model it received) is split by the model's layout:
arrays of at least ``min_size`` elements are concatenated, in model order, into one
float32 vector for the codec; smaller ones travel as they are (float32, concatenated).
Both sides compute this split from the model's shapes, so nothing about it travels.

Records (``"codec"`` is reserved for this, see
:data:`~fedhive.common.records.RESERVED_EXTRAS`):

- ``FitIns.extras.config_records["codec.task"]``: what the server asks for (codec id and
  parameters, ``error_feedback``, ``min_size``, the round's shared ``seed``, and the
  ``downlink`` codec when the model itself is encoded);
- ``FitRes.extras.array_records["codec"]``: one uint8 array ``"frame"`` holding the
  codec id, what the encoder chose (index coding), the codec's arrays and ``"raw"`` (the
  small arrays), in one compact frame (:mod:`fedhive.compression._frame`: a few bytes of
  header instead of a JSON entry per array in the message);
- an encoded model (downlink): ``FitIns.extras.array_records["codec.model"]`` and
  ``config_records["codec.model"]`` with the codec and each array's dtype and shape;
  ``FitIns.parameters`` is then empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.records import NDArray, NDArrays, RecordDict, Scalar
from fedhive.compression import _frame
from fedhive.compression.codecs import Codec, codec_from_params

__all__ = [
    "MODEL_RECORD",
    "PAYLOAD_RECORD",
    "TASK_RECORD",
    "Layout",
    "decode_model",
    "decode_update",
    "encode_model",
    "encode_update",
    "task_record",
    "codec_from_task",
]

TASK_RECORD = "codec.task"
PAYLOAD_RECORD = "codec"
MODEL_RECORD = "codec.model"
_RAW = "raw"
_FRAME = "frame"


@dataclass(frozen=True)
class Layout:
    """Which model arrays a codec compresses (``large``) and which travel raw."""

    shapes: tuple[tuple[int, ...], ...]
    large: tuple[bool, ...]

    @classmethod
    def of(cls, arrays: Sequence[NDArray], min_size: int) -> Layout:
        shapes = tuple(tuple(int(d) for d in np.shape(a)) for a in arrays)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        return cls(shapes, tuple(n >= min_size and n > 0 for n in sizes))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def segments(self) -> list[int]:
        return [n for n, big in zip(self.sizes, self.large, strict=True) if big]

    @property
    def raw_size(self) -> int:
        return sum(n for n, big in zip(self.sizes, self.large, strict=True) if not big)

    def split(self, arrays: Sequence[NDArray]) -> tuple[NDArray, NDArray]:
        """(the compressed part, the raw part), each one float32 vector."""
        big = [np.ravel(a) for a, b in zip(arrays, self.large, strict=True) if b]
        small = [np.ravel(a) for a, b in zip(arrays, self.large, strict=True) if not b]
        return _concat(big), _concat(small)

    def join(self, compressed: NDArray, raw: NDArray) -> NDArrays:
        """The arrays (float32, model shapes) from the two vectors :meth:`split` made."""
        out: NDArrays = []
        at_c = at_r = 0
        for shape, n, big in zip(self.shapes, self.sizes, self.large, strict=True):
            if big:
                out.append(compressed[at_c : at_c + n].reshape(shape))
                at_c += n
            else:
                out.append(raw[at_r : at_r + n].reshape(shape))
                at_r += n
        return out


def _concat(parts: list[NDArray]) -> NDArray:
    if not parts:
        return np.zeros(0, np.float32)
    out = np.empty(sum(p.size for p in parts), np.float32)
    at = 0
    for p in parts:
        out[at : at + p.size] = p
        at += p.size
    return out


def task_record(codec: Codec | None, seed: int, downlink: Codec | None = None) -> dict[str, Scalar]:
    """The ``"codec.task"`` config record telling a client how to encode this round."""
    record: dict[str, Scalar] = {"uplink": codec.id if codec else "none", "seed": int(seed)}
    if codec is not None:
        record.update({f"p.{k}": v for k, v in codec.params().items()})
    if downlink is not None:
        record["downlink"] = downlink.id
        record.update({f"d.{k}": v for k, v in downlink.params().items()})
    return record


def codec_from_task(record: Mapping[str, Scalar]) -> tuple[Codec | None, int, Codec | None]:
    """The uplink codec (``None``: the update travels plain), shared seed and downlink
    codec (or ``None``) a task asks for;
    :class:`SerdeError` when the record is malformed (the client checks what the server
    tells it)."""
    seed = record.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise SerdeError(f"the {TASK_RECORD!r} record needs an int 'seed', got {seed!r}")
    up = {k[2:]: v for k, v in record.items() if k.startswith("p.")}
    down = {k[2:]: v for k, v in record.items() if k.startswith("d.")}
    try:
        uplink = record.get("uplink")
        codec = None if uplink == "none" else codec_from_params(uplink, up)
        downlink = None
        if "downlink" in record:
            downlink = codec_from_params(record["downlink"], down)
    except (TypeError, ValueError) as exc:
        raise SerdeError(f"the server asked for an invalid codec: {exc}") from exc
    return codec, seed, downlink


def encode_update(
    codec: Codec, layout: Layout, compressed: NDArray, raw: NDArray, encoded: tuple
) -> RecordDict:
    """The reply records of an already encoded update (see :func:`Codec.encode`): one
    frame (:mod:`fedhive.compression._frame`) holding the codec's arrays, what the encoder
    chose, and the raw small arrays."""
    fields_, info = encoded
    if _RAW in fields_:
        raise SerdeError(f"a codec may not name a payload array {_RAW!r}")
    arrays = {**fields_, _RAW: np.ascontiguousarray(raw, np.float32)}
    return RecordDict({PAYLOAD_RECORD: {_FRAME: _frame.pack(codec.id, arrays, info)}})


def decode_update(codec: Codec, layout: Layout, extras: RecordDict, seed: int) -> NDArrays:
    """The update behind a reply's records, as float32 arrays of the model's shapes;
    :class:`SerdeError` naming what is wrong (nothing is returned in part)."""
    record = extras.array_records.get(PAYLOAD_RECORD)
    if record is None or set(record) != {_FRAME}:
        raise SerdeError(
            f"a compressed reply carries the array record {PAYLOAD_RECORD!r} with one "
            f"array {_FRAME!r}; this one has {extras!r}"
        )
    codec_id, fields_, info = _frame.unpack(record[_FRAME])
    return _decode_fields(codec, layout, codec_id, fields_, info, seed)


def _decode_fields(
    codec: Codec,
    layout: Layout,
    codec_id: object,
    fields_: dict[str, NDArray],
    info: Mapping[str, Scalar],
    seed: int,
) -> NDArrays:
    if codec_id != codec.id:
        raise SerdeError(
            f"the reply is encoded with {codec_id!r}, the round asked for {codec.id!r}"
        )
    raw = fields_.pop(_RAW, None)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.float32 or raw.ndim != 1:
        raise SerdeError(f"payload array {_RAW!r} must be 1-D float32")
    if raw.size != layout.raw_size:
        raise SerdeError(
            f"payload array {_RAW!r} must hold {layout.raw_size} values, got {raw.size}"
        )
    if not np.isfinite(raw).all():
        raise SerdeError(f"payload array {_RAW!r} holds NaN or Inf")
    compressed = codec.decode(fields_, info, layout.segments, seed)
    if not np.isfinite(compressed).all():
        raise SerdeError("the decoded update holds NaN or Inf")
    return layout.join(compressed, raw)


def _layout_record(arrays: Sequence[NDArray]) -> dict[str, Scalar]:
    return {
        str(i): f"{np.asarray(a).dtype.name}:{','.join(str(d) for d in np.shape(a))}"
        for i, a in enumerate(arrays)
    }


def _layout_from(record: Mapping[str, Scalar]) -> tuple[list[np.dtype], list[tuple[int, ...]]]:
    keys = [k for k in record if k != "id"]
    if keys != [str(i) for i in range(len(keys))]:
        raise SerdeError("an encoded model's record names its arrays 0, 1, ... in order")
    dtypes, shapes = [], []
    for key in keys:
        text = record[key]
        if not isinstance(text, str) or ":" not in text:
            raise SerdeError(f"array {key} of an encoded model has no 'dtype:shape' entry")
        name, _, dims = text.partition(":")
        if name not in ("float16", "float32", "float64"):
            raise SerdeError(f"an encoded model's arrays must be float, got {name!r}")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError as exc:
            raise SerdeError(f"bad shape {dims!r} for array {key}") from exc
        if any(d < 0 for d in shape):
            raise SerdeError(f"bad shape {dims!r} for array {key}")
        dtypes.append(np.dtype(name))
        shapes.append(shape)
    return dtypes, shapes


def encode_model(
    codec: Codec, arrays: Sequence[NDArray], rng: np.random.Generator
) -> tuple[RecordDict, NDArrays]:
    """The model encoded for the downlink (records for ``FitIns.extras``) and what the
    clients will decode it to (for server-side error feedback)."""
    layout = Layout.of(arrays, codec.min_size)
    compressed, raw = layout.split(arrays)
    (fields_, info), decoded = codec.roundtrip(compressed, layout.segments, rng)
    record = {"id": codec.id, **_layout_record(arrays)}
    rd = RecordDict(
        {MODEL_RECORD: {**fields_, _RAW: raw}},
        {MODEL_RECORD: record, f"{MODEL_RECORD}.info": dict(info)},
    )
    return rd, layout.join(decoded, raw)


def decode_model(codec: Codec, extras: RecordDict) -> NDArrays:
    """The model behind the downlink records, in its arrays' own dtypes."""
    record = extras.config_records.get(MODEL_RECORD)
    arrays = extras.array_records.get(MODEL_RECORD)
    if record is None or arrays is None:
        raise SerdeError(f"an encoded model carries the records {MODEL_RECORD!r}")
    if record.get("id") != codec.id:
        raise SerdeError(f"the model is encoded with {record.get('id')!r}, not {codec.id!r}")
    dtypes, shapes = _layout_from(record)
    layout = Layout.of([np.empty(s, np.uint8) for s in shapes], codec.min_size)
    info = extras.config_records.get(f"{MODEL_RECORD}.info", {})
    flat = _decode_fields(codec, layout, codec.id, dict(arrays), info, 0)
    return [a.astype(dt, copy=False) for a, dt in zip(flat, dtypes, strict=True)]
