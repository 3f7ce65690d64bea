"""Flower's side of vs_flower.py (``flwr[simulation]==1.42.0``), run in Flower's own venv.

``python _flower_side.py WORKLOAD`` runs one workload and prints one JSON line; it imports
numpy, flwr and ``_vs_common`` only (fedhive's pins conflict with Flower's). Round times
come from the strategy: a round starts at ``configure_fit`` and ends at ``aggregate_fit``
(wall-clock stamps written to a file, since Flower may run its ServerApp elsewhere).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _vs_common import (
    AGG_PARAMS,
    AGG_RESULTS,
    GRPC_CLIENTS,
    GRPC_PARAMS,
    GRPC_ROUNDS,
    MLP_CLIENTS,
    MLP_FRACTION,
    MLP_ROUNDS,
    OVERHEAD_CLIENTS,
    OVERHEAD_ROUNDS,
    SECAGG_CLIENTS,
    SECAGG_PARAMS,
    SECAGG_ROUNDS,
    RssSampler,
    client_rows,
    mlp_init,
    mlp_train,
)

STAMPS = os.environ.setdefault("VS_FLOWER_STAMPS", tempfile.mktemp(prefix="vs-flower-"))


def _stamp(kind: str) -> None:
    with open(STAMPS, "a") as out:
        out.write(f"{kind} {time.time()}\n")


def _per_round() -> tuple[list[float], float]:
    """(seconds of each round, wall-clock time the first round started)."""
    lines = [line.split() for line in Path(STAMPS).read_text().splitlines()]
    Path(STAMPS).unlink()
    start = next(float(t) for k, t in lines if k == "start")
    ends = [float(t) for k, t in lines if k == "end"]
    marks = [start, *ends]
    return [b - a for a, b in itertools.pairwise(marks)], start


def _strategy(**kwargs: Any) -> Any:
    from flwr.server.strategy import FedAvg

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            if server_round == 1:
                _stamp("start")
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            _stamp("end")
            if failures:
                _stamp(f"failures-{len(failures)}")
            return out

    return Timed(**kwargs)


def _simulate(client_app: Any, server_app: Any, supernodes: int) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    begin = time.time()
    with RssSampler(tree=True, every=0.1) as memory:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=supernodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    total = time.time() - begin
    rounds, start = _per_round()
    return {"rounds": rounds, "total_s": total, "before_s": start - begin, "peak": memory.peak}


def overhead() -> dict[str, Any]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig

    class Trivial(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return parameters, 1, {}

    def client_fn(context: Context) -> Any:
        return Trivial().to_client()

    def server_fn(context: Context) -> Any:
        strategy = _strategy(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=OVERHEAD_CLIENTS,
            min_available_clients=OVERHEAD_CLIENTS,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        )
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=OVERHEAD_ROUNDS)
        )

    return _simulate(
        ClientApp(client_fn=client_fn), ServerApp(server_fn=server_fn), OVERHEAD_CLIENTS
    )


def mlp() -> dict[str, Any]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig

    data = np.load(os.environ["VS_FLOWER_MNIST1D"])
    x_train, y_train = data["x"], data["y"]

    class Mlp(NumPyClient):
        def __init__(self, pid: int, seed: int) -> None:
            rows = client_rows(pid, len(y_train))
            self.x, self.y, self.seed = x_train[rows], y_train[rows], seed

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return mlp_train(parameters, self.x, self.y, self.seed), len(self.y), {}

    def client_fn(context: Context) -> Any:
        pid = int(context.node_config["partition-id"])
        return Mlp(pid, pid).to_client()

    def server_fn(context: Context) -> Any:
        strategy = _strategy(
            fraction_fit=MLP_FRACTION,
            fraction_evaluate=0.0,
            min_fit_clients=int(MLP_FRACTION * MLP_CLIENTS),
            min_available_clients=MLP_CLIENTS,
            initial_parameters=ndarrays_to_parameters(mlp_init()),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=MLP_ROUNDS))

    return _simulate(ClientApp(client_fn=client_fn), ServerApp(server_fn=server_fn), MLP_CLIENTS)


def aggregate() -> dict[str, Any]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg

    class Proxy(ClientProxy):  # only the cid is used by aggregate_fit
        def get_properties(self, *a: Any, **k: Any) -> Any: ...
        def get_parameters(self, *a: Any, **k: Any) -> Any: ...
        def fit(self, *a: Any, **k: Any) -> Any: ...
        def evaluate(self, *a: Any, **k: Any) -> Any: ...
        def reconnect(self, *a: Any, **k: Any) -> Any: ...

    rng = np.random.default_rng(0)
    results = [
        (
            Proxy(str(i)),
            FitRes(
                Status(Code.OK, ""),
                # what a strategy gets from Flower: parameters as bytes, as they arrived
                ndarrays_to_parameters([rng.random(AGG_PARAMS, dtype=np.float32)]),
                1 + i,
                {},
            ),
        )
        for i in range(AGG_RESULTS)
    ]
    strategy = FedAvg()
    with RssSampler(tree=False, every=0.005) as memory:
        base = memory.now()
        wall, cpu = time.perf_counter(), time.process_time()
        params, _ = strategy.aggregate_fit(1, results, [])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert params is not None
    return {"wall_s": wall, "cpu_s": cpu, "peak_above": memory.peak - base, "base": base}


def grpc() -> dict[str, Any]:
    import flwr
    from flwr.common import ndarrays_to_parameters

    here = str(Path(__file__).resolve())
    base = RssSampler(tree=False).now()  # after imports, before the model (as fedhive's)
    model = [np.zeros(GRPC_PARAMS, np.float32)]
    strategy = _strategy(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=GRPC_CLIENTS,
        min_available_clients=GRPC_CLIENTS,
        initial_parameters=ndarrays_to_parameters(model),
    )
    del model
    port = 18000 + os.getpid() % 1000
    clients = [
        subprocess.Popen(
            [sys.executable, here, "grpc-client", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(GRPC_CLIENTS)
    ]
    try:
        with RssSampler(tree=False, every=0.01) as memory:
            flwr.server.start_server(
                server_address=f"127.0.0.1:{port}",
                config=flwr.server.ServerConfig(num_rounds=1 + GRPC_ROUNDS, round_timeout=600),
                strategy=strategy,
            )
    finally:
        for proc in clients:
            proc.wait(timeout=60)
    rounds, _ = _per_round()
    return {"rounds": rounds[1:], "peak": memory.peak, "base": base}


def grpc_client(address: str) -> None:
    import flwr
    from flwr.client import NumPyClient

    class Echo(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return parameters, 1, {}

    flwr.client.start_client(server_address=address, client=Echo().to_client())


def secagg() -> dict[str, Any]:
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Trivial(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return parameters, 1, {}

    def client_fn(context: Context) -> Any:
        return Trivial().to_client()

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = _strategy(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=SECAGG_CLIENTS,
            min_available_clients=SECAGG_CLIENTS,
            initial_parameters=ndarrays_to_parameters([np.zeros(SECAGG_PARAMS, np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=1 + SECAGG_ROUNDS), strategy=strategy
        )
        # every other client holds a share (fedhive's degree "complete"), threshold 2/3 n
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=SECAGG_CLIENTS, reconstruction_threshold=(2 * SECAGG_CLIENTS) // 3
            )
        )
        workflow(grid, legacy)

    out = _simulate(ClientApp(client_fn=client_fn, mods=[secaggplus_mod]), app, SECAGG_CLIENTS)
    out["rounds"] = out["rounds"][1:]
    return out


WORKLOADS = {
    "overhead": overhead,
    "mlp": mlp,
    "aggregate": aggregate,
    "grpc": grpc,
    "secagg": secagg,
}


if __name__ == "__main__":
    if sys.argv[1] == "grpc-client":
        grpc_client(sys.argv[2])
        sys.exit(0)
    result = WORKLOADS[sys.argv[1]]()
    result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
