"""The codec hook of a SecAgg+ round: compressed updates under the masks.

A codec whose encodings add up (shared-scale QSGD, shared-seed random-k; see
:mod:`fedhive.compression.secure`) replaces SecAgg+'s own quantizer: the client encodes
its update to ring integers (times its weight, then the weight itself) before adding the
masks, and the server decodes the unmasked sum once (Bonawitz et al. 2017 for the masked
sum; Alistarh et al. 2017 for QSGD; Stich et al. 2018 for random-k). The server announces
the codec, its parameters and the round's shared seed with the other round parameters;
the client checks them (a codec that cannot be added, a ring its sums could overflow)
before it makes any key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedhive.common.errors import ConfigError, ProtocolError
from fedhive.common.records import NDArray, Scalar
from fedhive.compression.codecs import Codec
from fedhive.compression.secure import (
    SecureEncoding,
    codec_of_round,
    codec_round_params,
    secure_encoding_for,
)
from fedhive.secagg.config import SecAggConfig
from fedhive.secagg.messages import field_float, field_int

__all__ = ["RoundCodec", "check_codec", "client_codec", "server_codec"]


@dataclass(frozen=True)
class RoundCodec:
    """One round's secure encoding of ``size``-element updates, with the shared seed."""

    encoding: SecureEncoding
    seed: int
    size: int

    @property
    def count(self) -> int:
        """Ring integers per update (the shared support's size for random-k)."""
        return self.encoding.count(self.size, self.seed)

    @property
    def length(self) -> int:
        """The masked vector's length: the encoded update and the weight."""
        return self.count + 1

    def encode(self, delta: NDArray, weight: int, rng: np.random.Generator) -> NDArray:
        """``weight`` x the encoding of ``delta``, then ``weight``, as one ring vector."""
        out = np.empty(self.length, self.encoding.dtype)
        out[:-1] = self.encoding.encode(
            delta.astype(np.float32), [self.size], rng, self.seed, weight
        )
        out[-1] = weight
        return out

    def in_range(self, total: NDArray, weight_sum: int) -> bool:
        """Whether an unmasked sum of weight ``weight_sum`` can be a sum of encodings."""
        return int(total[:-1].max(initial=0)) <= 2 * self.encoding.grid.levels * weight_sum

    def mean(self, total: NDArray, weight_sum: int) -> NDArray:
        """The weighted mean of the clients' decoded updates behind the unmasked sum."""
        summed = self.encoding.decode_sum(total[:-1], weight_sum, [self.size], self.seed)
        return summed.astype(np.float64) / weight_sum


def check_codec(codec: Codec, config: SecAggConfig) -> None:
    """:class:`ConfigError` unless ``codec`` can run in rounds of ``config``: one the
    masked sum can add, on a ring that ``max_clients`` encodings of weight up to
    ``max_weight`` cannot overflow."""
    _encoding(codec, config.bits, config.clip, config.max_clients, config.max_weight, config.ring)


def server_codec(
    codec: Codec, config: SecAggConfig, n: int, weighted: bool, seed: int, size: int
) -> tuple[RoundCodec, dict[str, Scalar]]:
    """The round's codec for ``n`` clients, and the round parameters that announce it."""
    max_weight = config.max_weight if weighted else 1
    encoding = _encoding(codec, config.bits, config.clip, n, max_weight, config.ring)
    return RoundCodec(encoding, seed, size), codec_round_params(codec, seed)


def client_codec(params: Mapping[str, Scalar], size: int = 0) -> RoundCodec | None:
    """The codec a server's round parameters ask for (``None``: SecAgg+'s own
    quantizer), checked; a :class:`ProtocolError` naming what is wrong."""
    try:
        codec, seed = codec_of_round(params)
        if codec is None:
            return None
        weighted = bool(params.get("weighted"))
        encoding = _encoding(
            codec,
            field_int(params, "bits"),
            field_float(params, "clip"),
            field_int(params, "n"),
            field_int(params, "max_weight") if weighted else 1,
            field_int(params, "ring_bits"),
        )
    except (ValueError, ProtocolError) as exc:  # ConfigError, SerdeError
        raise ProtocolError(f"codec check: {exc}; refusing the round") from None
    return RoundCodec(encoding, seed, size)


def _encoding(
    codec: Codec, bits: int, clip: float, n: int, max_weight: int, ring: int
) -> SecureEncoding:
    if not isinstance(codec, Codec):
        raise ConfigError(f"a secure round's codec must be a Codec, got {type(codec).__name__}")
    return secure_encoding_for(
        codec, bits=bits, clip=clip, num_clients=n, max_weight=max_weight, ring_bits=ring
    )
