"""WeightedMean's float64 path, bit for bit against the plain formula, on layers large
enough for their own mappings (the first update written straight into the accumulator,
the mean written over the accumulator's front) and on small ones."""

from __future__ import annotations

import numpy as np
import pytest

from fedhive.server.strategy.aggregate import WeightedMean


def plain_mean(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    out = []
    for layer in range(len(updates[0])):
        acc = np.zeros(updates[0][layer].shape, np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc = acc + update[layer].astype(np.float64) * weight
        out.append((acc / sum(weights)).astype(updates[0][layer].dtype))
    return out


@pytest.mark.parametrize("sizes", [(3, 700_001), (1_000_003,), (17,)])
def test_the_mean_has_the_bits_of_the_plain_formula(sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    reference = [np.zeros(n, np.float32) for n in sizes]
    updates = []
    for _ in range(3):
        update = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        for layer in update:
            layer[::5] = -0.0  # a zero's sign: 0 + (-0.0) is +0.0
        updates.append(update)
    weights = [3.0, 1.0, 0.5]
    mean = WeightedMean(reference)
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        mean.add(update, weight, client_id=str(i), server_round=1)
    got = mean.result()
    assert got is not None
    for a, b in zip(got, plain_mean(updates, weights), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
        a += 1  # the mean is an ordinary writable array
    one = WeightedMean(reference)
    one.add(updates[1], 0.0, client_id="z", server_round=1)
    one.add(updates[0], 2.0, client_id="a", server_round=1)
    zero_first = one.result()
    assert zero_first is not None
    want = plain_mean([updates[1], updates[0]], [0.0, 2.0])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(zero_first, want, strict=True))


def test_a_large_float32_mean_is_written_over_its_accumulator() -> None:
    rng = np.random.default_rng(1)
    reference = [np.zeros(1_000_003, np.float32)]
    mean = WeightedMean(reference)
    mean.add(
        [rng.standard_normal(1_000_003).astype(np.float32)], 2.0, client_id="a", server_round=1
    )
    acc = mean._acc[0]
    got = mean.result()
    assert got is not None and got[0].dtype == np.float32
    assert np.shares_memory(got[0], acc)  # no new memory for the mean
