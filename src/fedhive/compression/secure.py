"""Encodings that secure aggregation can add: integers on one grid shared by all clients.

A masked sum (SecAgg+, Bonawitz et al. 2017; Bell et al. 2020) reveals only the sum of
the clients' vectors modulo ``2**ring_bits``. A codec composes with it when the sum of
its encodings is the encoding of the sum: shared-scale QSGD (every client's levels on
one grid, ``level * scale / (2**bits - 1)``) and shared-seed random-k (one support for
every client; its values then quantized on a shared grid). Per-client top-k, sign and
EDEN, or QSGD with per-client scales, are not (:attr:`Codec.secagg_reason` says why).

:class:`SecureEncoding` maps an update to non-negative ring integers (levels offset by
``2**bits - 1``, times the client's weight) and a ring sum back to the weighted sum of
the decodes; :func:`ring_bits_needed` sizes the ring so that no sum can wrap, and
:meth:`SecureEncoding.check_ring` refuses a ring that is too small.

Example::

    import numpy as np
    from fedhive.compression import QSGD
    from fedhive.compression.secure import SecureEncoding

    enc = SecureEncoding(QSGD(bits=4, scale=0.1), num_clients=10)
    a = enc.encode(np.full(100, 0.05, np.float32), [100], np.random.default_rng(0))
    b = enc.encode(np.full(100, -0.02, np.float32), [100], np.random.default_rng(1))
    total = enc.decode_sum((a + b) % 2**enc.ring_bits, 2, [100])  # ~0.03 each
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import NDArray, Scalar
from fedhive.compression.codecs import QSGD, Codec, RandomK

__all__ = [
    "SecureEncoding",
    "codec_of_round",
    "codec_round_params",
    "ring_bits_needed",
    "secure_encoding_for",
]


def ring_bits_needed(num_clients: int, bits: int, max_weight: int = 1) -> int:
    """Ring bits so that ``num_clients`` encodings of ``bits``-bit levels (offset to
    ``[0, 2 (2**bits - 1)]``) times weights up to ``max_weight`` sum without wrapping."""
    top = num_clients * max_weight * 2 * ((1 << bits) - 1)
    return max(1, top.bit_length())


@dataclass(frozen=True)
class SecureEncoding:
    """``codec`` (shared-scale :class:`QSGD`, or :class:`RandomK` with ``shared_seed``
    whose values go on ``quantizer``'s grid) as ring integers for up to ``num_clients``
    clients of weight up to ``max_weight``. ``ring_bits`` defaults to the smallest ring
    that cannot overflow, rounded up to 32 or 64."""

    codec: Codec
    num_clients: int
    max_weight: int = 1
    quantizer: QSGD | None = None
    ring_bits: int | None = None

    def __post_init__(self) -> None:
        if self.codec.secagg_reason:
            raise ConfigError(f"cannot add {self.codec.id} encodings: {self.codec.secagg_reason}")
        if isinstance(self.codec, RandomK):
            if self.quantizer is None or self.quantizer.scale is None:
                raise ConfigError(
                    "shared-seed random-k values go on a shared grid under secure "
                    "aggregation: give quantizer=QSGD(bits=..., scale=...)"
                )
        elif not isinstance(self.codec, QSGD):
            raise ConfigError(f"no secure encoding for {self.codec.id}")
        need = ring_bits_needed(self.num_clients, self.grid.bits, self.max_weight)
        if self.ring_bits is None:
            object.__setattr__(self, "ring_bits", 32 if need <= 32 else 64)
        self.check_ring()
        if need > 64:
            raise ConfigError(f"{need} ring bits needed; fewer clients, weights or bits")

    @property
    def grid(self) -> QSGD:
        """The shared-scale quantizer whose levels travel."""
        return self.quantizer if isinstance(self.codec, RandomK) else self.codec  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    def check_ring(self) -> None:
        """:class:`ConfigError` unless every possible sum fits the ring (no overflow)."""
        need = ring_bits_needed(self.num_clients, self.grid.bits, self.max_weight)
        if self.ring_bits is None or self.ring_bits < need:
            raise ConfigError(
                f"a ring of {self.ring_bits} bits can overflow: {self.num_clients} clients x "
                f"weight {self.max_weight} x levels in [0, {2 * self.grid.levels}] need "
                f"{need} bits"
            )
        if self.ring_bits not in (32, 64):
            raise ConfigError(f"ring_bits must be 32 or 64, got {self.ring_bits}")

    def _support(self, size: int, seed: int) -> NDArray | None:
        return self.codec.support(size, seed) if isinstance(self.codec, RandomK) else None

    def count(self, size: int, seed: int = 0) -> int:
        """How many ring integers encode a ``size``-element update (round seed ``seed``)."""
        support = self._support(size, seed)
        return size if support is None else int(support.size)

    def encode(
        self,
        x: NDArray,
        segments: Sequence[int],
        rng: np.random.Generator,
        seed: int = 0,
        weight: int = 1,
    ) -> NDArray:
        """``weight`` x (levels + offset) of ``x`` (on the shared support), as ring ints."""
        if isinstance(weight, bool) or not 0 <= weight <= self.max_weight:
            raise ConfigError(f"weight must be in [0, {self.max_weight}], got {weight!r}")
        support = self._support(x.size, seed)
        values = x if support is None else x[support]
        level, _, _ = self.grid.integer_levels(values, [values.size], rng)
        out = level.astype(self.dtype)  # negative levels wrap, the offset brings them back
        out += self.dtype.type(self.grid.levels)
        out *= self.dtype.type(weight)
        return out

    def decode_sum(
        self, total: NDArray, weight_sum: int, segments: Sequence[int], seed: int = 0
    ) -> NDArray:
        """The weighted sum of the clients' decodes behind the ring sum ``total``."""
        size = sum(segments)
        support = self._support(size, seed)
        count = size if support is None else support.size
        if total.shape != (count,) or total.dtype != self.dtype:
            raise SerdeError(
                f"a ring sum must be {self.dtype}[{count}], got {total.dtype}{list(total.shape)}"
            )
        offset = weight_sum * self.grid.levels
        if int(total.max(initial=0)) > 2 * offset:
            raise SerdeError("the ring sum is out of range: an input was not a valid encoding")
        levels = total.astype(np.int64) - offset
        scale = float(self.grid.scale or 0.0)  # set: checked at construction
        values = levels.astype(np.float64) * (scale / self.grid.levels)
        if support is None:
            return values.astype(np.float32)
        out = np.zeros(size, np.float32)
        out[support] = values * (size / count)
        return out


# -- the codec hook of a SecAgg+ round ------------------------------------------------------

CODEC_PREFIX = "codec."  # the codec's keys in the round parameters a SecAgg+ server sends


def secure_encoding_for(
    codec: Codec, *, bits: int, clip: float, num_clients: int, max_weight: int, ring_bits: int
) -> SecureEncoding:
    """The :class:`SecureEncoding` a SecAgg+ round uses for ``codec``, or a
    :class:`ConfigError` with the reason (a codec secure aggregation cannot add, a ring
    of ``ring_bits`` that ``num_clients`` encodings of weight up to ``max_weight`` could
    overflow). Shared-scale QSGD keeps its own grid; shared-seed random-k puts its values
    on the round's grid: ``bits`` levels over ``[-clip, clip]``."""
    quantizer = None
    if isinstance(codec, RandomK) and not codec.secagg_reason:
        if bits > 15:
            raise ConfigError(
                "shared-seed random-k values go on the secure aggregation grid: "
                f"secure_aggregation.bits must be at most 15, got {bits}"
            )
        quantizer = QSGD(bits=bits, scale=float(clip), min_size=0)
    return SecureEncoding(codec, num_clients, max_weight, quantizer, ring_bits)


def codec_round_params(codec: Codec, seed: int) -> dict[str, Scalar]:
    """What a SecAgg+ server adds to its round parameters: the codec and the shared seed."""
    from fedhive.compression.payload import task_record

    return {CODEC_PREFIX + k: v for k, v in task_record(codec, seed).items()}


def codec_of_round(params: Mapping[str, Scalar]) -> tuple[Codec | None, int]:
    """The codec and shared seed in a SecAgg+ round's parameters (``None``: plain
    SecAgg+); :class:`SerdeError` when they are malformed (what the client checks)."""
    from fedhive.compression.payload import codec_from_task

    record = {k[len(CODEC_PREFIX) :]: v for k, v in params.items() if k.startswith(CODEC_PREFIX)}
    if not record:
        return None, 0
    codec, seed, downlink = codec_from_task(record)
    if downlink is not None:
        raise SerdeError("a secure round carries no downlink codec")
    return codec, seed
