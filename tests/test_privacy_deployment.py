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
