"""The quantizers: QSGD, scaled sign, and EDEN (see :mod:`fedhive.compression.codecs`).

Each works chunk by chunk (:mod:`fedhive.compression._kernels`): a 100 MB update is read
once or twice and its temporaries stay in cache, instead of a full-size float64 or
float32 temporary per operation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import NDArray, Scalar
from fedhive.compression import _bits
from fedhive.compression._base import (
    Codec,
    Encoded,
    _check_bits,
    _check_block,
    _check_ratio,
    _expect,
    _finite_scales,
    _starts,
)
from fedhive.compression._kernels import (
    CHUNK,
    Blocks,
    block_reduce,
    cells_into,
    chunks,
    flip_by_words,
    flip_signs,
    hadamard_into,
    qsgd_round,
    scale_into,
    sign_words,
)

__all__ = ["EDEN", "QSGD", "Sign", "gaussian_centroids"]


def _blocks(size: int, segments: Sequence[int], block: int | None) -> Blocks:
    return Blocks(_starts(size, segments, block), size, block)


def _flat32(x: NDArray) -> NDArray:
    return np.ascontiguousarray(x, np.float32).reshape(-1)


def _packed(data: NDArray, width: int, lo: int, hi: int) -> NDArray:
    """The bytes of values ``[lo, hi)`` in ``data`` packed ``width`` bits each (``lo``
    a multiple of 8)."""
    return data[lo * width // 8 : _bits.packed_nbytes(hi, width)]


# -- stochastic quantization -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QSGD(Codec):
    """Stochastic uniform quantization, unbiased (Alistarh, Grubic, Li, Tomioka, Vojnovic.
    "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding." NeurIPS
    2017), with the max-norm scale: ``|x_i| / scale`` is rounded up or down at random to
    one of ``2**bits - 1`` levels so that its expectation is exact (16 random bits per
    element: exact to ``2**-17`` of a level). ``bits`` of level plus a sign bit per
    element (``b + 1`` bits), and one float32 scale per array (``block`` None) or per
    ``block`` elements.

    ``scale`` (a number) fixes one scale shared by every client and round instead: values
    are clipped to ``[-scale, scale]`` (unbiased only inside it) and no scale travels; the
    encodings are then integers on one grid, so their sum is the encoding of the sum and
    secure aggregation can add them.
    """

    bits: int = 4
    block: int | None = None
    scale: float | None = None

    id: ClassVar[str] = "qsgd"
    unbiased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits(self.bits, 1, 15)
        _check_block(self.block)
        if self.scale is not None and (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not math.isfinite(self.scale)
            or self.scale <= 0
        ):
            raise ConfigError(f"scale must be None or a finite number > 0, got {self.scale!r}")

    @property
    def secagg_reason(self) -> str:
        if self.scale is not None:
            return ""
        return (
            "qsgd with a per-client scale: the masked sum of encodings is not the encoding "
            "of the sum; give QSGD(scale=...) a shared scale to use it with secure aggregation"
        )

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _layout(self, size: int, segments: Sequence[int]) -> Blocks:
        if self.scale is not None:
            return Blocks(np.zeros(1, np.int64), size)
        return _blocks(size, segments, self.block)

    def _quantize(
        self, x: NDArray, blocks: Blocks, rng: np.random.Generator
    ) -> tuple[NDArray, Iterator[tuple[int, int, NDArray, NDArray]]]:
        """The scales, and per chunk ``(lo, hi, level magnitudes, negative)``."""
        step = min(blocks.step(), max(x.size, 1))
        buf = np.empty(step, np.float32)
        if self.scale is not None:
            scales = np.full(1, self.scale, np.float32)
        else:
            scales = block_reduce(x, blocks, np.maximum, buf).astype(np.float32)
            if not np.isfinite(scales).all():
                raise SerdeError("qsgd: the update holds NaN or Inf")
        inv = np.divide(
            np.float32(self.levels), scales, out=np.zeros_like(scales), where=scales > 0
        )

        def levels() -> Iterator[tuple[int, int, NDArray, NDArray]]:
            scratch = np.empty((2, step), np.float32)
            level = np.empty(step, np.uint8 if self.bits <= 8 else np.uint16)
            negative = np.empty(step, np.bool_)
            cap = np.inf if self.scale is None else float(self.scale)
            for lo, hi in chunks(x.size, step):
                m = hi - lo
                nan = qsgd_round(x[lo:hi], inv, blocks, lo, rng.bit_generator, self.levels,
                                 cap, level[:m], negative[:m], scratch)  # fmt: skip
                if nan:
                    raise SerdeError("qsgd: the update holds NaN")
                yield lo, hi, level[:m], negative[:m]

        return scales, levels()

    def integer_levels(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator
    ) -> tuple[NDArray, NDArray, NDArray]:
        """Signed levels in ``[-(2**bits - 1), 2**bits - 1]`` (int16), scales, block starts."""
        x = _flat32(x)
        blocks = self._layout(x.size, segments)
        scales, parts = self._quantize(x, blocks, rng)
        out = np.empty(x.size, np.int16)
        for lo, hi, level, negative in parts:
            part = out[lo:hi]
            part[...] = level
            np.negative(part, out=part, where=negative)
        return out, scales, blocks.starts

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        x = _flat32(x)
        blocks = self._layout(x.size, segments)
        levels = np.empty(_bits.packed_nbytes(x.size, self.bits), np.uint8)
        signs = np.empty(_bits.packed_nbytes(x.size, 1), np.uint8)
        scales, parts = self._quantize(x, blocks, rng)
        for lo, hi, level, negative in parts:
            _packed(levels, self.bits, lo, hi)[...] = _bits.pack(level, self.bits)
            _packed(signs, 1, lo, hi)[...] = np.packbits(negative, bitorder="little")
        out = {"levels": levels, "signs": signs}
        if self.scale is None:
            out["scales"] = scales
        return out, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        blocks = self._layout(size, segments)
        spec: dict[str, tuple[str, int | None]] = {
            "levels": ("uint8", _bits.packed_nbytes(size, self.bits)),
            "signs": ("uint8", _bits.packed_nbytes(size, 1)),
        }
        if self.scale is None:
            spec["scales"] = ("float32", len(blocks))
        _expect(arrays, spec)
        scales = (
            _finite_scales(arrays["scales"])
            if self.scale is None
            else np.full(1, self.scale, np.float32)
        )
        steps = (scales / np.float32(self.levels)).astype(np.float32)
        out = np.empty(size, np.float32)
        mask = np.empty(min(blocks.step(), max(size, 1)), np.uint32)
        for lo, hi in chunks(size, blocks.step()):
            part = out[lo:hi]
            part[...] = _bits.unpack(
                _packed(arrays["levels"], self.bits, lo, hi), self.bits, hi - lo
            )
            scale_into(part, steps, blocks, lo)
            negative = _bits.unpack(_packed(arrays["signs"], 1, lo, hi), 1, hi - lo)
            flip_signs(part, negative, mask)
        return out


# -- 1-bit and rotation -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sign(Codec):
    """One sign bit per element times a scale, the mean magnitude of its array (``block``
    None) or block: scaled signSGD (Bernstein, Wang, Azizzadenesheli, Anandkumar.
    "signSGD." ICML 2018) as EF-signSGD uses it (Karimireddy, Rebjock, Stich, Jaggi.
    "Error Feedback Fixes SignSGD and other Gradient Compression Schemes." ICML 2019).
    Biased: use it with error feedback."""

    block: int | None = None

    id: ClassVar[str] = "sign"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_block(self.block)

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        x = _flat32(x)
        if x.size == 0:
            return {"signs": np.zeros(0, np.uint8), "scales": np.zeros(0, np.float32)}, {}
        blocks = _blocks(x.size, segments, self.block)
        step = min(blocks.step(), x.size)
        sums = block_reduce(x, blocks, np.add, np.empty(step, np.float32))
        lengths = np.diff(np.append(blocks.starts, x.size))
        signs = np.empty(_bits.packed_nbytes(x.size, 1), np.uint8)
        negative = np.empty(step, np.bool_)
        for lo, hi in chunks(x.size, step):
            part = np.less(x[lo:hi], 0, out=negative[: hi - lo])
            _packed(signs, 1, lo, hi)[...] = np.packbits(part, bitorder="little")
        return {"signs": signs, "scales": (sums / lengths).astype(np.float32)}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        blocks = _blocks(size, segments, self.block)
        _expect(
            arrays,
            {"signs": ("uint8", _bits.packed_nbytes(size, 1)), "scales": ("float32", len(blocks))},
        )
        scales = _finite_scales(arrays["scales"])
        out = np.empty(size, np.float32)
        mask = np.empty(min(blocks.step(), max(size, 1)), np.uint32)
        for lo, hi in chunks(size, blocks.step()):
            part = out[lo:hi]
            part.fill(1.0)
            scale_into(part, scales, blocks, lo)
            flip_signs(part, _bits.unpack(_packed(arrays["signs"], 1, lo, hi), 1, hi - lo), mask)
        return out


@lru_cache(maxsize=16)
def gaussian_centroids(bits: int) -> tuple[NDArray, NDArray]:
    """Lloyd-Max quantizer of N(0, 1) with ``2**bits`` levels: (centroids, boundaries)."""
    n = 1 << bits

    def pdf(t: float) -> float:
        return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)

    def cdf(t: float) -> float:
        return 0.5 * (1 + math.erf(t / math.sqrt(2)))

    c = [(-3 + 6 * (i + 0.5) / n) for i in range(n)]
    for _ in range(300):
        edges = [-math.inf, *[(a + b) / 2 for a, b in itertools.pairwise(c)], math.inf]
        new = []
        for lo, hi in itertools.pairwise(edges):
            mass = cdf(hi) - cdf(lo)
            plo = 0.0 if lo == -math.inf else pdf(lo)
            phi = 0.0 if hi == math.inf else pdf(hi)
            new.append((plo - phi) / mass if mass > 0 else (lo + hi) / 2)
        c = new
    boundaries = [(a + b) / 2 for a, b in itertools.pairwise(c)]
    return np.asarray(c, np.float32), np.asarray(boundaries, np.float32)


def _unit(dims: NDArray | float, norms2: NDArray) -> NDArray:
    """``sqrt(dims) / norm`` per block (float64; 0 where the norm is 0)."""
    norms = np.sqrt(norms2)
    return np.divide(np.sqrt(dims), norms, out=np.zeros_like(norms), where=norms > 0)


def _rowdots(a: NDArray, b: NDArray) -> NDArray:
    """The dot product of each row of ``a`` with the same row of ``b`` (2-D float32),
    float64: one stacked BLAS product, faster than ``einsum`` (float32 accumulation)."""
    return np.matmul(a[:, None, :], b[:, :, None]).reshape(-1).astype(np.float64)


@lru_cache(maxsize=16)
def _centroid_table(bits: int) -> NDArray:
    """:func:`gaussian_centroids` of each code packed in a byte (``_bits.byte_table``)."""
    return _bits.byte_table(gaussian_centroids(bits)[0], bits)


def _cells(v: NDArray, boundaries: NDArray, out: NDArray, flag: NDArray, buf: NDArray) -> NDArray:
    """The index of each value of the flat ``v`` among the sorted ``boundaries`` (uint8,
    into ``out``): the count of boundaries below it.

    The boundaries are symmetric about 0 (an odd count, the middle one 0). Up to three are
    compared one by one; beyond, ``|v|`` is compared with the positive half only, and a
    value in magnitude cell ``m`` gets ``half + m`` (positive) or ``half - 1 - m`` (not),
    computed as ``half + (m XOR (positive - 1))`` in uint8. A value exactly on a boundary
    may go to either side (the scale is computed from the codes sent, so the decode stays
    unbiased either way).
    """
    out.fill(0)
    if boundaries.size <= 3:
        for edge in boundaries:
            np.greater(v, edge, out=flag)
            out += flag.view(np.uint8)
        return out
    half = (boundaries.size + 1) // 2
    a = np.abs(v, out=buf)
    for edge in boundaries[half:]:
        np.greater(a, edge, out=flag)
        out += flag.view(np.uint8)
    positive = np.greater(v, 0, out=flag).view(np.uint8)
    positive -= np.uint8(1)  # 0 where positive, 255 where not
    out ^= positive
    out += np.uint8(half)
    return out


@dataclass(frozen=True, kw_only=True)
class EDEN(Codec):
    """DRIVE/EDEN: a random Hadamard rotation, then ``bits`` per coordinate, with the scale
    that makes decoding unbiased (Vargaftik, Ben-Basat, Portnoy, Mendelson, Ben-Itzhak,
    Mitzenmacher. "DRIVE: One-bit Distributed Mean Estimation." NeurIPS 2021; "EDEN:
    Communication-Efficient and Robust Distributed Mean Estimation for Federated
    Learning." ICML 2022).

    The update is cut into blocks of ``block`` (a power of two; the last one zero-padded),
    each rotated by ``H D / sqrt(block)`` with random signs ``D`` drawn from a seed that
    travels (8 bytes). Rotated coordinates are near N(0, ||x||^2 / block); each goes to
    the nearest of the ``2**bits`` Lloyd-Max centroids of that Gaussian, and the block's
    scale ``||x||^2 / <Rx, c>`` makes the decode unbiased over the rotation (with
    ``bits=1`` this is DRIVE's ``||x||^2 / ||Rx||_1`` times the sign).

    ``ratio`` below 1 is EDEN's regime of fewer than one bit per coordinate: after the
    rotation each coordinate is kept with probability ``ratio`` (drawn from the seed, so
    the decoder knows which, and nothing about them travels), the block's scale is taken
    over the kept ones, and the decoder divides by ``ratio``; ``bits * ratio`` bits per
    coordinate. With ``error_feedback`` the decoder does not divide: error feedback needs
    a contraction, ``||C(x) - x|| < ||x||`` (Stich, Cordonnier, Jaggi. "Sparsified SGD
    with Memory." NeurIPS 2018), and the unbiased estimate's error exceeds ``||x||``
    below about half a bit (its variance grows as ``1 / ratio``), so its residual would
    grow round after round; without the division the dropped coordinates are simply
    left for the residual, as top-k leaves them.
    """

    bits: int = 1
    block: int = 1 << 12
    ratio: float = 1.0

    id: ClassVar[str] = "eden"
    unbiased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits(self.bits, 1, 8)
        _check_block(self.block, power_of_two=True)
        _check_ratio(self.ratio)

    @property
    def _threshold(self) -> int:
        """Keep a coordinate when its 16-bit draw is below this (ratio < 1)."""
        return max(1, round(self.ratio * 65536))

    def _keep(self, bitgen: np.random.BitGenerator, m: int) -> NDArray:
        words = np.asarray(bitgen.random_raw(-(-m // 4)), "<u8")
        return words.view(np.uint16)[:m] < self._threshold

    def _step(self) -> int:
        """Elements per chunk: whole blocks, a multiple of 64 (whole sign draws)."""
        return max(1, CHUNK // self.block) * self.block

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        x = _flat32(x)
        own = int(rng.integers(0, 2**63))
        bitgen = np.random.PCG64(own)
        count = -(-x.size // self.block)
        padded = count * self.block
        step = min(self._step(), padded) if padded else 1
        centroids, boundaries = gaussian_centroids(self.bits)
        sparse = self.ratio < 1
        codes = np.empty(0 if sparse else _bits.packed_nbytes(padded, self.bits), np.uint8)
        parts: list[NDArray] = []
        scales = np.empty(count, np.float32)
        src, rot, tmp = (np.empty(step, np.float32) for _ in range(3))
        mask, code = np.empty(step, np.uint32), np.empty(step, np.uint8)
        flag = np.empty(step, np.bool_)
        for lo, hi in chunks(padded, step):
            m, have = hi - lo, max(0, min(hi, x.size) - lo)
            s, r, signs = src[:m], rot[:m], sign_words(bitgen, m)
            if have == m:  # read straight from x, flipping signs on the way
                flip_by_words(x[lo:hi], signs, mask, out=s)
            else:
                s[:have] = x[lo : lo + have]
                s[have:] = 0.0
                flip_by_words(s, signs, mask)
            blocks = s.reshape(-1, self.block)
            unit = None  # per block: sqrt(dims) / ||Rx||, the centroids' unit
            if self.bits > 1 and not sparse:  # rotate straight to that unit: ||Rx|| = ||x||
                norms2 = _rowdots(blocks, blocks)
                unit = _unit(self.block, norms2)
                hadamard_into(s, self.block, r, tmp, unit.astype(np.float32))
            else:
                hadamard_into(s, self.block, r, tmp)
            grid = r.reshape(blocks.shape)
            if sparse:  # dropped coordinates count for nothing below
                keep = self._keep(bitgen, m)
                r *= keep
                kept = keep.reshape(grid.shape).sum(axis=1)
            if unit is None:
                norms2 = _rowdots(grid, grid)
            if self.bits == 1:  # boundary 0, centroids -c and c: <Rx, c> = c * ||Rx||_1
                c = np.greater(r, 0, out=flag[:m])
                l1 = np.abs(grid, out=tmp[:m].reshape(grid.shape)).sum(axis=1)  # pairwise, f32
                dots = float(centroids[1]) * l1.astype(np.float64)
                scale = np.divide(norms2, dots, out=np.zeros_like(norms2), where=dots > 0)
            else:  # v = unit * Rx: its cells, then <Rx, c> = <v, c> / unit
                scratch = tmp if unit is not None else s
                if unit is None:  # the kept coordinates' norm
                    unit = _unit(kept, norms2)
                    v = np.multiply(
                        grid, unit.astype(np.float32)[:, None], out=tmp[:m].reshape(grid.shape)
                    )
                else:
                    v = r
                chosen: NDArray | None = None  # compiled: each one's centroid too
                if cells_into(v.reshape(-1), boundaries, centroids, code[:m], scratch[:m]):
                    c, chosen = code[:m], scratch[:m]
                else:
                    c = _cells(v.reshape(-1), boundaries, code[:m], flag[:m], scratch[:m])
            if sparse:
                parts.append(_bits.pack(c[keep], self.bits))
            else:
                packed = _packed(codes, self.bits, lo, hi)
                packed[...] = _bits.pack(c, self.bits)
            if self.bits > 1:
                if chosen is None:  # numpy: from the packed bytes where whole, else gathered
                    if not sparse and self.bits in _bits.BYTE_WIDTHS and m % 8 == 0:
                        chosen = _bits.lookup(packed, _centroid_table(self.bits), scratch[:m])
                    else:
                        chosen = np.take(centroids, c, out=scratch[:m], mode="wrap")
                dots = _rowdots(v.reshape(grid.shape), chosen.reshape(grid.shape))
                scale = np.divide(norms2 * unit, dots, out=np.zeros_like(norms2), where=dots > 0)
            b0 = lo // self.block
            scales[b0 : b0 + grid.shape[0]] = scale
        if sparse:
            codes = np.concatenate(parts) if parts else codes
        return {"codes": codes, "scales": scales, "seed": np.asarray([own], np.uint64)}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        count = -(-size // self.block)
        padded = count * self.block
        sparse = self.ratio < 1
        _expect(
            arrays,
            {
                "codes": ("uint8", None if sparse else _bits.packed_nbytes(padded, self.bits)),
                "scales": ("float32", count),
                "seed": ("uint64", 1),
            },
        )
        if sparse:
            return self._decode_sparse(arrays, size, count)
        scales = _finite_scales(arrays["scales"])
        bitgen = np.random.PCG64(int(arrays["seed"][0]))
        centroids, _ = gaussian_centroids(self.bits)
        out = np.empty(size, np.float32)
        step = min(self._step(), padded) if padded else 1
        grid_buf, rot, tmp = (np.empty(step, np.float32) for _ in range(3))
        mask = np.empty(step, np.uint32)
        for lo, hi in chunks(padded, step):
            m = hi - lo
            packed = _packed(arrays["codes"], self.bits, lo, hi)
            if self.bits in _bits.BYTE_WIDTHS and m % 8 == 0:  # unpack and look up at once
                g = _bits.lookup(packed, _centroid_table(self.bits), grid_buf[:m])
            else:
                c = _bits.unpack(packed, self.bits, m)
                g = np.take(centroids, c, out=grid_buf[:m], mode="wrap")
            b0 = lo // self.block
            r = rot[:m]  # H is its own inverse; the blocks' scales ride on its last product
            hadamard_into(g, self.block, r, tmp, scales[b0 : b0 + m // self.block])
            have = max(0, min(hi, size) - lo)
            flip_by_words(r[:have], sign_words(bitgen, m), mask, out=out[lo : lo + have])
        return out

    def _decode_sparse(self, arrays: Mapping[str, NDArray], size: int, count: int) -> NDArray:
        """:meth:`decode` with ``ratio < 1``: the kept coordinates' codes, chunk by chunk
        (each chunk's packed codes start on a byte)."""
        scales = _finite_scales(arrays["scales"])
        if not self.error_feedback:  # unbiased: the kept coordinates stand for all
            scales = scales / np.float32(self._threshold / 65536)
        bitgen = np.random.PCG64(int(arrays["seed"][0]))
        centroids, _ = gaussian_centroids(self.bits)
        packed = arrays["codes"]
        out = np.empty(size, np.float32)
        padded = count * self.block
        step = min(self._step(), padded) if padded else 1
        grid_buf, rot, tmp = (np.empty(step, np.float32) for _ in range(3))
        mask = np.empty(step, np.uint32)
        at = 0
        for lo, hi in chunks(padded, step):
            m = hi - lo
            signs = sign_words(bitgen, m)  # the encoder's order: signs, then the kept mask
            keep = self._keep(bitgen, m)
            kept = int(np.count_nonzero(keep))
            nbytes = _bits.packed_nbytes(kept, self.bits)
            if at + nbytes > packed.size:
                raise SerdeError(f"eden codes: {packed.size} bytes, the kept coordinates need more")
            c = _bits.unpack(packed[at : at + nbytes], self.bits, kept)
            at += nbytes
            g = grid_buf[:m]
            g.fill(0.0)
            g[keep] = np.take(centroids, c)
            grid = g.reshape(-1, self.block)
            b0 = lo // self.block
            r = rot[:m]
            hadamard_into(g, self.block, r, tmp, scales[b0 : b0 + grid.shape[0]])
            have = max(0, min(hi, size) - lo)
            flip_by_words(r[:have], signs, mask, out=out[lo : lo + have])
        if at != packed.size:
            raise SerdeError(f"eden codes: {packed.size} bytes, the kept coordinates take {at}")
        return out
