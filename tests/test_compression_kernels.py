"""The chunked kernels behind the quantizers agree with plain whole-array arithmetic,
across chunk boundaries, blocks straddling chunks and odd sizes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedhive.common.errors import SerdeError
from fedhive.compression import EDEN, FP16, QSGD, Sign, _bits, _kernels
from fedhive.compression._kernels import CHUNK, Blocks, block_reduce, hadamard_into

PATHS = ["numpy", "compiled"] if _kernels.compiled() else ["numpy"]


@pytest.fixture(params=PATHS)
def kernels(request, monkeypatch):
    """Run the test on the numpy kernels, and again on the compiled ones where built."""
    if request.param == "numpy":
        monkeypatch.setattr(_kernels, "_compiled", None)
    return request.param


def walsh_hadamard(rows):
    """Each row times the Sylvester Hadamard matrix over sqrt(n), by butterflies, float64."""
    out = np.asarray(rows, np.float64)
    n, size = out.shape
    h = 1
    while h < size:
        pairs = out.reshape(n, -1, 2, h)
        out = np.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], 2)
        h *= 2
    return out.reshape(n, size) / np.sqrt(size)


def test_the_reference_is_the_sylvester_matrix():
    h = np.ones((1, 1))
    while h.shape[0] < 16:
        h = np.block([[h, h], [h, -h]])
    np.testing.assert_allclose(walsh_hadamard(np.eye(16)), h / 4, atol=1e-12)


@pytest.mark.parametrize("block", [2, 8, 32, 256, 1024, 4096])
def test_the_factored_hadamard_is_the_matrix(block, kernels):
    x = np.random.default_rng(block).normal(size=3 * block).astype(np.float32)
    out, tmp = np.empty_like(x), np.empty_like(x)
    before = x.copy()
    hadamard_into(x, block, out, tmp)
    want = walsh_hadamard(x.reshape(-1, block))
    np.testing.assert_allclose(out.reshape(-1, block), want, atol=2e-5)
    np.testing.assert_array_equal(x, before)  # the source is left as it was


@pytest.mark.parametrize(("block", "count"), [(16, 256), (16, 255), (4096, 1), (64, 3)])
def test_the_first_pass_stacked_or_not_is_the_matrix(block, count, kernels):
    # rows of 16 are multiplied in stacks of 256 where they divide evenly, else in one
    # product: both shapes (with and without a scale) give the Walsh-Hadamard transform
    x = np.random.default_rng(count).normal(size=count * block).astype(np.float32)
    scale = np.random.default_rng(1).uniform(0.5, 2.0, size=count).astype(np.float32)
    out, tmp = np.empty_like(x), np.empty_like(x)
    want = walsh_hadamard(x.reshape(-1, block))
    hadamard_into(x, block, out, tmp)
    np.testing.assert_allclose(out.reshape(-1, block), want, atol=2e-5)
    hadamard_into(x, block, out, tmp, scale)
    np.testing.assert_allclose(out.reshape(-1, block), want * scale[:, None], atol=2e-5)


@pytest.mark.parametrize("block", [2, 16, 256, 4096])
def test_the_hadamard_scales_each_block(block, kernels):
    x = np.random.default_rng(block).normal(size=5 * block).astype(np.float32)
    scale = np.array([0.5, 0.0, 3.0, -1.0, 1e-3], np.float32)
    out, tmp = np.empty_like(x), np.empty_like(x)
    hadamard_into(x, block, out, tmp, scale)
    want = walsh_hadamard(x.reshape(-1, block)) * scale[:, None]
    np.testing.assert_allclose(out.reshape(-1, block), want, atol=2e-5)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_lookup_of_packed_bytes_is_unpack_then_index(width):
    values = np.random.default_rng(width).normal(size=1 << width).astype(np.float32)
    codes = np.random.default_rng(0).integers(0, 1 << width, 8 * 1000).astype(np.uint8)
    packed = _bits.pack(codes, width)
    out = np.empty(codes.size, np.float32)
    got = _bits.lookup(packed, _bits.byte_table(values, width), out)
    np.testing.assert_array_equal(got, values[_bits.unpack(packed, width, codes.size)])
    np.testing.assert_array_equal(got, values[codes])


def test_byte_table_refuses_other_widths():
    with pytest.raises(SerdeError, match="width"):
        _bits.byte_table(np.zeros(8, np.float32), 3)
    with pytest.raises(SerdeError, match="2\\*\\*width"):
        _bits.byte_table(np.zeros(8, np.float32), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_cells_count_the_boundaries_below(bits, kernels):
    """The symmetric shortcut gives each value the count of boundaries below it."""
    from fedhive.compression.quantizers import _cells, gaussian_centroids

    centroids, boundaries = gaussian_centroids(bits)
    v = np.random.default_rng(bits).normal(scale=1.5, size=50_000).astype(np.float32)
    v[:3] = [0.0, -0.0, 40.0]
    out, flag, buf = np.empty(v.size, np.uint8), np.empty(v.size, np.bool_), np.empty_like(v)
    if kernels == "compiled":  # the cells and each one's centroid in one pass
        assert _kernels.cells_into(v, boundaries, centroids, out, buf)
        got = out
        np.testing.assert_array_equal(buf, centroids[got])
    else:
        assert not _kernels.cells_into(v, boundaries, centroids, out, buf)
        got = _cells(v, boundaries, out, flag, buf)
    want = np.searchsorted(boundaries.astype(np.float64), v.astype(np.float64))
    assert (got != want).mean() < 1e-4  # only at a boundary (float32 asymmetry)
    assert got.max() <= boundaries.size


@pytest.mark.parametrize("op", [np.add, np.maximum])
def test_block_reduce_across_chunks(op):
    size = 3 * CHUNK + 12_345
    x = np.random.default_rng(0).normal(size=size).astype(np.float32)
    starts = np.array([0, 5, CHUNK - 3, CHUNK + 100, 2 * CHUNK + 7, size - 1])
    got = block_reduce(x, Blocks(starts, size), op, np.empty(CHUNK, np.float32))
    want = op.reduceat(np.abs(x).astype(np.float64), starts)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fp16_decodes_bit_for_bit_as_numpy_casts():
    rng = np.random.default_rng(0)
    parts = [rng.normal(scale=s, size=CHUNK + 77) for s in (1e-7, 1e-5, 1e-2, 1.0, 3e4)]
    x = np.concatenate([*parts, [0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1e9, -1e9]])
    x = x.astype(np.float32)
    codec = FP16()
    (arrays, info), decoded = codec.roundtrip(x, [x.size], rng)
    want = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(decoded.view(np.uint32), want.view(np.uint32))
    for bad in (np.inf, -np.inf, np.nan):
        values = arrays["values"].copy()
        values[CHUNK + 5] = bad
        with pytest.raises(SerdeError, match="NaN or Inf"):
            codec.decode({"values": values}, info, [x.size])


def test_half_bits_are_numpys_cast_bit_for_bit():
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**32, size=1 << 21, dtype=np.uint64).astype(np.uint32)
    x = words.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= 65504)]  # every exponent, both signs
    ties = np.arange(1 << 11, dtype=np.uint32) << 12 | np.uint32(0x1000)  # half-way cases
    edges = [0.0, -0.0, 65504.0, -65504.0, 65519.99, 2**-14, 2**-24, 2**-25, 1.5 * 2**-24]
    x = np.concatenate(
        [x, *((ties + np.uint32(e << 23)).view(np.float32) for e in (0, 112, 127, 141)), edges]
    ).astype(np.float32)
    out = np.empty(x.size, np.uint16)
    scratch, flag = np.empty((3, x.size), np.uint32), np.empty(x.size, np.bool_)
    _kernels.half_bits(x, out, scratch, flag)
    np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))


def test_fp16_encode_keeps_nan_for_decode_to_refuse_and_clips_the_rest():
    x = np.full(CHUNK + 10, 0.25, np.float32)
    x[3], x[CHUNK + 4] = 1e6, np.nan
    arrays, info = FP16().encode(x, [x.size], np.random.default_rng(0))
    values = arrays["values"]
    assert values[3] == 65504 and values[4] == 0.25 and np.isnan(values[CHUNK + 4])
    with pytest.raises(SerdeError, match="NaN or Inf"):
        FP16().decode(arrays, info, [x.size])


def test_qsgd_across_chunks_and_blocks_stays_within_one_level(kernels):
    size = 2 * CHUNK + 999
    x = np.random.default_rng(1).normal(size=size).astype(np.float32)
    segments = [CHUNK + 1, 17, size - CHUNK - 18]
    for codec in (QSGD(bits=4), QSGD(bits=2, block=1000), QSGD(bits=5, block=4096)):
        (arrays, _), decoded = codec.roundtrip(x, segments, np.random.default_rng(2))
        starts = (
            np.cumsum([0, *segments[:-1]])
            if codec.block is None
            else np.arange(0, size, codec.block)
        )
        scales = np.maximum.reduceat(np.abs(x), starts)
        np.testing.assert_array_equal(arrays["scales"], scales)
        step = np.repeat(scales / codec.levels, np.diff(np.append(starts, size)))
        assert (np.abs(decoded - x) <= step * (1 + 1e-5)).all()
        assert (np.sign(decoded)[decoded != 0] == np.sign(x)[decoded != 0]).all()


def test_qsgd_refuses_an_update_with_nan(kernels):
    x = np.ones(1000, np.float32)
    x[3] = np.nan
    for codec in (QSGD(bits=4), QSGD(bits=4, scale=1.0)):
        with pytest.raises(SerdeError, match="NaN"):
            codec.encode(x, [1000], np.random.default_rng(0))


def test_sign_scales_are_each_arrays_mean_magnitude_across_chunks():
    size = 2 * CHUNK + 5
    x = np.random.default_rng(3).normal(size=size).astype(np.float32)
    segments = [10, CHUNK + 3, size - CHUNK - 13]
    (arrays, _), decoded = Sign().roundtrip(x, segments, np.random.default_rng(0))
    starts = np.cumsum([0, *segments[:-1]])
    want = np.add.reduceat(np.abs(x).astype(np.float64), starts) / segments
    np.testing.assert_allclose(arrays["scales"], want, rtol=1e-6)
    np.testing.assert_allclose(np.abs(decoded), np.repeat(want, segments), rtol=1e-6)
    assert (np.signbit(decoded) == (x < 0)).all()


@pytest.mark.parametrize(
    ("bits", "block", "size"),
    [
        (1, 1024, CHUNK + 3 * 1024 + 100),  # several chunks, the last block zero-padded
        (2, 1024, CHUNK + 3 * 1024 + 100),
        (3, 1024, CHUNK + 3 * 1024 + 100),  # codes straddle bytes: unpack and gather
        (4, 1024, CHUNK + 3 * 1024 + 100),
        (8, 256, CHUNK + 300),
        (2, 4, CHUNK + 11),  # the last chunk is 4 values: not whole bytes of lookups
        (4, 2, CHUNK + 3),
    ],
)
def test_eden_over_several_chunks_matches_the_direct_formula(bits, block, size, kernels):
    """Rotate with the explicit matrix and the same signs, quantize to the nearest
    centroid, scale by ||x||^2 / <Rx, c>: what the chunked encoder sends."""
    x = np.random.default_rng(4).normal(size=size).astype(np.float32)
    codec = EDEN(bits=bits, block=block)
    (arrays, _), decoded = codec.roundtrip(x, [size], np.random.default_rng(5))
    count = -(-size // block)
    padded = np.zeros(count * block)
    padded[:size] = x
    flips = _kernels.sign_bits(np.random.PCG64(int(arrays["seed"][0])), padded.size)
    rotated = walsh_hadamard(np.where(flips == 1, -padded, padded).reshape(count, block))
    from fedhive.compression.codecs import gaussian_centroids

    centroids, boundaries = gaussian_centroids(bits)
    unit = rotated * (np.sqrt(block) / np.linalg.norm(rotated, axis=1))[:, None]
    codes = np.searchsorted(boundaries.astype(np.float64), unit)
    got = _bits.unpack(arrays["codes"], bits, count * block).reshape(count, block)
    assert (got != codes).mean() < 1e-4  # float32 vs float64 at a boundary
    dots = (rotated * centroids[got]).sum(axis=1)
    np.testing.assert_allclose(arrays["scales"], (rotated**2).sum(axis=1) / dots, rtol=1e-4)
    assert decoded.shape == (size,)
    bound = {1: 0.8, 2: 0.5, 3: 0.3, 4: 0.15, 8: 0.02}[bits] * (1 if block > 16 else 2)
    assert np.linalg.norm(decoded - x) / np.linalg.norm(x) < bound


def test_row_dots_are_each_rows_dot_product():
    from fedhive.compression.quantizers import _rowdots

    rng = np.random.default_rng(3)
    a, b = (rng.normal(size=(5, 4096)).astype(np.float32) for _ in range(2))
    got = _rowdots(a, b)
    assert got.dtype == np.float64 and got.shape == (5,)
    want = (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal(300_001).astype(np.float32),
        # skewed: the strided sample sees only the small tail, so the fallback must run
        lambda rng: np.concatenate(
            [rng.standard_normal(1000).astype(np.float32) * 1e3, np.zeros(299_000, np.float32)]
        ),
        lambda rng: np.round(rng.standard_normal(300_000)).astype(np.float32),  # many ties
    ],
)
@pytest.mark.parametrize("k", [1, 3_000, 40_000, 299_000])
def test_largest_magnitudes_are_exactly_the_top_k(make, k: int) -> None:
    x = make(np.random.default_rng(k))
    top = _kernels.largest_magnitudes(x, k)
    assert top.size == k and np.all(np.diff(top) > 0)
    chosen = np.sort(np.abs(x[top]))
    want = np.sort(np.abs(x))[-k:]
    assert np.array_equal(chosen, want)  # the same magnitudes (ties may pick other indices)


def test_largest_magnitudes_keep_a_nan_as_argpartition_does() -> None:
    x = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    x[12_345] = np.nan
    assert 12_345 in _kernels.largest_magnitudes(x, 100)


def test_the_compiled_kernels_are_built_where_a_c_compiler_is():
    # setup.py builds them optionally: a failed build must not pass unnoticed here
    if shutil.which("cc") or shutil.which("gcc"):
        assert _kernels.compiled()


def _both_paths(monkeypatch, fn):
    """``fn()`` on the compiled kernels, then on the numpy ones."""
    compiled = fn()
    monkeypatch.setattr(_kernels, "_compiled", None)
    plain = fn()
    monkeypatch.undo()
    return compiled, plain


needs_compiled = pytest.mark.skipif(not _kernels.compiled(), reason="no compiled kernels")


@needs_compiled
@pytest.mark.parametrize(
    "codec",
    [
        QSGD(bits=4),
        QSGD(bits=2, block=1000),
        QSGD(bits=8, block=4096),
        QSGD(bits=12),
        QSGD(bits=4, scale=0.5),
    ],
)
def test_compiled_qsgd_sends_exactly_the_numpy_levels(codec, monkeypatch):
    size = 2 * CHUNK + 999
    x = np.random.default_rng(6).normal(scale=0.4, size=size).astype(np.float32)
    x[5], x[CHUNK + 9] = 3.0, -2.5  # beyond a shared scale: clipped
    if codec.scale is not None:
        x[7], x[8] = np.inf, -np.inf  # a shared scale caps infinities
    segments = [CHUNK + 1, 17, size - CHUNK - 18]

    def encode():
        return codec.encode(x, segments, np.random.default_rng(7))[0]

    compiled, plain = _both_paths(monkeypatch, encode)
    assert compiled.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(compiled[name], plain[name], err_msg=name)


@needs_compiled
def test_compiled_qsgd_refuses_nan_under_a_shared_scale():
    x = np.ones(CHUNK + 10, np.float32)
    x[CHUNK + 3] = np.nan
    with pytest.raises(SerdeError, match="NaN"):
        QSGD(bits=4, scale=1.0).encode(x, [x.size], np.random.default_rng(0))


@needs_compiled
@pytest.mark.parametrize("codec", [EDEN(bits=1), EDEN(bits=2, block=256), EDEN(bits=4, block=16),
                                   EDEN(bits=3, block=1024), EDEN(bits=1, ratio=0.7)])  # fmt: skip
def test_compiled_and_numpy_eden_decode_each_others_payloads(codec, monkeypatch):
    # the rotation's float rounding differs (butterflies against BLAS products), so codes
    # may differ where a rotated value sits on a boundary; decodes agree to rounding
    size = CHUNK + 5000
    x = np.random.default_rng(8).normal(size=size).astype(np.float32)

    def encode():
        return codec.encode(x, [size], np.random.default_rng(9))

    (a, info), (b, _) = _both_paths(monkeypatch, encode)
    assert a["seed"] == b["seed"]
    np.testing.assert_allclose(a["scales"], b["scales"], rtol=1e-3)
    decoded = {}
    for name, arrays in (("compiled", a), ("numpy", b)):
        decoded[name] = _both_paths(
            monkeypatch, lambda arrays=arrays: codec.decode(arrays, info, [size])
        )
        np.testing.assert_allclose(*decoded[name], rtol=1e-4, atol=1e-5)
    gap = np.linalg.norm(decoded["compiled"][0] - decoded["numpy"][1])
    assert gap / np.linalg.norm(decoded["numpy"][1]) < 1e-2


@needs_compiled
@pytest.mark.parametrize("size", [1, 63, 64, 65, CHUNK + 3])
def test_flip_by_words_flips_where_the_packed_bits_say(size, monkeypatch):
    x = np.random.default_rng(size).normal(size=size).astype(np.float32)
    words = _kernels.sign_words(np.random.PCG64(3), size)
    bits = _kernels.sign_bits(np.random.PCG64(3), size)
    want = np.where(bits == 1, -x, x)
    buf = np.empty(size, np.uint32)

    def flip():
        out = np.empty_like(x)
        _kernels.flip_by_words(x, words, buf, out=out)
        again = x.copy()
        _kernels.flip_by_words(again, words, buf)  # in place
        return out, again

    for out, again in _both_paths(monkeypatch, flip):
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(again, want)


@needs_compiled
def test_compiled_kernels_refuse_bad_buffers():
    from fedhive.compression import _ckernels as c

    x = np.zeros(64, np.float32)
    with pytest.raises(TypeError, match="float32"):
        c.fwht(np.zeros(64), 16)
    for bad in ((x, 8), (x, 48), (np.zeros(40, np.float32), 16)):
        with pytest.raises(ValueError, match="block"):
            c.fwht(*bad)
    with pytest.raises(ValueError, match="one value per block"):
        c.fwht(x, 16, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="words"):
        c.flip_signs(x, np.zeros(0, np.uint64), x)
    level, negative = np.empty(64, np.uint8), np.empty(64, np.uint8)
    raw, inv = np.zeros(64, np.uint16), np.ones(1, np.float32)
    with pytest.raises(ValueError, match="raw"):
        c.qsgd_levels(x, inv, np.zeros(1, np.int64), raw[:10], 15.0, np.inf, level, negative)
    with pytest.raises(ValueError, match="starts"):
        c.qsgd_levels(x, inv, np.ones(1, np.int64), raw, 15.0, np.inf, level, negative)
    with pytest.raises(ValueError, match="level"):
        c.qsgd_levels(x, inv, np.zeros(1, np.int64), raw, 15.0, np.inf, level[:5], negative)
    with pytest.raises(ValueError, match="centroids"):
        c.cells(x, np.ones(3, np.float32), np.ones(4, np.float32), level)
    with pytest.raises(ValueError, match="contiguous"):
        c.fwht(np.zeros(64, np.float32)[::2], 16)  # not contiguous
