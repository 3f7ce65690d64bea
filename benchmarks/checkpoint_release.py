"""What the durable release costs: one checkpoint per round against two.

Since a new model is saved (with the privacy ledger that charged it) before it is
evaluated, every round writes a release checkpoint and then the finished round's
checkpoint (whose model file is a hard link to the release's). The baseline, in the same
process, is the one checkpoint per round written before: the same :class:`Checkpointer`
called as a plain callable, which has no ``release`` and so saves only the finished
round. Both run the same seeded simulation (10 clients, 4 per round, FedAvg or FedAdam,
which keeps two model-sized moments in its state), interleaved in repeated pairs; the
table gives the median wall and CPU time spent inside the checkpointer per round.

Run::

    .venv/bin/python benchmarks/checkpoint_release.py           # 1M and 4M float32 params
    .venv/bin/python benchmarks/checkpoint_release.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.client import ClientApp, NumPyClient
from fedhive.client.state import StateStore
from fedhive.common.records import ndarrays_to_parameters
from fedhive.server import Engine, ServerConfig, SimpleClientManager
from fedhive.server.checkpoint import Checkpointer
from fedhive.server.strategy import FedAdam, FedAvg
from fedhive.simulation.runner import VirtualClientRunner
from fedhive.transport import InProcessTransport

NUM_CLIENTS = 10


class StepClient(NumPyClient):
    def fit(self, parameters, config):
        return [p + 0.01 for p in parameters], 1, {}

    def evaluate(self, parameters, config):
        return float(parameters[0][:10].mean()), 1, {}


class Timed:
    """Wraps the checkpointer's entry points and adds up the time spent in them."""

    def __init__(self, checkpointer: Checkpointer, release: bool) -> None:
        self.inner = checkpointer
        self.wall = 0.0
        self.cpu = 0.0
        if release:
            self.release = self._timed(checkpointer.release)

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args)
            finally:
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu

        return call

    def __call__(self, engine: Engine) -> None:
        self._timed(self.inner.save)(engine)


def run(num_params: int, strategy_name: str, release: bool, rounds: int) -> tuple[float, float]:
    initial = ndarrays_to_parameters([np.zeros(num_params, np.float32)])
    strategy: FedAvg
    if strategy_name == "FedAdam":
        strategy = FedAdam(initial_parameters=initial, fraction_fit=0.4, fraction_evaluate=0.0)
    else:
        strategy = FedAvg(initial_parameters=initial, fraction_fit=0.4, fraction_evaluate=0.0)
    ids = [str(i) for i in range(NUM_CLIENTS)]
    store = StateStore()
    runner = VirtualClientRunner(
        ClientApp(lambda cid: StepClient()), store, {c: {} for c in ids}, {}
    )
    transport = InProcessTransport(runner, num_workers=1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as directory:
        timed = Timed(Checkpointer(Path(directory), store), release)
        engine = Engine(
            strategy=strategy,
            transport=transport,
            client_manager=SimpleClientManager(ids, seed=0),
            config=ServerConfig(num_rounds=rounds),
            seed=0,
            checkpointer=timed,
        )
        try:
            engine.run()
        finally:
            transport.close()
            store.close()
    return timed.wall / rounds * 1e3, timed.cpu / rounds * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [10_000] if args.quick else [1_000_000, 4_000_000]
    rounds, pairs = (2, 1) if args.quick else (10, 3)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    print(
        f"ms per round spent checkpointing (median of {pairs} interleaved pairs, {rounds} rounds)"
    )
    print()
    header = f"{'params':>10}  {'strategy':8}  {'one save wall':>13}  {'release+save wall':>17}"
    print(header + f"  {'ratio':>5}  {'one save cpu':>12}  {'release+save cpu':>16}")
    for size in sizes:
        for name in ("FedAvg", "FedAdam"):
            base: list[tuple[float, float]] = []
            new: list[tuple[float, float]] = []
            for _ in range(pairs):
                base.append(run(size, name, False, rounds))
                new.append(run(size, name, True, rounds))
            bw = statistics.median(w for w, _ in base)
            nw = statistics.median(w for w, _ in new)
            bc = statistics.median(c for _, c in base)
            nc = statistics.median(c for _, c in new)
            print(
                f"{size:>10}  {name:8}  {bw:>13.1f}  {nw:>17.1f}  {nw / bw:>5.2f}"
                f"  {bc:>12.1f}  {nc:>16.1f}"
            )
    print()
    print("reproduce: " + shlex.join([".venv/bin/python", "benchmarks/checkpoint_release.py"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
