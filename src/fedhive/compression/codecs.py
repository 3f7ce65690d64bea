"""Codecs: encode/decode pairs for one model update, flattened to a float32 vector.

Each codec turns the update ``x`` (the concatenation of the model's large arrays, in
model order; ``segments`` gives each array's length) into named raw arrays, and back.
:meth:`Codec.decode` validates everything it reads (names, dtypes, sizes, index ranges,
finite scales) and raises :class:`~fedhive.common.errors.SerdeError` with the reason.

======== ============================================= ==================== =========
codec    what travels per element                      unbiased             SecAgg
======== ============================================= ==================== =========
fp16     IEEE half (2 bytes)                           (rounding)           no
bf16     bfloat16, round to nearest even (2 bytes)     (rounding)           no
qsgd     b bits of level + 1 sign bit; a float32 scale yes (stochastic)     shared scale
         per array or per block
topk     k values (float32) + indices (delta/bitmap)   no (error feedback)  no
randomk  k values rescaled by d/k (+ indices unless    yes                  shared seed
         the seed is shared)
sign     1 bit; a float32 scale (mean abs) per block   no (error feedback)  no
eden     b bits after a random rotation; a scale per   yes (over rotations) no
         rotation block and an 8-byte seed
======== ============================================= ==================== =========

Example::

    import numpy as np
    from fedhive.compression import QSGD

    codec = QSGD(bits=4)
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    fields, info = codec.encode(x, [1000], np.random.default_rng(1))
    x_hat = codec.decode(fields, info, [1000])
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import NDArray, Scalar
from fedhive.compression import _bits, _rotation

__all__ = [
    "BF16",
    "CODECS",
    "EDEN",
    "FP16",
    "QSGD",
    "Codec",
    "Encoded",
    "RandomK",
    "Sign",
    "TopK",
    "codec_from_params",
]

#: What an encode gives: named raw arrays, and scalars describing them.
Encoded = tuple[dict[str, NDArray], dict[str, Scalar]]
_F16_MAX = float(np.finfo(np.float16).max)


def _expect(fields_: Mapping[str, NDArray], spec: Mapping[str, tuple[str, int | None]]) -> None:
    """Exactly the arrays ``spec`` names, each 1-D of its dtype (and size, when given)."""
    if set(fields_) != set(spec):
        raise SerdeError(f"expected payload arrays {sorted(spec)}, got {sorted(fields_)}")
    for name, (dtype, size) in spec.items():
        arr = fields_[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.ndim != 1:
            got = f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
            raise SerdeError(f"payload array {name!r} must be 1-D {dtype}, got {got}")
        if size is not None and arr.size != size:
            raise SerdeError(f"payload array {name!r} must hold {size} values, got {arr.size}")


def _finite_scales(scales: NDArray, name: str = "scales") -> NDArray:
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise SerdeError(f"payload {name} must be finite and >= 0")
    return scales


def _starts(size: int, segments: Sequence[int], block: int | None) -> NDArray:
    """Start offsets of the scale blocks: one per array (``block`` None) or fixed size."""
    if block is None:
        lengths = [s for s in segments if s > 0]
        return np.cumsum([0, *lengths[:-1]], dtype=np.int64) if lengths else np.zeros(0, np.int64)
    return np.arange(0, size, block, dtype=np.int64)


def _per_element(values: NDArray, starts: NDArray, size: int) -> NDArray | np.float32:
    """Per-block ``values`` broadcast to ``size`` elements (a scalar when one block)."""
    if values.size == 1:
        return np.float32(values[0])
    lengths = np.diff(np.append(starts, size))
    return np.repeat(values.astype(np.float32, copy=False), lengths)


def _ratio_k(ratio: float, size: int) -> int:
    return 0 if size == 0 else min(size, max(1, round(ratio * size)))


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"ratio must be a number in (0, 1], got {ratio!r}")


def _check_bits(bits: object, low: int, high: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"bits must be an int in [{low}, {high}], got {bits!r}")


def _check_block(block: object, power_of_two: bool = False) -> None:
    if block is None and not power_of_two:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be None or an int >= 1, got {block!r}")
    if power_of_two and (block < 2 or block & (block - 1)):
        raise ConfigError(f"block must be a power of two >= 2, got {block!r}")


@dataclass(frozen=True, kw_only=True)
class Codec(ABC):
    """An update codec. ``error_feedback``: the client keeps what it did not send and adds
    it to its next update (Stich et al. 2018; Karimireddy et al. 2019). Arrays of fewer
    than ``min_size`` elements (biases, norms) travel uncompressed.

    Subclasses declare ``id``, whether decoding is unbiased (``unbiased``), and whether
    the encoding is a sum-preserving integer vector that secure aggregation can add
    (``secagg_reason`` is empty then; else it says why not).
    """

    error_feedback: bool = False
    min_size: int = 256

    id: ClassVar[str] = ""
    unbiased: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"error_feedback must be a bool, got {self.error_feedback!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int):
            raise ConfigError(f"min_size must be an int >= 0, got {self.min_size!r}")
        if self.min_size < 0:
            raise ConfigError(f"min_size must be an int >= 0, got {self.min_size!r}")

    def params(self) -> dict[str, Scalar]:
        """The codec's parameters as scalars (what a task tells the client)."""
        out: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @property
    def secagg_reason(self) -> str:
        """Why this codec cannot run under secure aggregation ("" when it can)."""
        return (
            f"{self.id} encodes each client's update with its own scale or support, so the "
            "masked sum of encodings is not the encoding of the sum"
        )

    @abstractmethod
    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        """Encode the float32 vector ``x`` (arrays of lengths ``segments``); ``seed`` is
        the round's shared seed (randomk with a shared seed)."""

    @abstractmethod
    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        """The float32 vector behind ``arrays``; :class:`SerdeError` if malformed."""

    def roundtrip(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> tuple[Encoded, NDArray]:
        """Encode ``x`` and decode it again (what error feedback subtracts)."""
        encoded = self.encode(x, segments, rng, seed)
        return encoded, self.decode(encoded[0], encoded[1], segments, seed)


# -- casts -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FP16(Codec):
    """IEEE half precision (values beyond +-65504 are clipped to it)."""

    id: ClassVar[str] = "fp16"

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        values = np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)
        return {"values": values}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        _expect(arrays, {"values": ("float16", sum(segments))})
        out = arrays["values"].astype(np.float32)
        if not np.isfinite(out).all():
            raise SerdeError("fp16 payload holds NaN or Inf")
        return out


@dataclass(frozen=True, kw_only=True)
class BF16(Codec):
    """bfloat16 (the high half of float32), rounded to nearest even."""

    id: ClassVar[str] = "bf16"

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF)
        rounded += (bits >> np.uint32(16)) & np.uint32(1)
        rounded >>= np.uint32(16)
        return {"values": rounded.astype(np.uint16)}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        _expect(arrays, {"values": ("uint16", sum(segments))})
        out = arrays["values"].astype(np.uint32)
        out <<= np.uint32(16)
        values = out.view(np.float32)
        if not np.isfinite(values).all():
            raise SerdeError("bf16 payload holds NaN or Inf")
        return values


# -- stochastic quantization -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QSGD(Codec):
    """Stochastic uniform quantization, unbiased (Alistarh, Grubic, Li, Tomioka, Vojnovic.
    "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding." NeurIPS
    2017), with the max-norm scale: ``|x_i| / scale`` is rounded up or down at random to
    one of ``2**bits - 1`` levels so that its expectation is exact. ``bits`` of level plus
    a sign bit per element (``b + 1`` bits), and one float32 scale per array (``block``
    None) or per ``block`` elements.

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

    def _scales(self, mag: NDArray, starts: NDArray) -> NDArray:
        if self.scale is not None:
            return np.full(1, self.scale, np.float32)
        if mag.size == 0:
            return np.zeros(0, np.float32)
        return np.maximum.reduceat(mag, starts).astype(np.float32)

    def integer_levels(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator
    ) -> tuple[NDArray, NDArray, NDArray]:
        """Signed levels in ``[-(2**bits - 1), 2**bits - 1]`` (int16), scales, block starts."""
        starts = _starts(x.size, segments, None if self.scale is not None else self.block)
        mag = np.abs(x, dtype=np.float32)
        if self.scale is not None:
            np.minimum(mag, np.float32(self.scale), out=mag)
            starts = np.zeros(1, np.int64)
        scales = self._scales(mag, starts)
        inv = np.divide(
            np.float32(self.levels), scales, out=np.zeros_like(scales), where=scales > 0
        )
        mag *= _per_element(inv, starts, x.size)
        mag += rng.random(x.size, dtype=np.float32)  # floor(y + u) is y rounded up w.p. frac(y)
        np.floor(mag, out=mag)
        np.minimum(mag, np.float32(self.levels), out=mag)
        level = mag.astype(np.int16)
        np.negative(level, out=level, where=x < 0)
        return level, scales, starts

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        level, scales, _ = self.integer_levels(x, segments, rng)
        out = {
            "levels": _bits.pack(np.abs(level).astype(np.uint16), self.bits),
            "signs": _bits.pack(level < 0, 1),
        }
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
        spec: dict[str, tuple[str, int | None]] = {
            "levels": ("uint8", _bits.packed_nbytes(size, self.bits)),
            "signs": ("uint8", _bits.packed_nbytes(size, 1)),
        }
        if self.scale is None:
            spec["scales"] = ("float32", _starts(size, segments, self.block).size)
        _expect(arrays, spec)
        level = _bits.unpack(arrays["levels"], self.bits, size)  # b bits: at most 2^b - 1
        negative = _bits.unpack(arrays["signs"], 1, size).astype(np.bool_)
        if self.scale is None:
            scales = _finite_scales(arrays["scales"])
            starts = _starts(size, segments, self.block)
        else:
            scales, starts = np.full(1, self.scale, np.float32), np.zeros(1, np.int64)
        out = level.astype(np.float32)
        out *= _per_element(scales / np.float32(self.levels), starts, size)
        np.negative(out, out=out, where=negative)
        return out


# -- sparsification ---------------------------------------------------------------------------


def _encode_indices(indices: NDArray, size: int) -> tuple[NDArray, str]:
    """Sorted indices as deltas (smallest unsigned width that fits) or a bitmap, whichever
    takes fewer bytes."""
    if indices.size == 0:
        return np.zeros(0, np.uint8), "delta"
    deltas = np.diff(indices, prepend=0)
    top = int(deltas.max())
    dtype = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32
    bitmap_bytes = _bits.packed_nbytes(size, 1)
    if indices.size * np.dtype(dtype).itemsize <= bitmap_bytes:
        return deltas.astype(dtype), "delta"
    mask = np.zeros(size, np.bool_)
    mask[indices] = True
    return np.packbits(mask, bitorder="little"), "bitmap"


def _decode_indices(arr: NDArray, mode: Scalar | None, size: int, k: int) -> NDArray:
    if mode == "bitmap":
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != _bits.packed_nbytes(size, 1):
            raise SerdeError(f"an index bitmap for {size} elements must be uint8[{-(-size // 8)}]")
        bits = np.unpackbits(arr, bitorder="little")
        if bits[size:].any():
            raise SerdeError("the index bitmap has bits set beyond the update's size")
        indices = np.flatnonzero(bits[:size])
        if indices.size != k:
            raise SerdeError(f"the index bitmap selects {indices.size} elements, expected {k}")
        return indices
    if mode != "delta":
        raise SerdeError(f"index coding must be 'delta' or 'bitmap', got {mode!r}")
    if arr.ndim != 1 or arr.dtype not in (np.uint8, np.uint16, np.uint32) or arr.size != k:
        raise SerdeError(f"delta-coded indices must be {k} uint8/16/32 values, got {arr.dtype}")
    if k and (arr[1:] == 0).any():
        raise SerdeError("delta-coded indices must be strictly increasing (a delta of 0)")
    indices = np.cumsum(arr, dtype=np.int64)
    if k and indices[-1] >= size:
        raise SerdeError(f"index {int(indices[-1])} out of range for an update of size {size}")
    return indices


def _scatter(values: NDArray, indices: NDArray, size: int, factor: float = 1.0) -> NDArray:
    if not np.isfinite(values).all():
        raise SerdeError("sparse payload values hold NaN or Inf")
    out = np.zeros(size, np.float32)
    out[indices] = values
    if factor != 1.0:
        out[indices] *= np.float32(factor)
    return out


@dataclass(frozen=True, kw_only=True)
class TopK(Codec):
    """The ``ratio`` of elements largest in magnitude, over the whole update (biased: use
    it with error feedback; Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory."
    NeurIPS 2018). Values travel as float32, indices delta-coded or as a bitmap."""

    ratio: float = 0.01

    id: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ratio(self.ratio)

    @property
    def secagg_reason(self) -> str:
        return (
            "top-k picks each client's own largest elements, so the masked sum of "
            "encodings has no common support and is not the encoding of the sum; use "
            "RandomK(shared_seed=True) or QSGD(scale=...) with secure aggregation"
        )

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        k = _ratio_k(self.ratio, x.size)
        if k == 0:
            return {"values": np.zeros(0, np.float32), "index": np.zeros(0, np.uint8)}, {
                "index": "delta"
            }
        top = np.argpartition(np.abs(x), x.size - k)[x.size - k :]
        top.sort()
        index, mode = _encode_indices(top, x.size)
        return {"values": x[top].astype(np.float32), "index": index}, {"index": mode}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        k = _ratio_k(self.ratio, size)
        if set(arrays) != {"values", "index"}:
            raise SerdeError(f"expected payload arrays ['index', 'values'], got {sorted(arrays)}")
        _expect({"values": arrays["values"]}, {"values": ("float32", k)})
        indices = _decode_indices(arrays["index"], info.get("index"), size, k)
        return _scatter(arrays["values"], indices, size)


@dataclass(frozen=True, kw_only=True)
class RandomK(Codec):
    """``ratio`` of the elements drawn uniformly at random, rescaled by ``d / k`` so that
    decoding is unbiased (Stich et al. 2018; Konecny et al. 2016). With ``shared_seed`` the
    indices come from the round's seed, the same for every client: only the values travel,
    and encodings of all clients share one support (secure aggregation can add them).
    Otherwise each client draws its own and sends them (delta-coded or bitmap)."""

    ratio: float = 0.01
    shared_seed: bool = False

    id: ClassVar[str] = "randomk"
    unbiased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ratio(self.ratio)
        if not isinstance(self.shared_seed, bool):
            raise ConfigError(f"shared_seed must be a bool, got {self.shared_seed!r}")

    @property
    def secagg_reason(self) -> str:
        if self.shared_seed:
            return ""
        return (
            "random-k with each client's own indices has no common support; use "
            "RandomK(shared_seed=True) with secure aggregation"
        )

    def support(self, size: int, seed: int) -> NDArray:
        """The indices every client keeps this round (``shared_seed``)."""
        return _rotation.sample_indices(seed, size, _ratio_k(self.ratio, size))

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        k = _ratio_k(self.ratio, x.size)
        if self.shared_seed:
            indices = self.support(x.size, seed)
            return {"values": x[indices].astype(np.float32)}, {}
        own = int(rng.integers(0, 2**63))
        indices = _rotation.sample_indices(own, x.size, k)
        index, mode = _encode_indices(indices, x.size)
        return {"values": x[indices].astype(np.float32), "index": index}, {"index": mode}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        k = _ratio_k(self.ratio, size)
        factor = size / k if k else 1.0
        if self.shared_seed:
            _expect(arrays, {"values": ("float32", k)})
            return _scatter(arrays["values"], self.support(size, seed), size, factor)
        if set(arrays) != {"values", "index"}:
            raise SerdeError(f"expected payload arrays ['index', 'values'], got {sorted(arrays)}")
        _expect({"values": arrays["values"]}, {"values": ("float32", k)})
        indices = _decode_indices(arrays["index"], info.get("index"), size, k)
        return _scatter(arrays["values"], indices, size, factor)


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
        starts = _starts(x.size, segments, self.block)
        if x.size == 0:
            return {"signs": np.zeros(0, np.uint8), "scales": np.zeros(0, np.float32)}, {}
        sums = np.add.reduceat(np.abs(x, dtype=np.float32), starts, dtype=np.float64)
        lengths = np.diff(np.append(starts, x.size))
        scales = (sums / lengths).astype(np.float32)
        return {"signs": _bits.pack(x < 0, 1), "scales": scales}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        starts = _starts(size, segments, self.block)
        _expect(
            arrays,
            {
                "signs": ("uint8", _bits.packed_nbytes(size, 1)),
                "scales": ("float32", starts.size),
            },
        )
        scales = _finite_scales(arrays["scales"])
        negative = _bits.unpack(arrays["signs"], 1, size).astype(np.bool_)
        out = np.ones(size, np.float32) if scales.size != 1 else np.full(size, scales[0])
        if scales.size != 1:
            out *= _per_element(scales, starts, size)
        np.negative(out, out=out, where=negative)
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
    """

    bits: int = 1
    block: int = 1 << 12

    id: ClassVar[str] = "eden"
    unbiased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bits(self.bits, 1, 8)
        _check_block(self.block, power_of_two=True)

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        own = int(rng.integers(0, 2**63))
        blocks = _rotation.rotate(np.asarray(x, np.float32), self.block, own)
        centroids, boundaries = gaussian_centroids(self.bits)
        norms = np.sqrt(np.einsum("ij,ij->i", blocks, blocks, dtype=np.float64))
        unit = np.divide(
            np.sqrt(self.block), norms, out=np.zeros_like(norms), where=norms > 0
        ).astype(np.float32)
        codes = np.searchsorted(boundaries, blocks * unit[:, None]).astype(np.uint16)
        chosen = centroids[codes]
        dots = np.einsum("ij,ij->i", blocks, chosen, dtype=np.float64)
        scales = np.divide(norms * norms, dots, out=np.zeros_like(norms), where=dots > 0)
        out = {
            "codes": _bits.pack(codes.reshape(-1), self.bits),
            "scales": scales.astype(np.float32),
            "seed": np.asarray([own], np.uint64),
        }
        return out, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        size = sum(segments)
        count = -(-size // self.block)
        _expect(
            arrays,
            {
                "codes": ("uint8", _bits.packed_nbytes(count * self.block, self.bits)),
                "scales": ("float32", count),
                "seed": ("uint64", 1),
            },
        )
        scales = _finite_scales(arrays["scales"])
        codes = _bits.unpack(arrays["codes"], self.bits, count * self.block)
        if codes.size and int(codes.max()) >= 1 << self.bits:
            raise SerdeError("eden code out of range")
        centroids, _ = gaussian_centroids(self.bits)
        blocks = centroids[codes].reshape(count, self.block)
        blocks *= scales[:, None]
        return _rotation.unrotate(blocks, self.block, int(arrays["seed"][0]), size)


#: Codecs by id (the ``uplink``/``downlink`` names of the ``[compression]`` table).
CODECS: dict[str, type[Codec]] = {c.id: c for c in (FP16, BF16, QSGD, TopK, RandomK, Sign, EDEN)}


def codec_from_params(codec_id: object, params: Mapping[str, Any]) -> Codec:
    """The codec ``codec_id`` with ``params`` (what a task carries), validated; a
    :class:`ConfigError` naming what is wrong."""
    cls = CODECS.get(codec_id) if isinstance(codec_id, str) else None
    if cls is None:
        raise ConfigError(f"unknown codec {codec_id!r}; known: {', '.join(sorted(CODECS))}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(
            f"codec {codec_id!r} takes {sorted(allowed)}, got unknown {sorted(unknown)}"
        )
    return cls(**dict(params))
