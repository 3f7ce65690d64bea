"""Asynchronous runs over a lazy population: picking idle clients costs O(k), not O(n)."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import numpy as np
import pytest

import fedhive.simulation.population as population
from fedhive.client.numpy_client import NumPyClient
from fedhive.common.records import ndarrays_to_parameters
from fedhive.server import ServerConfig, SimpleClientManager
from fedhive.server.client_manager import Excluding, sample_excluding
from fedhive.server.strategy import FedBuff
from fedhive.simulation import start_simulation
from fedhive.simulation.population import PopulationClientManager


class Half(NumPyClient):
    def fit(self, parameters, config):
        return [p * np.float32(0.5) for p in parameters], 1, {}


class NoListing(PopulationClientManager):
    def all(self):
        raise AssertionError("the asynchronous policy listed the population")


def test_excluded_ids_are_never_picked_and_the_rest_uniformly():
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(20)]
    excluded = {"3", "4", "5"}
    counts: Counter[str] = Counter()
    for _ in range(4000):
        picked = sample_excluding(rng, 20, 4, ids.__getitem__, excluded)
        assert len(set(picked)) == 4 and not excluded & set(picked)
        counts.update(picked)
    assert set(counts) == set(ids) - excluded
    expected = 4000 * 4 / 17
    assert all(abs(n - expected) < 0.15 * expected for n in counts.values())


def test_too_few_allowed_ids_give_nothing_and_most_excluded_still_work():
    rng = np.random.default_rng(1)
    ids = [str(i) for i in range(10)]
    assert sample_excluding(rng, 10, 3, ids.__getitem__, set(ids[:8])) == []
    assert sorted(sample_excluding(rng, 10, 2, ids.__getitem__, set(ids[:8]))) == ["8", "9"]
    assert sample_excluding(rng, 10, 0, ids.__getitem__, set()) == []


def test_the_lazy_and_the_listing_manager_pick_the_same_idle_clients():
    n = 3000
    listing = SimpleClientManager([str(i) for i in range(n)], seed=3)
    lazy = PopulationClientManager(n, seed=3)
    busy = {str(i) for i in range(0, n, 7)}
    for round_seed in (5, 6):
        listing.set_sampling_seed(round_seed)
        lazy.set_sampling_seed(round_seed)
        a = [c.cid for c in lazy.sample(40, criterion=Excluding(busy))]
        b = [c.cid for c in listing.sample(40, criterion=Excluding(busy))]
        assert a == b and len(set(a)) == 40 and not busy & set(a)


def test_fedbuff_over_a_million_clients_draws_only_what_it_dispatches(monkeypatch):
    made = Counter[str]()
    real = population.sorted_id

    def counted(position: int, n: int) -> str:
        cid = real(position, n)
        made[cid] += 1
        return cid

    monkeypatch.setattr(population, "sorted_id", counted)
    n, versions, buffer, concurrency = 1_000_000, 6, 10, 20
    tracemalloc.start()
    try:
        history = start_simulation(
            client_fn=lambda cid: Half(),
            num_clients=n,
            client_manager=NoListing(n, seed=0),
            config=ServerConfig(num_rounds=versions),
            strategy=FedBuff(
                buffer_size=buffer,
                concurrency=concurrency,
                fraction_evaluate=0.0,
                initial_parameters=ndarrays_to_parameters([np.ones(4, np.float32)]),
            ),
            seed=0,
            num_workers=2,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(history.rounds) == versions
    dispatched = versions * buffer + concurrency  # at most this many tasks went out
    # each task's client cost under two position draws on average; listing costs n
    assert sum(made.values()) <= 4 * dispatched
    assert peak < 20 << 20  # listing a million ids alone is well over 50 MiB


@pytest.mark.parametrize("busy_fraction", [0.0, 0.3])
def test_the_idle_sample_is_what_was_asked(busy_fraction):
    n = 1_000_000
    lazy = PopulationClientManager(n, seed=0)
    busy = {str(i) for i in range(int(busy_fraction * 1000))}
    picked = lazy.sample(500, criterion=Excluding(busy))
    assert len({c.cid for c in picked}) == 500 and not busy & {c.cid for c in picked}


def test_min_num_clients_counts_the_allowed_ones():
    lazy = PopulationClientManager(10, seed=0)
    listing = SimpleClientManager([str(i) for i in range(10)], seed=0)
    busy = {"0", "1", "2", "3", "4", "5"}
    for manager in (lazy, listing):
        assert manager.sample(3, min_num_clients=5, criterion=Excluding(busy)) == []
        assert len(manager.sample(3, min_num_clients=4, criterion=Excluding(busy))) == 3
