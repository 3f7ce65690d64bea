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
         rotation block and an 8-byte seed (b x ratio
         bits with ratio < 1: a seeded share is sent)
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import NDArray, Scalar
from fedhive.compression import _bits, _kernels
from fedhive.compression._base import (
    Codec,
    Encoded,
    _check_ratio,
    _expect,
    _ratio_k,
)
from fedhive.compression.quantizers import EDEN, QSGD, Sign, gaussian_centroids

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
    "gaussian_centroids",
]

_F16_MAX = float(np.finfo(np.float16).max)

# -- casts -----------------------------------------------------------------------------------


def _flat32(x: NDArray) -> NDArray:
    return np.ascontiguousarray(x, np.float32).reshape(-1)


@dataclass(frozen=True, kw_only=True)
class FP16(Codec):
    """IEEE half precision (values beyond +-65504 are clipped to it)."""

    id: ClassVar[str] = "fp16"

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        x = _flat32(x)
        values = np.empty(x.size, np.float16)
        step = min(_kernels.CHUNK, max(x.size, 1))
        scratch, flag = np.empty((3, step), np.uint32), np.empty(step, np.bool_)
        for lo, hi in _kernels.chunks(x.size):
            part = x[lo:hi]
            if part.min() >= -_F16_MAX and part.max() <= _F16_MAX:  # False for NaN too
                _kernels.half_bits(part, values[lo:hi].view(np.uint16), scratch, flag)
            else:  # rare: clip this chunk (NaN stays NaN, and decode refuses it)
                values[lo:hi] = np.clip(part, -_F16_MAX, _F16_MAX)
        return {"values": values}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        _expect(arrays, {"values": ("float16", sum(segments))})
        halves = arrays["values"].view(np.uint16)
        out = np.empty(halves.size, np.float32)
        words = out.view(np.int32)
        for lo, hi in _kernels.chunks(halves.size):
            # the half's bits at the top of an int32, shifted right by 3 with the sign
            # copied (and those copies cleared): its exponent and mantissa land where
            # float32 keeps them, worth 2**-112 times the value, subnormals included
            w = words[lo:hi]
            np.left_shift(halves[lo:hi], 16, out=w, dtype=np.int32)
            np.right_shift(w, 3, out=w)
            np.bitwise_and(w, np.int32(-0x70000001), out=w)  # 0x8FFFFFFF
            part = out[lo:hi]
            np.multiply(part, np.float32(2.0**112), out=part)
            if part.max() > _F16_MAX or part.min() < -_F16_MAX:  # NaN and Inf come out so
                raise SerdeError("fp16 payload holds NaN or Inf")
        return out


@dataclass(frozen=True, kw_only=True)
class BF16(Codec):
    """bfloat16 (the high half of float32), rounded to nearest even."""

    id: ClassVar[str] = "bf16"

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        bits = _flat32(x).view(np.uint32)
        values = np.empty(bits.size, np.uint16)
        rounded = np.empty(min(bits.size, _kernels.CHUNK), np.uint32)
        odd = np.empty_like(rounded)
        for lo, hi in _kernels.chunks(bits.size):
            part, r, o = bits[lo:hi], rounded[: hi - lo], odd[: hi - lo]
            np.right_shift(part, np.uint32(16), out=o)
            o &= np.uint32(1)  # ties go to the even neighbour
            np.add(part, np.uint32(0x7FFF), out=r)
            r += o
            r >>= np.uint32(16)
            values[lo:hi] = r
        return {"values": values}, {}

    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        _expect(arrays, {"values": ("uint16", sum(segments))})
        values = arrays["values"]
        out = np.empty(values.size, np.float32)
        bits = out.view(np.uint32)
        for lo, hi in _kernels.chunks(values.size):
            np.left_shift(values[lo:hi], np.uint32(16), out=bits[lo:hi], dtype=np.uint32)
            if not np.isfinite(out[lo:hi]).all():
                raise SerdeError("bf16 payload holds NaN or Inf")
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
        top = _kernels.largest_magnitudes(x, k)
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
        return _kernels.sample_indices(seed, size, _ratio_k(self.ratio, size))

    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        k = _ratio_k(self.ratio, x.size)
        if self.shared_seed:
            indices = self.support(x.size, seed)
            return {"values": x[indices].astype(np.float32)}, {}
        own = int(rng.integers(0, 2**63))
        indices = _kernels.sample_indices(own, x.size, k)
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
