"""Tests of the wire format in fedhive.common.serde."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fedhive.common import serde
from fedhive.common.errors import SerdeError
from fedhive.common.records import Parameters, RecordDict, Scalar
from fedhive.common.serde import (
    DecodedArrays,
    decode_arrays,
    decode_parameters,
    decode_record_dict,
    decode_scalars,
    encode_arrays,
    encode_parameters,
    encode_record_dict,
    encode_scalars,
)

DTYPE_NAMES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip
DTYPES = [np.dtype(n) for n in DTYPE_NAMES]
NOT_BYTES: Any = "not bytes"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from(DTYPES).flatmap(
    lambda d: st.sampled_from([d, d.newbyteorder(">"), d.newbyteorder("<")])
)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
arrays = dtypes.flatmap(lambda d: hnp.arrays(dtype=d, shape=shapes))
names = st.text(max_size=8)
ints = st.integers(-(1 << 63), (1 << 64) - 1)  # what decoding accepts (64-bit)
scalars = st.one_of(st.booleans(), ints, st.floats(), st.text(max_size=10), st.binary())
scalar_dicts = st.dictionaries(names, scalars, max_size=5)
metric_dicts = st.dictionaries(names, st.one_of(ints, st.floats()), max_size=4)
record_dicts = st.builds(
    RecordDict,
    st.dictionaries(names, st.dictionaries(names, arrays, max_size=3), max_size=3),
    st.dictionaries(names, scalar_dicts, max_size=3),
    st.dictionaries(names, metric_dicts, max_size=3),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def little(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"))


def assert_same_array(orig: np.ndarray, got: np.ndarray) -> None:
    assert got.dtype == little(orig).dtype
    assert got.shape == orig.shape
    assert got.tobytes() == little(orig).tobytes()  # bit-exact, NaN payloads included
    assert got.flags.writeable


def same_scalar(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    return bool(a == b)


def assert_same_scalars(orig: dict[str, Any], got: dict[str, Any]) -> None:
    assert list(orig) == list(got)
    assert all(same_scalar(orig[k], got[k]) for k in orig), (orig, got)


def split(payload: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    """(magic, header, data section) of an array or record payload."""
    magic, _, length = struct.unpack_from("<8sII", payload)
    return magic, json.loads(payload[16 : 16 + length]), payload[16 + length :]


def reframe(payload: bytes, mutate: Callable[[dict[str, Any]], object]) -> bytes:
    """Rebuild ``payload`` after ``mutate`` changed its header in place (data kept)."""
    magic, header, data = split(payload)
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-(16 + len(raw)) % 64)
    return struct.pack("<8sII", magic, 1, len(raw)) + raw + data


def sample_payload() -> bytes:
    return encode_arrays(
        [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(7, dtype=np.int64), np.ones(0)],
        ["w", "b", "empty"],
    )


def expect_serde_error_or_ok(decode: Callable[[Any], object], data: Any) -> None:
    with contextlib.suppress(SerdeError):
        decode(data)


# ----------------------------------------------------------------------------- round trips


@FAST
@given(st.lists(arrays, max_size=5), st.integers(0, 0xFFFF), st.booleans())
def test_arrays_round_trip(arrs: list[np.ndarray], codec: int, named: bool) -> None:
    labels = [f"a{i}" for i in range(len(arrs))] if named else None
    out = decode_arrays(encode_arrays(arrs, labels, codec=codec))
    assert isinstance(out, DecodedArrays)
    assert out.names == (labels or [str(i) for i in range(len(arrs))])
    assert out.codec == codec
    assert len(out.arrays) == len(arrs)
    for orig, got in zip(arrs, out.arrays, strict=True):
        assert_same_array(orig, got)


@FAST
@given(scalar_dicts)
def test_scalars_round_trip(values: dict[str, Any]) -> None:
    assert_same_scalars(values, decode_scalars(encode_scalars(values)))


def test_scalars_edge_values() -> None:
    values: dict[str, Scalar] = {
        "t": True, "f": False, "zero": 0, "big": 2**64 - 1, "neg": -(2**63),
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "nzero": -0.0, "tiny": 5e-324,
        "s": "héllo\x00\U0001f600", "b": b"\x00\xff", "empty": b"",
    }  # fmt: skip
    got = decode_scalars(encode_scalars(values))
    assert_same_scalars(values, got)
    assert type(got["t"]) is bool and type(got["zero"]) is int
    numpy_scalar: Any = {"np": np.float32(0.5)}
    assert decode_scalars(encode_scalars(numpy_scalar)) == {"np": 0.5}


@FAST
@given(record_dicts)
def test_record_dict_round_trip(rd: RecordDict) -> None:
    got = decode_record_dict(encode_record_dict(rd))
    assert list(got.array_records) == list(rd.array_records)
    for name, rec in rd.array_records.items():
        assert list(got.array_records[name]) == list(rec)
        for key, arr in rec.items():
            assert_same_array(arr, got.array_records[name][key])
    assert list(got.config_records) == list(rd.config_records)
    for name, crec in rd.config_records.items():
        assert_same_scalars(crec, got.config_records[name])
    assert list(got.metric_records) == list(rd.metric_records)
    for name, mrec in rd.metric_records.items():
        assert_same_scalars(mrec, got.metric_records[name])


def test_record_dict_equality_and_tricky_names() -> None:
    rd = RecordDict(
        {"a/b": {"c": np.arange(3)}, "a": {"b/c": np.eye(2)}, "": {"": np.zeros((0, 2))}},
        {"cfg": {"lr": 0.1, "name": "x", "flag": True, "blob": b"\x01"}},
        {"m": {"acc": 0.5, "n": 10}},
    )
    assert decode_record_dict(encode_record_dict(rd)) == rd
    assert decode_record_dict(encode_record_dict(RecordDict())) == RecordDict()


def test_parameters_round_trip() -> None:
    p = Parameters(arrays=[np.arange(4, dtype=np.float32), np.array(True)])
    payload = encode_parameters(p, codec=3)
    assert decode_parameters(payload) == p
    assert decode_arrays(payload).codec == 3


def test_special_arrays() -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    cases: list[Any] = [
        base[::2, ::3],  # non-contiguous
        np.asfortranarray(base),
        base.T,
        np.arange(5, dtype=">i4"),  # big-endian
        np.array(3.5, dtype=">f8"),  # 0-d big-endian
        np.zeros((3, 0, 2), dtype=np.complex64),
        np.float32(2.5),  # numpy scalar
    ]
    out = decode_arrays(encode_arrays(cases))
    for orig, got in zip(cases, out.arrays, strict=True):
        assert_same_array(np.asarray(orig), got)
        assert got.dtype.byteorder in ("<", "=", "|")


# ----------------------------------------------------------------------------- zero copy


def test_bytes_input_copied_once_and_writable() -> None:
    payload = sample_payload()
    out = decode_arrays(payload)
    assert all(a.flags.writeable for a in out.arrays)
    view = np.frombuffer(payload, dtype=np.uint8)
    assert not any(np.shares_memory(view, a) for a in out.arrays)
    # Both non-empty arrays view the same single (bytearray) copy of the payload.
    owners = [root(a).obj for a in out.arrays[:2]]
    assert isinstance(owners[0], bytearray) and owners[0] is owners[1]
    assert len(owners[0]) == len(payload)


def root(arr: np.ndarray) -> Any:
    """The object at the end of an array's ``.base`` chain."""
    owner: Any = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner


def test_bytearray_input_is_viewed_without_copy() -> None:
    buf = bytearray(sample_payload())
    out = decode_arrays(buf)
    whole = np.frombuffer(buf, dtype=np.uint8)
    assert all(a.flags.writeable for a in out.arrays)
    assert np.shares_memory(whole, out.arrays[0]) and np.shares_memory(whole, out.arrays[1])
    out.arrays[0][0, 0] = 42.0
    assert decode_arrays(bytes(buf)).arrays[0][0, 0] == 42.0
    for arr in out.arrays:  # data is 64-byte aligned relative to the payload
        if arr.size:
            assert (arr.ctypes.data - whole.ctypes.data) % 64 == 0


def test_memoryview_inputs() -> None:
    payload = sample_payload()
    buf = bytearray(payload)
    out = decode_arrays(memoryview(buf))
    assert np.shares_memory(np.frombuffer(buf, dtype=np.uint8), out.arrays[0])
    ro = decode_arrays(memoryview(payload))
    assert all(a.flags.writeable for a in ro.arrays)
    with pytest.raises(SerdeError):
        decode_arrays(memoryview(buf)[::2])
    with pytest.raises(SerdeError):
        decode_arrays(NOT_BYTES)


def test_torch_from_numpy_does_not_warn() -> None:
    torch = pytest.importorskip("torch")
    for arr in decode_arrays(sample_payload()).arrays:
        torch.from_numpy(arr)  # warnings are errors in this test suite


def test_record_dict_arrays_are_views() -> None:
    rd = RecordDict({"r": {"w": np.arange(10.0)}})
    buf = bytearray(encode_record_dict(rd))
    arr = decode_record_dict(buf).array_records["r"]["w"]
    assert arr.flags.writeable and np.shares_memory(np.frombuffer(buf, np.uint8), arr)


# ----------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "bad",
    [
        np.array([object()], dtype=object),
        np.array(["ab"]),
        np.array([b"ab"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.zeros(2, dtype="V4"),
        np.zeros(2, dtype=np.longdouble),
    ],
)
def test_unsupported_dtypes_refused(bad: np.ndarray) -> None:
    with pytest.raises(SerdeError, match="unsupported dtype"):
        encode_arrays([np.zeros(1), bad])


def test_object_dtype_named_in_error() -> None:
    with pytest.raises(SerdeError, match="object"):
        encode_arrays([np.array([None], dtype=object)])


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (([np.zeros(1), np.zeros(1)], ["a", "a"]), {}),
        (([np.zeros(1)], ["a", "b"]), {}),
        (([np.zeros(1)], [1]), {}),
        (([[1, 2]],), {}),
        (([np.zeros(1)],), {"codec": -1}),
        (([np.zeros(1)],), {"codec": 1 << 16}),
        (([np.zeros(1)],), {"codec": True}),
    ],
)
def test_bad_encode_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(SerdeError):
        encode_arrays(*args, **kwargs)


def test_bad_scalar_and_record_values() -> None:
    list_value: Any = {"x": [1, 2]}
    int_key: Any = {1: 2}
    text_metric: Any = {"m": {"s": "text"}}
    with pytest.raises(SerdeError):
        encode_scalars(list_value)
    with pytest.raises(SerdeError):
        encode_scalars(int_key)
    with pytest.raises(SerdeError):
        encode_record_dict(RecordDict(metric_records=text_metric))
    with pytest.raises(SerdeError):
        encode_record_dict(RecordDict({"r": {"x": np.array([None], dtype=object)}}))
    int_name: Any = {1: {"k": 1}}
    with pytest.raises(SerdeError, match="record names"):
        encode_record_dict(RecordDict(config_records=int_name))
    int_key_arrays: Any = {"r": {1: np.zeros(1)}}
    with pytest.raises(SerdeError, match="keys of array record"):
        encode_record_dict(RecordDict(int_key_arrays))


# ----------------------------------------------------------------------------- decode errors


def test_wrong_magic() -> None:
    payload = bytearray(sample_payload())
    payload[:8] = b"NOTFHIVE"
    with pytest.raises(SerdeError, match="magic"):
        decode_arrays(payload)
    with pytest.raises(SerdeError, match="magic"):
        decode_scalars(sample_payload())
    with pytest.raises(SerdeError, match="magic"):
        decode_record_dict(sample_payload())


def test_future_version() -> None:
    payload = bytearray(sample_payload())
    struct.pack_into("<I", payload, 8, 7)
    with pytest.raises(SerdeError, match=r"version 7 \(a newer fedhive"):
        decode_arrays(payload)
    struct.pack_into("<I", payload, 8, 0)
    with pytest.raises(SerdeError, match="version 0"):
        decode_arrays(payload)


def test_header_length_past_end() -> None:
    payload = bytearray(sample_payload())
    struct.pack_into("<I", payload, 12, len(payload))
    with pytest.raises(SerdeError, match="header length"):
        decode_arrays(payload)
    struct.pack_into("<I", payload, 12, 0xFFFFFFFF)
    with pytest.raises(SerdeError, match="header length"):
        decode_arrays(payload)


def set_entry(index: int, **fields: Any) -> Callable[[dict[str, Any]], object]:
    return lambda header: header["arrays"][index].update(fields)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (set_entry(0, shape=[2, 2]), "needs 16 bytes"),
        (set_entry(0, nbytes=20), "needs 24 bytes"),
        (set_entry(0, shape=[2**62, 2**62]), "needs"),
        (set_entry(0, shape=[2**62, 2**62], nbytes=2**126), "outside"),
        (set_entry(2, shape=[0, 2**70]), "cannot build"),
        (set_entry(1, offset=0), "overlapping"),
        (set_entry(1, name="w"), "not unique"),
        (set_entry(0, dtype="object"), "unsupported dtype"),
        (set_entry(0, dtype="<f4"), "unsupported dtype"),
        (set_entry(0, shape=[-2, -3]), "non-negative"),
        (set_entry(0, shape=[2.0, 3]), "non-negative int"),
        (set_entry(0, shape=[True, 3]), "non-negative int"),
        (set_entry(0, shape=[1] * 65), "dimensions"),
        (set_entry(0, offset=8), "multiple of 64"),
        (set_entry(0, offset=10**6), "outside"),
        (set_entry(0, name=5), "name must be str"),
        (set_entry(0, extra=1), "keys"),
        (lambda h: h["arrays"][0].pop("offset"), "keys"),
        (lambda h: h.update(codec=-1), "codec"),
        (lambda h: h.update(codec="0"), "codec"),
        (lambda h: h.update(arrays={}), "list"),
        (lambda h: h.update(more=1), "keys"),
        (lambda h: h["arrays"].append(h["arrays"][1] | {"name": "x"}), "overlapping"),
    ],
)
def test_bad_headers(mutate: Callable[[dict[str, Any]], object], message: str) -> None:
    with pytest.raises(SerdeError, match=message):
        decode_arrays(reframe(sample_payload(), mutate))


def test_trailing_bytes() -> None:
    for extra in (b"\x00", bytes(64), b"junk"):
        with pytest.raises(SerdeError, match="trailing"):
            decode_arrays(sample_payload() + extra)
    with pytest.raises(SerdeError, match="trailing"):
        decode_arrays(encode_arrays([]) + bytes(64))
    with pytest.raises(SerdeError, match="trailing"):
        decode_scalars(encode_scalars({"a": 1}) + b" ")


def test_header_json_problems() -> None:
    prefix = struct.Struct("<8sII")
    for raw in (b"\xff\xfe", b"{", b'{"codec":NaN,"arrays":[]}', b'{"codec":0,"codec":0}', b"[]"):
        payload = prefix.pack(b"FHIVEARR", 1, len(raw)) + raw
        with pytest.raises(SerdeError):
            decode_arrays(payload)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(SerdeError):
        decode_arrays(prefix.pack(b"FHIVEARR", 1, len(deep)) + deep)
    unaligned = b'{"codec":0,"arrays":[]}'
    with pytest.raises(SerdeError, match="multiple of 64"):
        decode_arrays(prefix.pack(b"FHIVEARR", 1, len(unaligned)) + unaligned)


@pytest.mark.parametrize(
    "values",
    [
        [["a", "int", "zz"]],
        [["a", "float", "1.5x"]],
        [["a", "bytes", "!!"]],
        [["a", "bool", 1]],
        [["a", "int", 3]],
        [["a", "list", []]],
        [["a", "str", "x"], ["a", "str", "y"]],
        [["a", "str"]],
        [[1, "str", "x"]],
        {"a": 1},
    ],
)
def test_bad_scalar_payloads(values: Any) -> None:
    raw = json.dumps({"values": values}).encode()
    with pytest.raises(SerdeError):
        decode_scalars(struct.pack("<8sII", b"FHIVESCL", 1, len(raw)) + raw)


def record_mutation(group: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda header: header["records"].update({group: value})


@pytest.mark.parametrize(
    "mutate",
    [
        record_mutation("array_records", [["r", 5]]),
        record_mutation("array_records", [["r", 0]]),
        record_mutation("array_records", [["q", 0], ["r", 1]]),
        record_mutation("array_records", [["r", 1], ["r", 0]]),
        record_mutation("array_records", [["r", 1, 2]]),
        record_mutation("metric_records", [["m", [["k", "str", "x"]]]]),
        record_mutation("config_records", [["c", [["k", "float", 1.0]]]]),
        lambda h: h["arrays"][0].update(name="1/a"),
        lambda h: h.pop("records"),
    ],
)
def test_bad_record_headers(mutate: Callable[[dict[str, Any]], object]) -> None:
    rd = RecordDict({"r": {"a": np.arange(3)}}, {"c": {"k": 1}}, {"m": {"k": 2.0}})
    payload = reframe(encode_record_dict(rd), mutate)
    with pytest.raises(SerdeError):
        decode_record_dict(payload)


# ----------------------------------------------------------------------------- fuzzing

DECODERS = [decode_arrays, decode_scalars, decode_record_dict, decode_parameters]


def valid_payloads() -> list[bytes]:
    rd = RecordDict({"r": {"a": np.arange(3, dtype=np.int16)}}, {"c": {"k": b"x"}}, {"m": {"v": 1}})
    return [sample_payload(), encode_scalars({"a": 1, "b": 2.5, "s": "x"}), encode_record_dict(rd)]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(DECODERS))
def test_random_bytes_only_raise_serde_error(data: bytes, decode: Callable[[Any], object]) -> None:
    expect_serde_error_or_ok(decode, data)
    expect_serde_error_or_ok(decode, b"FHIVEARR\x01\x00\x00\x00" + data)


@pytest.mark.parametrize("index", range(3))
def test_every_truncation_is_rejected(index: int) -> None:
    payload = valid_payloads()[index]
    for n in range(len(payload)):
        for decode in DECODERS:
            with pytest.raises(SerdeError):
                decode(payload[:n])
            with pytest.raises(SerdeError):
                decode(bytearray(payload[:n]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(3)), st.data())
def test_single_byte_mutations(index: int, data: st.DataObject) -> None:
    payload = bytearray(valid_payloads()[index])
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] = data.draw(st.integers(0, 255))
    for decode in DECODERS:
        expect_serde_error_or_ok(decode, bytes(payload))


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indexes) into a JSON value."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += paths(value, (*prefix, i))
    return out


def replace_at(header: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 2]), st.data())
def test_header_mutations(index: int, data: st.DataObject) -> None:
    payload = valid_payloads()[index]
    _, header, _ = split(payload)
    path = data.draw(st.sampled_from(paths(header)[1:]))
    value = data.draw(json_values)
    mutated = reframe(payload, lambda h: replace_at(h, path, value))
    for decode in DECODERS:
        expect_serde_error_or_ok(decode, mutated)
        expect_serde_error_or_ok(decode, bytearray(mutated))


@FAST
@given(st.lists(arrays, min_size=1, max_size=3), st.data())
def test_mutated_array_payloads(arrs: list[np.ndarray], data: st.DataObject) -> None:
    payload = bytearray(encode_arrays(arrs))
    for _ in range(3):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    expect_serde_error_or_ok(decode_arrays, payload)


# ----------------------------------------------------------------------------- hygiene


def test_module_never_uses_pickle() -> None:
    source = Path(serde.__file__).read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("pickle" in (name or "") for name in imported)
    assert "allow_pickle=True" not in source


def test_layout_matches_docstring() -> None:
    payload = sample_payload()
    magic, version, length = struct.unpack_from("<8sII", payload)
    assert (magic, version) == (b"FHIVEARR", 1)
    assert (16 + length) % 64 == 0
    _, header, data = split(payload)
    assert header["codec"] == 0
    entries = header["arrays"]
    assert [e["name"] for e in entries] == ["w", "b", "empty"]
    assert [e["offset"] % 64 for e in entries] == [0, 0, 0]
    assert len(data) == max(e["offset"] + e["nbytes"] for e in entries)
    assert data[:24] == np.arange(6, dtype="<f4").tobytes()
