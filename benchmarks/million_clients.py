"""A million registered clients, 1,000 sampled per round: driver memory over the rounds.

1,000,000 virtual clients are registered (``start_simulation(num_clients=1_000_000)``);
each round FedAvg samples 1,000 of them (``fraction_fit=0.001``, no evaluation). Each
client trains the MNIST-1D MLP (40 -> 64 -> 10) for one epoch, batch 8, on its partition:
16 samples of the shared MNIST-1D training set drawn from its partition id's seed, made
when the client is built (no partition table exists). The driver's RSS is read after
every round (``/proc/self/status`` VmRSS; the Ray actors are other processes); growth =
median RSS of the last 10% of rounds - median of rounds 2..(10% + 1) (round 1 warms up).

The driver's RSS after every tenth round is printed below each backend's row.

Run (niced; ``--backends thread,ray``, ``--rounds`` to shorten)::

    nice -n 10 .venv/bin/python benchmarks/million_clients.py --rounds 100
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from fedhive.client import NumPyClient
from fedhive.client.context import Context
from fedhive.common.records import NDArrays, ndarrays_to_parameters
from fedhive.data import load_mnist1d
from fedhive.models.torch_models import MLP, get_weights, set_weights, train_torch
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

CLIENTS, PER_ROUND, SAMPLES = 1_000_000, 1_000, 16
DATA = load_mnist1d(num_samples=4000, seed=0)
_MODELS: dict[int, MLP] = {}  # one model per worker thread (or actor), kept between tasks


def worker_model() -> MLP:
    key = threading.get_ident()
    if key not in _MODELS:
        _MODELS[key] = MLP(40, 64, 10, seed=0)
    return _MODELS[key]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Mnist1dClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        pid = int(context.node_config["partition-id"])
        rows = np.random.default_rng(pid).choice(len(DATA.y_train), SAMPLES, replace=False)
        self.x, self.y = DATA.x_train[rows], DATA.y_train[rows]
        self.seed = context.seed

    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict]:
        model = worker_model()
        set_weights(model, parameters)
        train_torch(model, self.x, self.y, epochs=1, batch_size=8, lr=0.05, seed=self.seed)
        return get_weights(model), len(self.y), {}


def client_fn(context: Context) -> Mnist1dClient:
    return Mnist1dClient(context)


class RssPerRound:
    def __init__(self) -> None:
        self.rss: list[float] = []
        self.times: list[float] = []

    def on_run_start(self, engine: Any) -> None:
        self.last = time.perf_counter()

    def on_round_end(self, engine: Any, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        self.rss.append(rss_mb())

    def on_run_end(self, engine: Any, history: Any) -> None:
        pass


def run(backend: str, rounds: int) -> dict[str, Any]:
    before = rss_mb()
    meter = RssPerRound()
    strategy = FedAvg(
        fraction_fit=PER_ROUND / CLIENTS,
        min_fit_clients=PER_ROUND,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        min_available_clients=PER_ROUND,
        initial_parameters=ndarrays_to_parameters(get_weights(MLP(40, 64, 10, seed=1))),
    )
    start = time.perf_counter()
    start_simulation(
        client_fn=client_fn,
        num_clients=CLIENTS,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=0,
        backend=backend,
        num_workers=2,
        callbacks=[meter],
    )
    total = time.perf_counter() - start
    tenth = max(1, rounds // 10)
    early = meter.rss[1 : tenth + 1] or meter.rss[:1]
    late = meter.rss[-tenth:]
    return {
        "rounds": rounds,
        "before_mb": before,
        "max_mb": max(meter.rss),
        "growth_mb": statistics.median(late) - statistics.median(early),
        "round_s": statistics.median(meter.times[1:] or meter.times),
        "total_s": total,
        "series": meter.rss,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--backends", default="thread,ray")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{CLIENTS:,} registered, {PER_ROUND:,} per round, MNIST-1D MLP, {os.cpu_count()} cores")
    print(f"{'backend':8} {'rounds':>6} {'RSS before':>10} {'RSS max':>8} {'growth':>7} "
          f"{'s/round':>8} {'total s':>8}")  # fmt: skip
    for backend in args.backends.split(","):
        r = run(backend, args.rounds)
        print(
            f"{backend:8} {r['rounds']:>6} {r['before_mb']:>8.0f}MB {r['max_mb']:>6.0f}MB "
            f"{r['growth_mb']:>5.1f}MB {r['round_s']:>8.2f} {r['total_s']:>8.1f}",
            flush=True,
        )
        every = max(1, args.rounds // 10)
        series = r["series"]
        marks = ", ".join(f"{i + 1}: {series[i]:.0f}" for i in range(0, len(series), every))
        print(f"  driver RSS MB after round {marks}, {len(series)}: {series[-1]:.0f}", flush=True)
    print("target: driver RSS <= 2048 MB and no growth over the rounds")
    print("reproduce: nice -n 10 python", shlex.join([sys.argv[0], *sys.argv[1:]]))


if __name__ == "__main__":
    main()
