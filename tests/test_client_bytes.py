"""A round's per-client byte counts are kept packed in the history (bounded growth)."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import numpy as np
import pytest

from fedhive.client import NumPyClient
from fedhive.common.records import ndarrays_to_parameters
from fedhive.server.client_bytes import ClientBytes
from fedhive.server.config import ServerConfig
from fedhive.server.history import History
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation


def _counts(n: int) -> dict[str, list[int]]:
    return {str(100_000 + 7 * i): [1000 + i, 5000 + 3 * i] for i in range(n)}


def test_it_is_the_dict_of_dicts_it_replaces():
    counts = _counts(5)
    packed = ClientBytes(counts)
    plain = {cid: {"up": u, "down": d} for cid, (u, d) in counts.items()}
    assert packed == plain and plain == packed
    assert len(packed) == 5 and list(packed) == list(plain)
    assert packed["100007"] == {"up": 1001, "down": 5003}
    assert packed.items() == list(plain.items())
    assert packed.values() == list(plain.values())
    assert "100007" in packed and "nope" not in packed
    with pytest.raises(KeyError):
        packed["nope"]
    assert pickle.loads(pickle.dumps(packed)) == plain
    assert ClientBytes({}) == {} and len(ClientBytes({})) == 0


def test_ids_holding_the_separator_are_kept_as_they_are():
    counts = {"a\x00b": (1, 2), "": (3, 4), "c": (5, 6)}
    packed = ClientBytes(counts)
    assert list(packed) == ["a\x00b", "", "c"]
    assert packed["a\x00b"] == {"up": 1, "down": 2} and packed[""] == {"up": 3, "down": 4}


def test_the_history_exports_and_reloads_it_as_the_dict():
    history = History()
    history.add_round({"round": 1, "bytes_clients": ClientBytes({"1": (40, 150), "2": (60, 150)})})
    data = json.loads(history.to_json())
    assert data["rounds"][0]["bytes_clients"] == {
        "1": {"up": 40, "down": 150},
        "2": {"up": 60, "down": 150},
    }
    assert History.from_dict(data).rounds == history.rounds


def test_a_thousand_clients_cost_tens_of_bytes_each_not_hundreds():
    counts = _counts(1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        packed = ClientBytes(counts)
        held = tracemalloc.get_traced_memory()[0] - before
        plain = {cid: {"up": u, "down": d} for cid, (u, d) in counts.items()}
        plain_held = tracemalloc.get_traced_memory()[0] - before - held
    finally:
        tracemalloc.stop()
    assert len(plain) == len(packed) == 1000
    assert held < 40 * 1000, held  # ids joined (7 B each) + two int64 counts
    assert plain_held > 5 * held  # what a dict of dicts held
    assert packed.nbytes() == 1000 * 7 - 1 + 16 * 1000


class _Echo(NumPyClient):
    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        return parameters, 1, {}


def test_a_run_records_every_client_packed_and_the_totals_add_up():
    history = start_simulation(
        client_fn=lambda context: _Echo(),
        num_clients=6,
        config=ServerConfig(num_rounds=2),
        strategy=FedAvg(
            fraction_fit=0.5,
            fraction_evaluate=0.0,
            min_fit_clients=3,
            min_available_clients=6,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        ),
        seed=0,
    )
    for record in history.rounds:
        per_client = record["bytes_clients"]
        assert isinstance(per_client, ClientBytes) and len(per_client) == 3
        assert sum(b["up"] for b in per_client.values()) == record["bytes_up"] > 0
        assert sum(b["down"] for b in per_client.values()) == record["bytes_down"] > 0
