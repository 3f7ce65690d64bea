"""In deployment the server does not choose who shows up: no amplification by default."""

from __future__ import annotations

import numpy as np

from fedhive.common import ndarrays_to_parameters
from fedhive.privacy import Accounting, DifferentialPrivacyServerSideFixedClipping
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ServerThread


def wrapper(accounting=None):
    inner = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(3, np.float32)]))
    return DifferentialPrivacyServerSideFixedClipping(inner, 1.0, 1.0, 10, accounting=accounting)


def test_start_server_accounts_without_amplification_unless_told_otherwise():
    implicit = wrapper()
    assert implicit.accounting.sampling == "fixed"  # simulation default
    ServerThread(config=ServerConfig(num_rounds=0), strategy=implicit).start().join()
    assert implicit.accounting.sampling == "none"

    explicit = wrapper(Accounting(sampling="fixed"))
    ServerThread(config=ServerConfig(num_rounds=0), strategy=explicit).start().join()
    assert explicit.accounting.sampling == "fixed"


def test_the_first_round_waits_for_clients_that_are_still_connecting():
    import threading

    from fedhive.server import SimpleClientManager

    manager = SimpleClientManager(wait_timeout=10.0)
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_fit_clients=2, min_available_clients=2), 1.0, 1.0, 2
    )
    threading.Timer(0.2, lambda: [manager.register(f"n{i}") for i in range(2)]).start()
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    instructions = strategy.configure_fit(1, params, manager)  # nobody is there yet
    assert sorted(client.cid for client, _ in instructions) == ["n0", "n1"]
    assert strategy.accountant.rounds == 1
