"""Models cut into many chunks: they must round-trip through gRPC bit for bit.

A real server and 2 client processes on 127.0.0.1 run FedAvg. Each client checks that the
model it receives is exactly the expected one (else it exits with code 3) and returns it
plus 2 (weight 1) or plus 6 (weight 3), so every round adds exactly 5 to the model; the
values are small integers in float32, so every product and mean is exact and the server
checks the new global model with ``==`` after every round.

This file is also the client program: ``python test_grpc_big_model.py --address ...``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import ndarrays_to_parameters
from fedhive.common.records import NDArrays, Scalar
from fedhive.server import ServerConfig
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.engine import Engine
from fedhive.server.history import History
from fedhive.server.strategy import FedAvg
from grpc_helpers import finish

DELTAS = (2.0, 6.0)
WEIGHTS = (1, 3)
STEP = 5.0  # (1 * 2 + 3 * 6) / 4: what every round adds to the model
ROUNDS = 2


def make_model(num_params: int, offset: float = 0.0) -> NDArrays:
    """Three float32 arrays (odd sizes, one 2-D) of small integers in [-500, 500)."""
    first = num_params // 3 + 5
    rows, cols = (num_params // 3) // 1000, 1000
    shapes = [(first,), (rows, cols), (num_params - first - rows * cols,)]
    pattern = np.arange(-500, 500, dtype=np.float32) + np.float32(offset)
    return [np.resize(pattern, shape) for shape in shapes]


def same(arrays: NDArrays, expected: NDArrays) -> bool:
    return len(arrays) == len(expected) and all(
        a.dtype == e.dtype and a.shape == e.shape and np.array_equal(a, e)
        for a, e in zip(arrays, expected, strict=True)
    )


class Checks:
    """The server's side of the check: the global model after every round."""

    def __init__(self, num_params: int) -> None:
        self.num_params = num_params
        self.exact: dict[int, bool] = {}

    def evaluate(
        self, server_round: int, arrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round > 0:
            expected = make_model(self.num_params, STEP * server_round)
            self.exact[server_round] = same(arrays, expected)
        return None


def strategy(num_params: int, checks: Checks) -> FedAvg:
    return FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=2,
        min_available_clients=2,
        evaluate_fn=checks.evaluate,
        on_fit_config_fn=lambda server_round: {"round": server_round},
        initial_parameters=ndarrays_to_parameters(make_model(num_params)),
    )


def spawn_clients(address: str, num_params: int, chunk_bytes: int | None) -> list[Any]:
    args = ["--address", address, "--num-params", str(num_params)]
    if chunk_bytes is not None:
        args += ["--chunk-bytes", str(chunk_bytes)]
    return [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args, "--pid", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]


def check_history(history: History, checks: Checks, results: list[tuple[int, str]]) -> None:
    assert [code for code, _ in results] == [0, 0], results
    assert [r["fit"]["num_results"] for r in history.rounds if "fit" in r] == [2] * ROUNDS
    assert checks.exact == dict.fromkeys(range(1, ROUNDS + 1), True)


def test_two_mb_model_round_trips_in_4096_byte_chunks() -> None:
    """start_server does not expose chunk_bytes, so this builds what it builds."""
    from fedhive.transport.grpc_server import GrpcServer

    num_params = 500_000  # ~2 MB of float32: ~490 chunks each way per client and round
    checks = Checks(num_params)
    manager = SimpleClientManager(wait_timeout=20.0)
    server = GrpcServer("127.0.0.1:0", client_manager=manager, chunk_bytes=4096).start()
    procs = spawn_clients(f"127.0.0.1:{server.port}", num_params, 4096)
    try:
        engine = Engine(
            strategy=strategy(num_params, checks),
            transport=server,
            client_manager=manager,
            config=ServerConfig(num_rounds=ROUNDS, round_timeout=60.0),
            seed=0,
            ordered=False,
        )
        history = engine.run()
    finally:
        server.finish_run()
        results = finish(procs, timeout=30)
    check_history(history, checks, results)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_300_mb_model_round_trips_with_default_chunks() -> None:
    num_params = 75_000_000  # 300 MB of float32 in 1 MiB chunks
    checks = Checks(num_params)
    procs: list[Any] = []

    def started(server: Any) -> None:
        procs.extend(spawn_clients(f"127.0.0.1:{server.port}", num_params, None))

    try:
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            config=ServerConfig(num_rounds=ROUNDS, round_timeout=300.0),
            strategy=strategy(num_params, checks),
            wait_timeout=120.0,
            on_started=started,
        )
    finally:
        results = finish(procs, timeout=120)
    check_history(history, checks, results)


# -- the client program ---------------------------------------------------------------------


class CheckingClient(fl.client.NumPyClient):
    def __init__(self, pid: int, num_params: int) -> None:
        self.pid = pid
        self.num_params = num_params

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        offset = STEP * (int(config["round"]) - 1)
        if not same(parameters, make_model(self.num_params, offset)):
            print(f"client {self.pid}: the model differs in round {config['round']}", flush=True)
            os._exit(3)
        return [p + DELTAS[self.pid] for p in parameters], WEIGHTS[self.pid], {}


def client_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--num-params", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, default=None)
    args = parser.parse_args()
    fl.client.start_client(
        server_address=args.address,
        client=CheckingClient(args.pid, args.num_params).to_client(),
        insecure=True,
        max_retries=10,
        chunk_bytes=args.chunk_bytes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(client_main())
