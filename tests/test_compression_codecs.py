"""Codecs: round trips, unbiasedness, error-feedback bookkeeping, malformed payloads."""

from __future__ import annotations

import numpy as np
import pytest

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import RecordDict
from fedhive.compression import BF16, EDEN, FP16, QSGD, Codec, RandomK, Sign, TopK, _bits, _frame
from fedhive.compression.codecs import codec_from_params, gaussian_centroids
from fedhive.compression.payload import (
    PAYLOAD_RECORD,
    Layout,
    codec_from_task,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    task_record,
)

ALL: list[Codec] = [
    FP16(),
    BF16(),
    QSGD(bits=4),
    QSGD(bits=3, block=100),
    QSGD(bits=3, scale=4.0),
    TopK(ratio=0.05),
    TopK(ratio=0.6),
    RandomK(ratio=0.1),
    RandomK(ratio=0.1, shared_seed=True),
    Sign(),
    Sign(block=64),
    EDEN(bits=1, block=256),
    EDEN(bits=3, block=256),
    EDEN(bits=1, block=256, ratio=0.5),
    EDEN(bits=2, block=1024, ratio=0.3),
]


def vector(size=3000, seed=0):
    return np.random.default_rng(seed).normal(size=size).astype(np.float32)


@pytest.mark.parametrize("width", range(1, 17))
def test_bit_packing_round_trips_every_width(width):
    values = np.random.default_rng(width).integers(0, 1 << width, size=1001)
    packed = _bits.pack(values.astype(np.uint16), width)
    assert packed.nbytes == _bits.packed_nbytes(1001, width)
    np.testing.assert_array_equal(_bits.unpack(packed, width, 1001), values)


@pytest.mark.parametrize("codec", ALL, ids=repr)
def test_round_trip_shapes_dtypes_and_error(codec):
    x = vector()
    segments = [2000, 1000]
    (arrays, info), decoded = codec.roundtrip(x, segments, np.random.default_rng(1), seed=7)
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    assert np.isfinite(decoded).all()
    rel = np.linalg.norm(decoded - x) / np.linalg.norm(x)
    bound = {"fp16": 1e-3, "bf16": 1e-2, "qsgd": 0.5, "eden": 0.8, "sign": 0.7}
    if codec.id in bound:
        ratio = getattr(codec, "ratio", 1.0) if codec.id == "eden" else 1.0
        # unbiased sparsification keeping a share p: (1 + e^2) / p - 1 in square
        assert rel < (bound[codec.id] if ratio == 1 else np.sqrt(1.9 / ratio - 1))
    # decoding again from the raw arrays gives the same vector (nothing hidden in state)
    again = codec.decode(arrays, info, segments, seed=7)
    np.testing.assert_array_equal(again, decoded)


def test_topk_keeps_the_largest_exactly_and_picks_the_smaller_index_coding():
    x = vector(10_000)
    (arrays, info), decoded = TopK(ratio=0.01).roundtrip(x, [10_000], np.random.default_rng(0))
    keep = np.argsort(np.abs(x))[-100:]
    np.testing.assert_array_equal(decoded[keep], x[keep])
    assert np.count_nonzero(decoded) == 100
    assert info["index"] == "delta" and arrays["index"].nbytes <= 200
    (arrays, info), _ = TopK(ratio=0.6).roundtrip(x, [10_000], np.random.default_rng(0))
    assert info["index"] == "bitmap" and arrays["index"].nbytes == 1250


def test_shared_seed_random_k_has_one_support_for_every_client():
    codec = RandomK(ratio=0.1, shared_seed=True)
    a = codec.encode(vector(seed=1), [3000], np.random.default_rng(1), seed=99)[0]
    b = codec.encode(vector(seed=2), [3000], np.random.default_rng(2), seed=99)[0]
    assert set(a) == {"values"} and a["values"].size == 300  # only the values travel
    da = codec.decode(a, {}, [3000], seed=99)
    db = codec.decode(b, {}, [3000], seed=99)
    np.testing.assert_array_equal(da != 0, db != 0)


def test_qsgd_levels_are_within_one_step():
    x = vector()
    codec = QSGD(bits=4, block=128)
    decoded = codec.roundtrip(x, [3000], np.random.default_rng(0))[1]
    blocks = np.abs(np.concatenate([x, np.zeros(-x.size % 128, np.float32)])).reshape(-1, 128)
    step = np.repeat(blocks.max(axis=1) / 15, 128)[: x.size]
    assert (np.abs(decoded - x) <= step * (1 + 1e-5)).all()


def test_sign_decodes_to_plus_minus_the_mean_magnitude():
    x = vector()
    decoded = Sign().roundtrip(x, [3000], np.random.default_rng(0))[1]
    scale = np.abs(x).mean()
    np.testing.assert_allclose(np.abs(decoded), scale, rtol=1e-5)
    assert (np.sign(decoded) == np.where(x < 0, -1, 1)).all()


def test_gaussian_centroids_are_lloyd_max():
    c1, _ = gaussian_centroids(1)
    np.testing.assert_allclose(c1, [-np.sqrt(2 / np.pi), np.sqrt(2 / np.pi)], rtol=1e-5)
    c2, _ = gaussian_centroids(2)
    np.testing.assert_allclose(np.abs(c2), [1.5104, 0.4528, 0.4528, 1.5104], atol=1e-3)


@pytest.mark.parametrize(
    ("codec", "size"),
    [
        (QSGD(bits=2), 64),
        (QSGD(bits=1, block=16), 64),
        (RandomK(ratio=0.25), 64),
        (EDEN(bits=1, block=256), 256),
        (EDEN(bits=2, block=256), 256),
        (EDEN(bits=4, block=256), 256),
        (EDEN(bits=3, block=256), 256),
        (EDEN(bits=1, block=256, ratio=0.5), 256),
    ],
    ids=repr,
)
def test_stochastic_codecs_are_unbiased(codec, size):
    """Mean of 10^4 decodes within a 5-sigma bound of the input, for every coordinate.

    EDEN is unbiased over uniformly random rotations; over the randomized Hadamard
    rotation it uses, the bias shrinks with the block (at 64 coordinates it shows: about
    2% of the norm), so it is tested at 256.
    """
    x = vector(size, seed=3)
    trials = 10_000
    total = np.zeros(size, np.float64)
    squares = np.zeros(size, np.float64)
    rng = np.random.default_rng(11)
    for _ in range(trials):
        d = codec.roundtrip(x, [size], rng)[1].astype(np.float64)
        total += d
        squares += d * d
    mean = total / trials
    std = np.sqrt(np.maximum(squares / trials - mean**2, 0.0))
    bound = 5.0 * std / np.sqrt(trials) + 1e-6
    assert (np.abs(mean - x) <= bound).all(), np.max(np.abs(mean - x) / bound)


def test_biased_codecs_are_biased_without_feedback():
    x = vector(64, seed=3)
    decoded = TopK(ratio=0.25).roundtrip(x, [64], np.random.default_rng(0))[1]
    assert np.count_nonzero(decoded - x) > 0  # deterministic: its mean is itself


@pytest.mark.parametrize("codec", [TopK(ratio=0.02), Sign(), QSGD(bits=2), EDEN(bits=1)], ids=repr)
def test_error_feedback_sent_plus_residual_equals_inputs(codec):
    """sum of what was sent + the final residual == sum of the inputs."""
    rng = np.random.default_rng(5)
    residual = np.zeros(2000, np.float32)
    sent = np.zeros(2000, np.float64)
    inputs = np.zeros(2000, np.float64)
    for t in range(30):
        update = vector(2000, seed=100 + t)
        inputs += update
        u = update + residual
        decoded = codec.roundtrip(u, [2000], rng)[1]
        residual = u - decoded
        sent += decoded
    np.testing.assert_allclose(sent + residual, inputs, rtol=0, atol=2e-4)


@pytest.mark.parametrize("ratio", [0.2, 0.45])
def test_eden_below_one_bit_contracts_under_error_feedback(ratio):
    """Error feedback needs ||C(x) - x|| < ||x||: without the 1 / ratio rescale the
    sub-bit EDEN decode contracts, and error feedback's residual stays bounded."""
    x = vector(8192, seed=7)
    plain = EDEN(bits=1, ratio=ratio)
    fed = EDEN(bits=1, ratio=ratio, error_feedback=True)
    rng = np.random.default_rng(1)
    unbiased = plain.roundtrip(x, [x.size], rng)[1]
    assert np.linalg.norm(unbiased - x) > np.linalg.norm(x)  # why it cannot be fed back
    contracted = fed.roundtrip(x, [x.size], rng)[1]
    # dropped: (1 - ratio) ||x||^2; kept, 1-bit: (pi/2 - 1) of theirs; some slack
    assert np.linalg.norm(contracted - x) < np.sqrt(1 - 0.35 * ratio) * np.linalg.norm(x)
    residual = np.zeros_like(x)
    for t in range(40):
        u = vector(8192, seed=200 + t) + residual
        residual = u - fed.roundtrip(u, [u.size], rng)[1]
    assert np.linalg.norm(residual) < 10 * np.linalg.norm(x)


def payload(codec, x, layout_arrays, seed=0):
    layout = Layout.of(layout_arrays, codec.min_size)
    compressed, raw = layout.split(x)
    encoded = codec.encode(compressed, layout.segments, np.random.default_rng(0), seed)
    return layout, encode_update(codec, layout, compressed, raw, encoded)


MODEL = [np.zeros((40, 50), np.float32), np.zeros(50, np.float32), np.zeros((30, 20), np.float32)]


def test_update_records_round_trip_with_small_arrays_raw():
    rng = np.random.default_rng(0)
    update = [rng.normal(size=a.shape).astype(np.float32) for a in MODEL]
    layout, rd = payload(TopK(ratio=0.5, min_size=100), update, MODEL)
    assert layout.large == (True, False, True)
    decoded = decode_update(TopK(ratio=0.5, min_size=100), layout, rd, 0)
    np.testing.assert_array_equal(decoded[1], update[1])  # the bias travels as it is
    assert [d.shape for d in decoded] == [a.shape for a in MODEL]


def corrupt(rd: RecordDict, name: str, value) -> RecordDict:
    codec_id, arrays, info = _frame.unpack(rd.array_records[PAYLOAD_RECORD]["frame"])
    if value is None:
        arrays.pop(name)
    else:
        arrays[name] = value
    return RecordDict({PAYLOAD_RECORD: {"frame": _frame.pack(codec_id, arrays, info)}})


def with_info(rd: RecordDict, **info) -> RecordDict:
    codec_id, arrays, old = _frame.unpack(rd.array_records[PAYLOAD_RECORD]["frame"])
    codec_id = info.pop("id", codec_id)
    frame = _frame.pack(codec_id, arrays, {**old, **info})
    return RecordDict({PAYLOAD_RECORD: {"frame": frame}})


def with_frame(rd: RecordDict, edit) -> RecordDict:
    frame = rd.array_records[PAYLOAD_RECORD]["frame"]
    return RecordDict({PAYLOAD_RECORD: {"frame": edit(frame.copy())}})


def set_byte(at: int, value: int):
    def edit(frame):
        frame[at] = value
        return frame

    return edit


CASES = [
    (TopK(ratio=0.1), lambda rd: corrupt(rd, "index", np.full(260, 255, np.uint8)), "out of range"),
    (TopK(ratio=0.1), lambda rd: corrupt(rd, "values", np.zeros(3, np.float32)), "values"),
    (TopK(ratio=0.1), lambda rd: corrupt(rd, "index", np.zeros(260, np.uint16)), "increasing"),
    (
        TopK(ratio=0.1),
        lambda rd: corrupt(rd, "values", np.full(260, np.nan, np.float32)),
        "NaN",
    ),
    (TopK(ratio=0.1), lambda rd: with_info(rd, index="rle"), "index coding"),
    (TopK(ratio=0.1), lambda rd: with_info(rd, id="sign"), "encoded with"),
    (TopK(ratio=0.9), lambda rd: corrupt(rd, "index", np.full(325, 255, np.uint8)), "selects"),
    (QSGD(bits=4), lambda rd: corrupt(rd, "scales", np.full(2, np.inf, np.float32)), "finite"),
    (QSGD(bits=4), lambda rd: corrupt(rd, "scales", np.full(2, -1, np.float32)), "finite"),
    (QSGD(bits=4), lambda rd: corrupt(rd, "levels", None), "expected payload arrays"),
    (QSGD(bits=4), lambda rd: corrupt(rd, "levels", np.zeros(7, np.uint8)), "levels"),
    (QSGD(bits=4), lambda rd: corrupt(rd, "levels", np.zeros(1300, np.uint16)), "uint8"),
    (Sign(), lambda rd: corrupt(rd, "signs", np.zeros(5, np.uint8)), "signs"),
    (EDEN(), lambda rd: corrupt(rd, "seed", np.zeros(2, np.uint64)), "seed"),
    (EDEN(ratio=0.5), lambda rd: corrupt(rd, "codes", np.zeros(3, np.uint8)), "need more"),
    (EDEN(ratio=0.5), lambda rd: corrupt(rd, "codes", np.zeros(999, np.uint8)), "take"),
    (FP16(), lambda rd: corrupt(rd, "values", np.full(2600, np.inf, np.float16)), "NaN"),
    (FP16(), lambda rd: corrupt(rd, "raw", np.zeros(3, np.float32)), "raw"),
    (FP16(), lambda rd: corrupt(rd, "raw", np.full(50, np.nan, np.float32)), "raw"),
    (FP16(), lambda rd: corrupt(rd, "extra", np.zeros(3, np.float32)), "expected payload"),
    (FP16(), lambda rd: RecordDict(), "carries the array record"),
    (FP16(), lambda rd: with_frame(rd, lambda f: f[:-8]), "past the end"),
    (FP16(), lambda rd: with_frame(rd, lambda f: f[:9]), "truncated"),
    (FP16(), lambda rd: with_frame(rd, lambda f: np.append(f, np.zeros(8, np.uint8))), "past"),
    (FP16(), lambda rd: with_frame(rd, set_byte(0, 7)), "version"),
    (FP16(), lambda rd: with_frame(rd, set_byte(2, 0xFF)), "not ASCII"),
    (FP16(), lambda rd: with_frame(rd, lambda f: f.view(np.int8)), "uint8"),
    (FP16(), lambda rd: with_frame(rd, lambda f: np.zeros(0, np.uint8)), "version"),
]


@pytest.mark.parametrize(("codec", "damage", "reason"), CASES)
def test_malformed_payloads_are_refused_with_a_reason(codec, damage, reason):
    rng = np.random.default_rng(0)
    update = [rng.normal(size=a.shape).astype(np.float32) for a in MODEL]
    layout, rd = payload(codec, update, MODEL)
    decode_update(codec, layout, rd, 0)  # the intact one decodes
    with pytest.raises(SerdeError, match=reason):
        decode_update(codec, layout, damage(rd), 0)


def test_bitmap_bits_beyond_the_size_are_refused():
    codec = TopK(ratio=0.9)
    x = vector(1001)
    (arrays, info), _ = codec.roundtrip(x, [1001], np.random.default_rng(0))
    assert info["index"] == "bitmap"
    bad = arrays["index"].copy()
    bad[-1] |= 0x80
    with pytest.raises(SerdeError, match="beyond"):
        codec.decode({**arrays, "index": bad}, info, [1001])


def test_task_records_round_trip_and_bad_ones_are_refused():
    record = task_record(QSGD(bits=3, block=64, error_feedback=True), 12, FP16())
    codec, seed, down = codec_from_task(record)
    assert codec == QSGD(bits=3, block=64, error_feedback=True) and seed == 12
    assert down == FP16()
    with pytest.raises(SerdeError, match="invalid codec"):
        codec_from_task({**record, "p.bits": 99})
    with pytest.raises(SerdeError, match="invalid codec"):
        codec_from_task({**record, "uplink": "zip"})
    with pytest.raises(SerdeError, match="seed"):
        codec_from_task({**record, "seed": "x"})


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="ratio"):
        TopK(ratio=0)
    with pytest.raises(ConfigError, match="bits"):
        QSGD(bits=0)
    with pytest.raises(ConfigError, match="power of two"):
        EDEN(block=1000)
    with pytest.raises(ConfigError, match="unknown"):
        codec_from_params("topk", {"ratio": 0.1, "levels": 3})


@pytest.mark.parametrize("codec", [FP16(), BF16(), QSGD(bits=8, block=64)], ids=repr)
def test_downlink_model_round_trip(codec):
    rng = np.random.default_rng(0)
    model = [rng.normal(size=(30, 40)).astype(np.float32), np.arange(5, dtype=np.float64)]
    records, decoded = encode_model(codec, model, np.random.default_rng(1))
    got = decode_model(codec, records)
    assert [g.dtype for g in got] == [np.float32, np.float64]
    for g, d, m in zip(got, decoded, model, strict=True):
        np.testing.assert_array_equal(g, d.astype(g.dtype))
        np.testing.assert_allclose(g, m, atol=0.05)


def test_compression_exports_are_pinned_and_reachable_from_the_top():
    import fedhive as fl
    import fedhive.compression

    assert sorted(fedhive.compression.__all__) == sorted(
        [
            "BF16",
            "CODECS",
            "EDEN",
            "FP16",
            "QSGD",
            "RESIDUAL_RECORD",
            "Codec",
            "Compression",
            "CompressionStage",
            "RandomK",
            "Sign",
            "TopK",
            "as_compression",
            "compression_mod",
            "with_compression_mod",
        ]
    )
    assert fl.compression.TopK(ratio=0.01, error_feedback=True).error_feedback
