"""Compression under secure aggregation: the masked sum of encodings decodes to the sum."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from fedhive.common.errors import ConfigError
from fedhive.compression import EDEN, QSGD, RandomK, Sign, TopK
from fedhive.compression.secure import SecureEncoding, ring_bits_needed
from fedhive.secagg import primitives as p


def masked_sum(vectors, ring_bits):
    """SecAgg's pairwise masks (AES-CTR keystreams): client i adds m_ij for j > i and
    subtracts m_ji; the server sees only masked vectors and their sum."""
    n, length = len(vectors), vectors[0].size
    seeds = {(i, j): secrets.token_bytes(32) for i in range(n) for j in range(i + 1, n)}
    masked = []
    for i, v in enumerate(vectors):
        out = v.copy()
        for j in range(n):
            if i < j:
                out += p.expand_mask(seeds[(i, j)], length, ring_bits)
            elif j < i:
                out -= p.expand_mask(seeds[(j, i)], length, ring_bits)
        masked.append(out)
    total = masked[0].copy()
    for m in masked[1:]:
        total += m
    assert not any(np.array_equal(m, v) for m, v in zip(masked, vectors, strict=True))
    return total


@pytest.mark.parametrize(
    "encoding",
    [
        SecureEncoding(QSGD(bits=4, scale=0.5), num_clients=6, max_weight=40),
        SecureEncoding(QSGD(bits=8, scale=1.0), num_clients=6, max_weight=3, ring_bits=64),
        SecureEncoding(
            RandomK(ratio=0.1, shared_seed=True),
            num_clients=6,
            max_weight=40,
            quantizer=QSGD(bits=6, scale=0.5),
        ),
    ],
    ids=["qsgd4", "qsgd8-ring64", "randomk"],
)
def test_masked_sum_of_encodings_is_bit_exact(encoding):
    rng = np.random.default_rng(0)
    updates = [rng.normal(scale=0.2, size=5000).astype(np.float32) for _ in range(6)]
    weights = [int(w) for w in rng.integers(1, encoding.max_weight + 1, 6)]
    plain = [
        encoding.encode(u, [5000], np.random.default_rng(i), seed=77, weight=w)
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ]
    secure_total = masked_sum(plain, encoding.ring_bits)
    plain_total = sum(v.astype(np.int64) for v in plain)
    # no overflow: the ring sum equals the integer sum, bit for bit
    np.testing.assert_array_equal(secure_total.astype(np.int64), plain_total)
    secure = encoding.decode_sum(secure_total, sum(weights), [5000], seed=77)
    plaintext = encoding.decode_sum(plain_total.astype(encoding.dtype), sum(weights), [5000], 77)
    np.testing.assert_array_equal(secure, plaintext)
    # and it is the weighted sum of what each client's encoding decodes to
    one_by_one = sum(
        encoding.decode_sum(v // np.asarray(w, v.dtype), 1, [5000], 77) * w
        for v, w in zip(plain, weights, strict=True)
    )
    np.testing.assert_allclose(secure, one_by_one, rtol=1e-5, atol=1e-5)
    if isinstance(encoding.codec, QSGD):  # each level within a step of the clipped value
        scale = encoding.codec.scale
        expected = sum(np.clip(u, -scale, scale) * w for u, w in zip(updates, weights, strict=True))
        step = scale / encoding.codec.levels
        assert np.abs(secure - expected).max() <= step * sum(weights) + 1e-4


def test_a_ring_that_could_overflow_is_refused():
    assert ring_bits_needed(6, 4, 40) == 13
    with pytest.raises(ConfigError, match="overflow"):
        SecureEncoding(QSGD(bits=8, scale=1.0), num_clients=2**20, max_weight=2**10, ring_bits=32)
    with pytest.raises(ConfigError, match="overflow"):
        SecureEncoding(QSGD(bits=15, scale=1.0), num_clients=2**17, ring_bits=32)
    # what the check prevents: such a sum wraps in 32 bits and would decode wrong
    top = 2**17 * 2 * (2**15 - 1)
    assert top >= 2**32 and ring_bits_needed(2**17, 15) == 33
    assert SecureEncoding(QSGD(bits=15, scale=1.0), num_clients=2**17).ring_bits == 64


@pytest.mark.parametrize(
    "codec, word",
    [
        (TopK(ratio=0.1), "top-k"),
        (QSGD(bits=4), "shared scale"),
        (RandomK(ratio=0.1), "shared_seed"),
        (Sign(), "own scale"),
        (EDEN(), "own scale"),
    ],
)
def test_per_client_codecs_are_refused_with_the_reason(codec, word):
    with pytest.raises(ConfigError, match=word):
        SecureEncoding(codec, num_clients=4)


def test_garbage_ring_sums_are_refused():
    enc = SecureEncoding(QSGD(bits=4, scale=1.0), num_clients=4)
    from fedhive.common.errors import SerdeError

    with pytest.raises(SerdeError, match="out of range"):
        enc.decode_sum(np.full(10, 10_000, np.uint32), 2, [10])
    with pytest.raises(SerdeError, match="ring sum must be"):
        enc.decode_sum(np.zeros(9, np.uint32), 2, [10])
