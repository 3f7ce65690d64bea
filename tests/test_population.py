"""A million registered clients: ids, node configs and sampling without listing them."""

from __future__ import annotations

import tracemalloc

import pytest

from fedhive.client import StateStore
from fedhive.common import RecordDict
from fedhive.server.client_manager import SimpleClientManager
from fedhive.simulation.population import (
    NodeConfigs,
    PopulationClientManager,
    PopulationIds,
    sorted_id,
)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 99, 100, 101, 345, 1000, 1234])
def test_sorted_id_is_the_sorted_list(n):
    listed = sorted(str(i) for i in range(n))
    assert [sorted_id(i, n) for i in range(n)] == listed
    with pytest.raises(IndexError):
        sorted_id(n, n)


def test_the_same_seed_picks_the_clients_the_listing_manager_picks():
    n = 5000
    listing = SimpleClientManager([str(i) for i in range(n)], seed=3)
    lazy = PopulationClientManager(n, seed=3)
    for round_seed in (11, 12):
        listing.set_sampling_seed(round_seed)
        lazy.set_sampling_seed(round_seed)
        assert [c.cid for c in lazy.sample(50)] == [c.cid for c in listing.sample(50)]
    assert lazy.num_available() == n and lazy.sample(n + 1) == []


def test_a_million_clients_cost_only_what_is_sampled():
    tracemalloc.start()
    try:
        manager = PopulationClientManager(1_000_000, seed=0)
        configs = NodeConfigs(1_000_000)
        ids = PopulationIds(1_000_000)
        for round_seed in range(5):
            manager.set_sampling_seed(round_seed)
            picked = manager.sample(1000)
            assert len({c.cid for c in picked}) == 1000
            assert all(c.cid in configs for c in picked)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20
    assert configs["999999"] == {"partition-id": 999999, "num-partitions": 1_000_000}
    assert "1000000" not in configs and "007" not in configs and 7 not in configs
    assert len(ids) == 1_000_000 and ids[-1] == "999999" and ids[1:3] == ["1", "2"]


def test_an_empty_state_is_not_kept():
    store = StateStore()
    try:
        for i in range(100):
            store.put(str(i), RecordDict())
        assert len(store) == 0
        store.put("a", RecordDict(metric_records={"m": {"x": 1}}))
        store.put("a", RecordDict())
        assert len(store) == 0 and store.get("a").is_empty()
    finally:
        store.close()
