"""fedhive side by side with Flower (``flwr[simulation]==1.42.0``), the same workload in one run.

Workload measured here: engine overhead per client-round and fixed start cost, with a
trivial client (returns the model it got) and 100 clients, all of them fit every round, no
evaluation. Each framework runs 2 and 12 rounds; per round = (t12 - t2) / 10, per
client-round = per round / 100, fixed cost = t2 - 2 x per round. Flower runs its own
simulation engine (``flwr.simulation.run_simulation``, Ray underneath) in a child process
of a separate virtual environment, because ``flwr`` 1.42 pins ``protobuf<7`` and
``packaging<26``, which conflict with this project's pins; ``--flower-python`` names its
interpreter (``make flower-venv`` builds ``.venv-flower``). fedhive runs with the thread
backend and with the Ray backend.

Run::

    nice -n 10 .venv/bin/python benchmarks/vs_flower.py --flower-python .venv-flower/bin/python
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

import numpy as np

CLIENTS = 100
SHORT, LONG = 2, 12


def _fedhive_time(rounds: int, backend: str) -> float:
    from fedhive.client import NumPyClient
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.server.config import ServerConfig
    from fedhive.server.strategy import FedAvg
    from fedhive.simulation import start_simulation

    class Trivial(NumPyClient):
        def fit(self, parameters, config):
            return parameters, 1, {}

    start = time.perf_counter()
    start_simulation(
        client_fn=lambda context: Trivial(),
        num_clients=CLIENTS,
        config=ServerConfig(num_rounds=rounds),
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        ),
        seed=0,
        backend=backend,
        num_workers=2,
    )
    return time.perf_counter() - start


def _flower_time(rounds: int) -> float:  # runs in Flower's environment
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    class Trivial(NumPyClient):
        def fit(self, parameters, config):
            return parameters, 1, {}

    def client_fn(context: Context):
        return Trivial().to_client()

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            min_available_clients=CLIENTS,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    start = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return time.perf_counter() - start


def _derive(short: float, long: float) -> dict[str, float]:
    per_round = (long - short) / (LONG - SHORT)
    return {
        "per_client_round_ms": 1000 * per_round / CLIENTS,
        "fixed_s": short - SHORT * per_round,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-python", default=".venv-flower/bin/python")
    parser.add_argument("--side", choices=["fedhive", "flower"], default="fedhive")
    args = parser.parse_args(argv)
    if args.side == "flower":
        print(json.dumps(_derive(_flower_time(SHORT), _flower_time(LONG))))
        return
    rows = {b: _derive(_fedhive_time(SHORT, b), _fedhive_time(LONG, b)) for b in ("thread", "ray")}
    done = subprocess.run(
        [args.flower_python, __file__, "--side", "flower"],
        capture_output=True,
        text=True,
        check=True,
    )
    flower = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"trivial client, {CLIENTS} clients/round, all fit; rounds {SHORT} and {LONG}")
    print(f"{'':10} {'ms/client-round':>16} {'fixed s':>8} {'Flower/us':>10} {'fixed ratio':>12}")
    print(f"{'flower':10} {flower['per_client_round_ms']:>16.3f} {flower['fixed_s']:>8.2f}")
    for name, row in rows.items():
        ratio = flower["per_client_round_ms"] / row["per_client_round_ms"]
        fixed = flower["fixed_s"] / max(row["fixed_s"], 1e-3)
        print(
            f"{'fedhive-' + name:10} {row['per_client_round_ms']:>16.3f} {row['fixed_s']:>8.2f} "
            f"{ratio:>9.1f}x {fixed:>11.1f}x"
        )
    print("reproduce: nice -n 10 python", shlex.join([sys.argv[0], *sys.argv[1:]]))


if __name__ == "__main__":
    main()
