"""The binary message header and the packed reply: round trips, exact sizes, refusals."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fedhive.common.errors import SerdeError
from fedhive.common.message import Message, Metadata
from fedhive.common.records import Code, FitRes, Parameters, RecordDict, Status
from fedhive.common.serde import HeaderLimits
from fedhive.transport import meta, packed
from fedhive.transport.base import wire_length
from fedhive.transport.codec import decode_wire, encode_content, encode_wire

INT = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
TEXT = st.text(max_size=12)  # any unicode: surrogates and astral characters included
METRIC = st.one_of(
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False),
    TEXT,
    st.binary(max_size=20),
)
LOOSE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def metadata() -> st.SearchStrategy[Metadata]:
    return st.builds(
        Metadata,
        run_id=INT,
        message_id=TEXT,
        node_id=TEXT,
        server_round=INT,
        model_version=INT,
        message_type=TEXT,
        reply_to=TEXT,
        seed=INT,
    )


def reply(frame: np.ndarray, metrics: dict | None = None, message: str = "Success") -> FitRes:
    return FitRes(
        Status(Code.OK, message),
        Parameters(arrays=[]),
        163,
        {"loss": 1.88, "num_steps": 34} if metrics is None else metrics,
        extras=RecordDict({"codec": {"frame": frame}}),
    )


def wire(message: Message) -> bytearray:
    return bytearray(b"".join(encode_wire(message)))


META = Metadata(run_id=0, message_id="0-1", node_id="80", server_round=1, model_version=0,
                message_type="fit", reply_to="0-1", seed=0x44928E2092CCDB90)  # fmt: skip


# -- the message header -----------------------------------------------------------------------


@LOOSE
@given(metadata(), st.none() | TEXT)
def test_the_header_round_trips_and_its_size_is_its_length(m, error):
    message = Message(m, None, error)
    data = meta.encode(message)
    assert meta.size(message) == len(data)
    assert meta.decode(data) == (m, error)


def test_a_replys_header_is_short():
    # the scalar payload this replaces took 250 bytes for the same metadata
    assert meta.size(Message(META, None)) == 33


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"FHM2\x00", "starts with"),
        (b"FHM1", "truncated"),
        (b"FHM1\x02" + b"\x00" * 8, "unknown flags"),
        (b"FHM1\x00\x00\x00\x00", "truncated in seed"),
        (b"FHM1\x00" + b"\x80\x00" + b"\x00" * 7, "not minimally encoded"),
        (b"FHM1\x00" + b"\xff" * 11, "longer than 10 bytes"),
        (b"FHM1\x00" + b"\xff" * 9 + b"\x7f" + b"\x00" * 7, "out of"),  # 2**70 - 1 zigzagged
        (b"FHM1\x00\x00\x00\x00\x00\x05ab", "truncated in message_id"),
        (b"FHM1\x00\x00\x00\x00\x00\x01\xff\x00\x00\x00", "not utf-8"),
        (b"FHM1\x00" + b"\x00" * 8 + b"!", "past its fields"),
        (b"FHM1\x01" + b"\x00" * 8, "truncated in the error"),
    ],
)
def test_a_malformed_header_is_refused_with_the_reason(data, reason):
    with pytest.raises(SerdeError, match=reason):
        meta.decode(data)


def test_every_truncation_of_a_header_is_refused():
    data = meta.encode(Message(META, None, "boom"))
    for n in range(len(data)):
        with pytest.raises(SerdeError):
            meta.decode(data[:n])


def test_ints_outside_the_scalar_range_are_refused_when_encoding():
    for value in (-(1 << 63) - 1, 1 << 64):
        bad = Metadata(run_id=value, message_id="", node_id="", server_round=0,
                       model_version=0, message_type="fit")  # fmt: skip
        with pytest.raises(SerdeError, match="out of"):
            meta.encode(Message(bad, None))


def test_the_message_header_is_bounded_by_the_header_limit():
    data = wire(Message(META, None, "x" * 500))
    with pytest.raises(SerdeError, match="exceeds 100"):
        decode_wire(data, HeaderLimits(max_header_bytes=100, max_arrays=4))


# -- the packed reply -------------------------------------------------------------------------


@LOOSE
@given(
    st.binary(max_size=64),
    st.dictionaries(TEXT, METRIC, max_size=5),
    TEXT,
    st.integers(min_value=0, max_value=1 << 53),
    st.sampled_from(list(Code)),
)
def test_a_packed_reply_round_trips_and_counts_its_bytes(raw, metrics, message, n, code):
    frame = np.frombuffer(raw, np.uint8).copy()
    res = FitRes(Status(code, message), Parameters(arrays=[]), n, metrics,
                 extras=RecordDict({"codec": {"frame": frame}}))  # fmt: skip
    pieces = encode_content(res)
    assert bytes(pieces[0][:8]) == packed.MAGIC
    assert packed.size(res) == sum(len(p) for p in pieces)
    out = decode_wire(wire(Message(META, res)))
    assert wire_length(Message(META, res)) == len(wire(Message(META, res)))
    got = out.content
    assert (got.status, got.num_examples, got.metrics) == (res.status, n, metrics)
    assert list(got.extras.array_records) == ["codec"]
    np.testing.assert_array_equal(got.extras.array_records["codec"]["frame"], frame)
    assert got.parameters.arrays == []


def test_the_buffer_comes_back_as_a_writable_view_of_the_bytes():
    data = wire(Message(META, reply(np.arange(40, dtype=np.uint8))))
    got = decode_wire(data).content.extras.array_records["codec"]["frame"]
    assert got.flags.writeable
    got[0] = 99
    assert 99 in data[-40:]  # no copy was made


def test_a_compressed_replys_envelope_is_under_200_bytes():
    frame = np.zeros(1616, np.uint8)  # an EDEN 1-bit update of a 12.2k-parameter model
    message = Message(META, reply(frame))
    assert wire_length(message) == len(wire(message)) == 1616 + 114


@pytest.mark.parametrize(
    "res",
    [
        reply(np.zeros(4, np.uint16)),
        reply(np.zeros((2, 2), np.uint8)),
        reply(np.zeros(4, np.uint8), metrics={"big": 1 << 63}),
        reply(np.zeros(4, np.uint8), metrics={"x": np.float32(1)}),
        FitRes(Status(Code.OK, ""), Parameters(arrays=[np.zeros(3)]), 1, {},
               extras=RecordDict({"codec": {"frame": np.zeros(4, np.uint8)}})),
        FitRes(Status(Code.OK, ""), Parameters(arrays=[]), 1, {},
               extras=RecordDict({"codec": {"frame": np.zeros(4, np.uint8)}}, {"c": {"a": 1}})),
        FitRes(Status(Code.OK, ""), Parameters(arrays=[]), 1, {},
               extras=RecordDict({"a": {"f": np.zeros(4, np.uint8)}, "b": {}})),
    ],
)  # fmt: skip
def test_other_replies_keep_the_record_payload(res):
    assert not packed.packable(res)
    pieces = encode_content(res)
    assert bytes(pieces[0][:8]) == b"FHIVEREC"
    out = decode_wire(wire(Message(META, res))).content
    assert out.num_examples == res.num_examples


def _packed_body(**change: object) -> bytearray:
    """A packed reply's content, with one field replaced by raw bytes."""
    parts = {
        "head": struct.pack("<8sBBQ", packed.MAGIC, 1, 0, 163),
        "message": b"\x02\x00ok",
        "metrics": b"\x01\x04loss\x02" + struct.pack("<d", 1.5),
        "names": b"\x05codec\x05frame",
        "data": b"\x01\x02\x03",
    }
    parts.update(change)  # type: ignore[arg-type]
    return bytearray(b"".join(parts.values()))


def test_the_hand_built_packed_reply_decodes():
    res = packed.decode(memoryview(_packed_body()))
    assert (res.num_examples, res.metrics, res.status.message) == (163, {"loss": 1.5}, "ok")
    assert res.extras.array_records["codec"]["frame"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"head": struct.pack("<8sBBQ", b"FHIVEPKX", 1, 0, 1)}, "starts with"),
        ({"head": struct.pack("<8sBBQ", packed.MAGIC, 2, 0, 1)}, "version"),
        ({"head": struct.pack("<8sBBQ", packed.MAGIC, 1, 77, 1)}, "unknown status code"),
        ({"head": struct.pack("<8sBBQ", packed.MAGIC, 1, 0, (1 << 53) + 1)}, "num_examples"),
        ({"message": b"\xff\x00ok"}, "truncated"),
        ({"message": b"\x02\x00\xff\xfe"}, "not utf-8"),
        ({"metrics": b"\x02\x01a\x01" + b"\x00" * 8 + b"\x01a\x01" + b"\x00" * 8}, "twice"),
        ({"metrics": b"\x01\x01a\x09"}, "unknown tag"),
        ({"metrics": b"\x01\x01a\x00\x02"}, "a bool is 0 or 1"),
        ({"metrics": b"\x01\x01a\x03\xff\x00\x00\x00"}, "truncated"),
        ({"names": b"\x05codec", "data": b""}, "truncated"),
    ],
)
def test_a_malformed_packed_reply_is_refused_with_the_reason(change, reason):
    with pytest.raises(SerdeError, match=reason):
        packed.decode(memoryview(_packed_body(**change)))


def test_every_truncation_of_a_packed_header_is_refused():
    body = _packed_body(data=b"")
    for n in range(len(body)):
        with pytest.raises(SerdeError):
            packed.decode(memoryview(body[:n]))


def test_the_packed_header_is_bounded_by_the_header_limit():
    res = reply(np.zeros(8, np.uint8), message="m" * 300)
    data = wire(Message(META, res))
    with pytest.raises(SerdeError, match="header exceeds 200"):
        decode_wire(data, HeaderLimits(max_header_bytes=200, max_arrays=4))
    assert (
        decode_wire(data, HeaderLimits(max_header_bytes=400, max_arrays=4)).content.status
        == res.status
    )


def test_eden_below_one_bit_is_over_32x_smaller_on_the_wire_than_the_plain_reply():
    from fedhive.cli.experiment import ModelSpec
    from fedhive.compression import EDEN
    from fedhive.compression.payload import Layout, decode_update, encode_update

    model = ModelSpec("cnn1d", in_dim=40, num_classes=10, hidden=0).initial(0)  # default CNN
    rng = np.random.default_rng(0)
    update = [rng.normal(scale=0.01, size=a.shape).astype(np.float32) for a in model]
    codec = EDEN(bits=1, ratio=0.7, min_size=0)
    layout = Layout.of(model, codec.min_size)
    compressed, raw = layout.split(update)
    encoded = codec.encode(compressed, layout.segments, rng, 7)
    extras = encode_update(codec, layout, compressed, raw, encoded)
    metrics = {"loss": 1.88, "num_steps": 34}
    res = FitRes(Status(Code.OK, "Success"), Parameters(arrays=[]), 163, metrics, extras=extras)
    plain = FitRes(Status(Code.OK, "Success"), Parameters(arrays=update), 163, metrics)
    small, big = Message(META, res), Message(META, plain)
    assert wire_length(small) == len(wire(small))
    assert wire_length(big) == len(wire(big))
    assert wire_length(big) / wire_length(small) > 32
    decoded = decode_wire(wire(small)).content
    got = decode_update(codec, layout, decoded.extras, 7)
    want = layout.join(codec.decode(encoded[0], encoded[1], layout.segments, 7), raw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lone_surrogates_round_trip_in_both_headers():
    res = reply(np.zeros(3, np.uint8), metrics={"k\ud800": "v\udfff"}, message="m\ud83d")
    message = Message(Metadata(0, "id\udc00", "n", 1, 0, "fit", "r"), res, "e\ud800")
    out = decode_wire(wire(message))
    assert out.metadata == message.metadata and out.error == message.error
    assert out.content.metrics == res.metrics and out.content.status == res.status
    assert wire_length(message) == len(wire(message))
