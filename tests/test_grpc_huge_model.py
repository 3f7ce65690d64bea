"""A model over 2 GiB (more than any single gRPC message or 32-bit offset can hold) makes a
full round trip through start_server and a client process, bit for bit.

Two client processes, one round, FedAvg with the float32 accumulator (exact: the values
are small integers). Measured here: 48 s, server peak RSS 7.0 GB (3.2x the model).
Slow and memory-hungry (about 16 GB in all): run with ``-m slow``.
"""

from __future__ import annotations

from typing import Any

import pytest

import fedhive as fl
from fedhive.server import ServerConfig
from grpc_helpers import finish
from test_grpc_big_model import Checks, spawn_clients, strategy

NUM_PARAMS = 590_000_000  # 2.2 GiB of float32


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_model_over_2_gib_round_trips() -> None:
    checks = Checks(NUM_PARAMS)
    fedavg = strategy(NUM_PARAMS, checks)
    fedavg.accumulator = "model"  # float32 sums: exact here (small integers)
    procs: list[Any] = []

    def started(server: Any) -> None:
        procs.extend(spawn_clients(f"127.0.0.1:{server.port}", NUM_PARAMS, None))

    try:
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            config=ServerConfig(num_rounds=1, round_timeout=1200.0),
            strategy=fedavg,
            wait_timeout=300.0,
            on_started=started,
        )
    finally:
        results = finish(procs, timeout=300)
    assert [code for code, _ in results] == [0, 0], results
    assert history.rounds[-1]["fit"]["num_results"] == 2
    assert checks.exact == {1: True}  # every element moved by exactly STEP
