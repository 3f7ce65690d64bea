"""Chunked numpy kernels behind the quantizers: each pass over a large update works on a
slice of :data:`CHUNK` elements, so its temporaries stay in the CPU cache and the update
is read from memory once (or twice, where a scale must be known first).

Scales belong to blocks (:class:`Blocks`: one per model array, or a fixed size); a chunk
may straddle several. Random draws come from ``bit_generator.random_raw`` in order,
chunk after chunk, so a chunked draw is the same stream as one bulk draw; seeded draws
use ``PCG64.random_raw``, whose stream numpy keeps stable across versions, so a client
and a server with different numpy versions draw the same signs and indices.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from functools import lru_cache
from types import ModuleType

import numpy as np

from fedhive.common.records import NDArray

_compiled: ModuleType | None
try:  # built with the package where a C compiler was found (setup.py); optional
    from fedhive.compression import _ckernels as _compiled
except ImportError:  # pragma: no cover - exercised where the build was skipped
    _compiled = None

__all__ = [
    "CHUNK",
    "Blocks",
    "block_reduce",
    "chunks",
    "bound",
    "cells_into",
    "compiled",
    "flip_by_words",
    "flip_signs",
    "hadamard_into",
    "half_bits",
    "largest_magnitudes",
    "negate_where",
    "qsgd_round",
    "raw16",
    "sample_indices",
    "scale_into",
    "sign_bits",
    "sign_words",
    "uniform16",
]

#: Elements per chunk: 256 KiB of float32, a few such temporaries fit a core's L2.
CHUNK = 1 << 16
_SIGN = np.uint32(0x80000000)
#: Rows per product in the Hadamard's first pass (OpenBLAS is about 3x slower on one
#: tall ``(n, 16) @ (16, 16)`` product than on a stack of ``(256, 16)`` ones).
_ROWS = 256


def compiled() -> bool:
    """Whether the compiled kernels (``fedhive.compression._ckernels``) are in use."""
    return _compiled is not None


def chunks(size: int, step: int = CHUNK) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` slices covering ``range(size)``, ``step`` elements each (the last
    shorter)."""
    for lo in range(0, size, step):
        yield lo, min(lo + step, size)


class Blocks:
    """Consecutive scale blocks over a vector of ``size`` elements, starting at
    ``starts`` (``starts[0] == 0``, increasing)."""

    __slots__ = ("_starts", "block", "size", "starts")

    def __init__(self, starts: NDArray, size: int, block: int | None = None) -> None:
        self.starts = np.asarray(starts, np.int64)
        self.size = size
        self.block = block  # fixed block length, when all blocks (but the last) have it
        # a Python list for bisect: per chunk, np.searchsorted's call costs more than the
        # search (a few model arrays)
        self._starts = self.starts.tolist() if block is None else []

    def __len__(self) -> int:
        return int(self.starts.size)

    def span(self, lo: int, hi: int) -> tuple[int, int, NDArray]:
        """The blocks ``[i0, i1)`` that overlap ``[lo, hi)``, and where each begins
        within that slice (the first at 0)."""
        if self.block is not None:
            i0, i1 = lo // self.block, -(-hi // self.block)
            local = np.arange(i0, i1, dtype=np.int64) * self.block - lo
        else:
            i0 = bisect.bisect_right(self._starts, lo) - 1
            i1 = bisect.bisect_left(self._starts, hi)
            local = self.starts[i0:i1] - lo
        local[0] = 0
        return i0, i1, local

    def step(self) -> int:
        """A chunk length: a multiple of 64 (whole bytes of packed bits) and, for fixed
        blocks shorter than a chunk, of the block (so a chunk holds whole blocks)."""
        if self.block is None or self.block >= CHUNK:
            return CHUNK
        whole = math.lcm(self.block, 64)
        return max(1, CHUNK // whole) * whole


def block_reduce(x: NDArray, blocks: Blocks, op: np.ufunc, buf: NDArray) -> NDArray:
    """``op`` (``np.add`` or ``np.maximum``) of ``|x|`` over each block, float64.

    Sums within a chunk run in float32 (pairwise where the chunk lies in one block),
    across chunks in float64.
    """
    out = np.zeros(len(blocks), np.float64)
    step = blocks.step()
    for lo, hi in chunks(x.size, step):
        t = np.abs(x[lo:hi], out=buf[: hi - lo])
        i0, i1, local = blocks.span(lo, hi)
        part = op.reduce(t) if i1 - i0 == 1 else op.reduceat(t, local)
        op(out[i0:i1], part, out=out[i0:i1])
    return out


def scale_into(t: NDArray, values: NDArray, blocks: Blocks, lo: int) -> None:
    """``t`` (the slice ``[lo, lo + t.size)``) times each block's value, in place."""
    hi = lo + t.size
    i0, i1, local = blocks.span(lo, hi)
    if i1 - i0 == 1:
        t *= values[i0]
    elif blocks.block is not None and lo % blocks.block == 0 and t.size % blocks.block == 0:
        t.reshape(-1, blocks.block)[...] *= values[i0:i1, None]
    else:
        t *= np.repeat(values[i0:i1], np.diff(np.append(local, t.size)))


@lru_cache(maxsize=16)
def _filled(value: float) -> NDArray:
    out = np.full(CHUNK, value, np.float32)
    out.setflags(write=False)
    return out


def bound(value: float, n: int) -> NDArray:
    """``value`` as a float32 array of ``n`` elements, for ``np.minimum`` against a
    chunk: numpy's loop for a scalar operand is about 5x slower than its loop over two
    arrays (0.3 against 0.06 ns an element here). Cached for chunks of :data:`CHUNK`."""
    return _filled(value)[:n] if n <= CHUNK else np.full(n, value, np.float32)


#: float32 bits: 2**-14 (the smallest normal half), and 0.5
_HALF_NORMAL = np.uint32(113 << 23)
_ONE_HALF = np.float32(0.5)
_ONE_HALF_BITS = np.uint32(0x3F000000)
#: (15 - 127) << 23 rebias the exponent (mod 2**32), plus 0xFFF: round half up below
_REBIAS = np.uint32(0xC8000FFF)


def half_bits(x: NDArray, out: NDArray, scratch: NDArray, flag: NDArray) -> NDArray:
    """The IEEE binary16 bits of the float32 ``x`` rounded to nearest even (exactly what
    ``x.astype(np.float16)`` gives), into the uint16 ``out``, for finite ``|x| <= 65504``
    only; ``scratch``: uint32 ``(3, >= x.size)``, ``flag``: bool ``(>= x.size,)``.

    numpy's own cast converts element by element (about 1.5 ns an element here); this is
    fourteen integer passes over a chunk in cache (about 0.9 ns). A normal half is the
    float32 word with its exponent rebiased and its mantissa rounded to 10 bits: add
    ``0xFFF`` plus the lowest kept bit and shift, so that a tie rounds to even. Below
    ``2**-14`` the half is subnormal, a multiple of ``2**-24``: adding 0.5 in float32
    rounds ``|x|`` to that grid (to nearest even, in hardware) and leaves the multiple in
    the word's low bits.
    """
    n = x.size
    w = x.view(np.uint32)
    a, t, d = scratch[0, :n], scratch[1, :n], scratch[2, :n]
    small = flag[:n]
    np.bitwise_and(w, np.uint32(0x7FFFFFFF), out=a)
    np.right_shift(a, np.uint32(13), out=t)
    np.bitwise_and(t, np.uint32(1), out=t)  # the lowest kept mantissa bit: ties to even
    t += a
    t += _REBIAS
    t >>= np.uint32(13)
    np.add(a.view(np.float32), _ONE_HALF, out=d.view(np.float32))
    d -= _ONE_HALF_BITS
    np.less(a, _HALF_NORMAL, out=small)
    np.copyto(t, d, where=small)
    np.right_shift(w, np.uint32(16), out=a)
    np.bitwise_and(a, np.uint32(0x8000), out=a)
    t |= a
    np.copyto(out, t, casting="unsafe")
    return out


def raw16(bitgen: np.random.BitGenerator, count: int) -> NDArray:
    """``count`` random 16-bit words (uint16), four from each raw draw."""
    words = np.asarray(bitgen.random_raw(-(-count // 4)), "<u8")
    return words.view(np.uint16)[:count]


def qsgd_round(
    t: NDArray,
    inv: NDArray,
    blocks: Blocks,
    lo: int,
    bitgen: np.random.BitGenerator,
    top: float,
    cap: float,
    level: NDArray,
    negative: NDArray,
    buf: NDArray,
) -> int:
    """QSGD's stochastic rounding of the chunk ``t`` (``[lo, lo + t.size)``):
    ``level = floor(min(min(|t|, cap) * inv[block] + u, top))`` with ``u`` from
    :func:`uniform16`'s draws (``floor(y + u)`` goes up with probability ``frac(y)``;
    capped at ``top`` since ``y <= top`` only up to rounding), and ``negative = t < 0``.
    Returns the count of NaN met (counted only with a finite ``cap``; then, on numpy,
    nothing else is computed). Compiled it is one
    pass, the same float32 operations in the same order, so the same levels; else numpy
    passes with ``buf`` (float32, ``2 x >= t.size``) as scratch."""
    m = t.size
    if _compiled is not None:
        i0, i1, local = blocks.span(lo, lo + m)
        flags = negative.view(np.uint8)
        return int(_compiled.qsgd_levels(t, inv[i0:i1], local, raw16(bitgen, m), top, cap,
                                         level, flags))  # fmt: skip
    a = np.abs(t, out=buf[0, :m])
    if cap < np.inf:
        nan = int(np.count_nonzero(np.isnan(a)))
        if nan:  # nothing more to compute: the update is refused
            return nan
        np.minimum(a, bound(cap, m), out=a)  # Inf goes to the cap
    scale_into(a, inv, blocks, lo)
    a += uniform16(bitgen, m, buf[1])
    np.minimum(a, bound(top, m), out=a)
    np.copyto(level, a, casting="unsafe")  # truncation: floor, as a >= 0
    np.less(t, 0, out=negative)
    return 0


def cells_into(
    v: NDArray, boundaries: NDArray, centroids: NDArray, code: NDArray, chosen: NDArray
) -> bool:
    """The cell of each value of ``v`` among ``boundaries`` (symmetric about 0, an odd
    count, as EDEN's) into the uint8 ``code``, and its centroid into ``chosen``,
    compiled; False (nothing written) when the compiled kernels are not built."""
    if _compiled is None:
        return False
    edges = np.ascontiguousarray(boundaries[(boundaries.size + 1) // 2 :], np.float32)
    _compiled.cells(v, edges, np.ascontiguousarray(centroids, np.float32), code, chosen)
    return True


def uniform16(bitgen: np.random.BitGenerator, count: int, out: NDArray) -> NDArray:
    """``count`` uniforms in (0, 1) on the grid ``(k + 1/2) / 2**16`` (float32, into
    ``out``): 16 random bits each. ``floor(y + u)`` rounds ``y`` up with probability
    ``frac(y)`` to within ``2**-17``."""
    raw = raw16(bitgen, count)
    u = out[:count]
    np.add(raw, np.float32(0.5), out=u, dtype=np.float32)
    u *= np.float32(2.0**-16)
    return u


def sign_words(bitgen: np.random.BitGenerator, count: int) -> NDArray:
    """The raw draws that hold ``count`` random bits, 64 each (little-endian uint64)."""
    return np.asarray(bitgen.random_raw(-(-count // 64)), "<u8")


def sign_bits(bitgen: np.random.BitGenerator, count: int) -> NDArray:
    """``count`` random bits (uint8 0/1), 64 from each raw draw, little-endian: the bits
    of :func:`sign_words`."""
    return np.unpackbits(sign_words(bitgen, count).view(np.uint8), count=count, bitorder="little")


def flip_by_words(t: NDArray, words: NDArray, buf: NDArray, out: NDArray | None = None) -> None:
    """:func:`flip_signs` with the bits still packed in ``words`` (:func:`sign_words`):
    bit ``i`` of the words flips element ``i``. Compiled, it is one pass with no bytes
    unpacked."""
    dst = t if out is None else out
    if _compiled is not None and t.flags.c_contiguous and dst.flags.c_contiguous:
        _compiled.flip_signs(t, words, dst)
        return
    bits = np.unpackbits(words.view(np.uint8), count=t.size, bitorder="little")
    flip_signs(t, bits, buf, out)


def flip_signs(t: NDArray, bits: NDArray, buf: NDArray, out: NDArray | None = None) -> None:
    """The float32 values of ``t`` negated where ``bits`` (uint8 0/1) is 1, by flipping
    the IEEE sign bit, into ``out`` (default: in place); ``buf``: uint32 scratch of at
    least ``t.size``."""
    mask = buf[: t.size]
    np.left_shift(bits, np.uint32(31), out=mask, dtype=np.uint32)
    dst = t if out is None else out
    np.bitwise_xor(t.view(np.uint32), mask, out=dst.view(np.uint32))


def negate_where(t: NDArray, negative: NDArray, buf: NDArray) -> None:
    """:func:`flip_signs` in place with ``negative`` a bool array."""
    flip_signs(t, negative.view(np.uint8), buf)


@lru_cache(maxsize=32)
def _scaled_hadamard(size: int) -> NDArray:
    """The ``size x size`` Walsh-Hadamard matrix over ``sqrt(size)``, float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h = (h / np.sqrt(size)).astype(np.float32)
    h.setflags(write=False)
    return h


def _factors(block: int) -> list[int]:
    """``block`` (a power of two) as a product of 16s, the remainder first."""
    m = block.bit_length() - 1
    head = [1 << (m % 4)] if m % 4 else []
    return head + [16] * (m // 4)


def hadamard_into(
    src: NDArray, block: int, out: NDArray, tmp: NDArray, scale: NDArray | None = None
) -> None:
    """``H src / sqrt(block)`` for each block of the flat ``src`` (a whole number of
    blocks), into ``out``. ``H`` of size ``16**k`` is the Kronecker product of ``k``
    copies of ``H_16``, so a block reshaped to ``(16, ..., 16)`` is rotated by one small
    matrix product along each axis: ``4 * k`` multiply-adds per element through BLAS
    instead of ``log2(block)`` butterfly passes. ``tmp``: float32 scratch of
    ``src.size``; ``src`` is left as it was.

    ``scale`` (float32, one per block) multiplies each rotated block: the last product
    runs block by block, so each block's matrix takes its factor at no extra pass.
    """
    n = src.size
    if _compiled is not None and block >= 16:  # butterflies, block by block in cache
        dst = out[:n]
        np.copyto(dst, src)
        _compiled.fwht(
            dst, block, None if scale is None else np.ascontiguousarray(scale, np.float32)
        )
        return
    factors = _factors(block)
    k = len(factors)
    targets = [out[:n] if (k - 1 - i) % 2 == 0 else tmp[:n] for i in range(k)]
    cur, inner = src, 1
    for i, (f, dst) in enumerate(zip(reversed(factors), targets, strict=True)):
        h = _scaled_hadamard(f)
        if scale is not None and i == k - 1 and inner > 1:  # f * inner == block
            h = h * scale[:, None, None]
        if inner == 1:  # rows of f: batched, a stack of (_ROWS, f) products is faster
            rows = _ROWS if (n // f) % _ROWS == 0 else 1  # than one tall (n / f, f) one
            np.matmul(cur.reshape(-1, rows, f), h, out=dst.reshape(-1, rows, f))
        else:
            np.matmul(h, cur.reshape(-1, f, inner), out=dst.reshape(-1, f, inner))
        cur, inner = dst, inner * f
    if scale is not None and k == 1:  # one factor: the block is a row of the product
        out[:n].reshape(-1, block)[...] *= scale[:, None]


def largest_magnitudes(x: NDArray, k: int) -> NDArray:
    """The sorted indices of ``k`` elements of ``x`` largest in magnitude (NaN counts as
    largest, as ``argpartition`` ranks it, so a diverged update is not hidden).

    Partitioning all of ``x`` with its indices costs about 7x a copy. Instead a strided
    sample of 65,536 magnitudes gives a bound below which about ``2 k`` elements lie
    above; only those are partitioned. Should fewer than ``k`` be above it (a sample
    that misjudged a skewed update), every element is partitioned, so the result is
    always exact; ties at the k-th magnitude go either way, as with ``argpartition``.
    """
    n = x.size
    magnitudes = np.abs(x)
    candidates: NDArray | None = None
    if 8 * k < n:
        sample = magnitudes[:: max(1, n // 65536)]
        at = int((1.0 - 2.0 * k / n) * (sample.size - 1))
        bound = np.partition(sample, at)[at]
        below = np.less(magnitudes, bound)
        np.logical_not(below, out=below)  # NaN is not below any bound
        candidates = np.flatnonzero(below)
        del below
        if candidates.size < k:
            candidates = None
    if candidates is None:
        top = np.argpartition(magnitudes, n - k)[n - k :]
    else:
        values = magnitudes[candidates]
        top = candidates[np.argpartition(values, values.size - k)[values.size - k :]]
    top.sort()
    return top


def sample_indices(seed: int, size: int, k: int) -> NDArray:
    """``k`` distinct indices in ``[0, size)``, sorted, drawn uniformly from ``seed``."""
    bits = np.random.PCG64(seed)
    if 4 * k > size:  # dense: rank random keys
        keys = bits.random_raw(size)
        return np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64)
    chosen = np.empty(0, np.int64)
    while chosen.size < k:
        draw = (np.asarray(bits.random_raw(2 * (k - chosen.size) + 16)) % size).astype(np.int64)
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
    return np.sort(chosen[:k])
