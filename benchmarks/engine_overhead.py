"""Engine overhead: fedhive's start_simulation against a plain Python loop doing the same work.

Every client holds 100 float32 parameters and its ``fit`` returns ``parameters + 1``, so the
client work is negligible and what is left is the framework's cost per client-round. The
plain loop, in the same process, builds each client with the same ``client_fn``, calls
``fit`` on a copy of the parameters and folds the result into a float64 weighted mean with
a finite check. Overhead = (fedhive time - plain time) / (rounds x clients).

Also measured: the time from calling ``start_simulation`` to the first fit dispatch (the
first call of ``client_fn``).

Run::

    .venv/bin/python benchmarks/engine_overhead.py            # 100 clients x 50 rounds
    .venv/bin/python benchmarks/engine_overhead.py --quick    # smoke run, a few seconds
    .venv/bin/python benchmarks/engine_overhead.py --profile  # plus cProfile hotspots
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from fedhive.client import NumPyClient
from fedhive.client.context import Context
from fedhive.common.records import NDArrays, Scalar, ndarrays_to_parameters
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

NUM_PARAMS = 100
TARGET_OVERHEAD_MS = 0.25
TARGET_FIRST_DISPATCH_S = 0.5


class TrivialClient(NumPyClient):
    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        return [p + 1 for p in parameters], 1, {}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict]:
        return 0.0, 1, {}


def client_fn(context: Context) -> NumPyClient:
    return TrivialClient()


def initial_arrays() -> NDArrays:
    return [np.zeros(NUM_PARAMS, dtype=np.float32)]


def run_plain(rounds: int, clients: int) -> float:
    """Seconds for the same work as a plain loop: build, fit a copy, finite check, fold."""
    contexts = [Context(node_id=str(i)) for i in range(clients)]
    params = initial_arrays()
    start = time.perf_counter()
    for _ in range(rounds):
        acc = [np.zeros(p.shape, dtype=np.float64) for p in params]
        total = 0.0
        for context in contexts:
            client = client_fn(context)
            new, num_examples, _ = client.fit([p.copy() for p in params], {})
            for a, arr in zip(acc, new, strict=True):
                if not np.isfinite(arr).all():
                    raise ValueError("non-finite update")
                a += arr * float(num_examples)
            total += num_examples
        params = [(a / total).astype(p.dtype) for a, p in zip(acc, params, strict=True)]
    elapsed = time.perf_counter() - start
    assert float(params[0][0]) == rounds, "the plain loop computed a wrong model"
    return elapsed


def run_fedhive(rounds: int, clients: int, workers: int) -> tuple[float, float]:
    """(seconds for the whole run, seconds from the call to the first client_fn call)."""
    first_call: list[float] = []

    def timed_client_fn(context: Context) -> NumPyClient:
        if not first_call:
            first_call.append(time.perf_counter())
        return client_fn(context)

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(initial_arrays()),
    )
    start = time.perf_counter()
    history = start_simulation(
        client_fn=timed_client_fn,
        num_clients=clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        backend="thread",
        num_workers=workers,
        seed=0,
    )
    elapsed = time.perf_counter() - start
    fits = [r["fit"]["num_results"] for r in history.rounds if "fit" in r]
    assert fits == [clients] * rounds, f"fedhive run incomplete: {fits}"
    return elapsed, first_call[0] - start


@contextmanager
def profile_all_threads(profiles: list[cProfile.Profile]) -> Iterator[None]:
    """cProfile the calling thread and every thread started inside the block."""
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()

    main = cProfile.Profile()
    profiles.append(main)
    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.Thread.run = original_run  # type: ignore[method-assign]


def print_profile(rounds: int, clients: int, workers: int, top: int) -> None:
    profiles: list[cProfile.Profile] = []
    with profile_all_threads(profiles):
        run_fedhive(rounds, clients, workers)
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for prof in profiles[1:]:
        stats.add(prof)
    stats.sort_stats("tottime").print_stats(top)
    print(f"\ncProfile of start_simulation, num_workers={workers}, all threads, by tottime:")
    print(out.getvalue())


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 rounds, 2 reps")
    parser.add_argument("--rounds", type=int, default=None, help="default 50 (--quick: 5)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--reps", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile hotspots")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 50)
    reps = args.reps or (2 if args.quick else 5)
    clients = args.clients
    worker_counts = (1, 2)
    n = rounds * clients

    # Warm-up: imports, first thread creation, numpy caches.
    run_plain(1, clients)
    _, cold_first = run_fedhive(1, clients, 1)

    plain: list[float] = []
    fed: dict[int, list[float]] = {w: [] for w in worker_counts}
    first: dict[int, list[float]] = {w: [] for w in worker_counts}
    # Process CPU time too: on a shared machine it moves less than wall time.
    plain_cpu: list[float] = []
    fed_cpu: dict[int, list[float]] = {w: [] for w in worker_counts}
    for _ in range(reps):
        cpu = time.process_time()
        plain.append(run_plain(rounds, clients))
        plain_cpu.append(time.process_time() - cpu)
        for w in worker_counts:
            cpu = time.process_time()
            elapsed, to_first = run_fedhive(rounds, clients, w)
            fed_cpu[w].append(time.process_time() - cpu)
            fed[w].append(elapsed)
            first[w].append(to_first)

    plain_ms = median(plain) * 1e3 / n
    rows = [["plain loop", f"{median(plain):.3f}", f"{plain_ms:.4f}", "-", "-", "-", "-", "-"]]
    for w in worker_counts:
        overheads = [(f - p) * 1e3 / n for f, p in zip(fed[w], plain, strict=True)]
        over = median(overheads)
        cpu_over = median([(f - p) * 1e3 / n for f, p in zip(fed_cpu[w], plain_cpu, strict=True)])
        ok = "ok" if over <= TARGET_OVERHEAD_MS else "ABOVE TARGET"
        rows.append(
            [
                f"fedhive thread, num_workers={w}",
                f"{median(fed[w]):.3f}",
                f"{median(fed[w]) * 1e3 / n:.4f}",
                f"{median(fed[w]) / median(plain):.1f}x",
                f"{over:.4f}",
                f"{cpu_over:.4f}",
                f"<= {TARGET_OVERHEAD_MS}",
                ok,
            ]
        )
    print(f"Engine overhead: {clients} clients x {rounds} rounds, {NUM_PARAMS} float32 params,")
    print(f"median of {reps} repetitions (overhead = median of per-repetition differences)\n")
    headers = ["path", "run s", "ms/client-round", "ratio", "overhead ms", "cpu overhead ms"]
    headers += ["target", "status"]
    print(table(headers, rows))

    rows = []
    for w in worker_counts:
        med = median(first[w])
        ok = "ok" if med <= TARGET_FIRST_DISPATCH_S else "ABOVE TARGET"
        rows.append(
            [
                f"num_workers={w}",
                f"{med * 1e3:.2f}",
                f"{max(first[w]) * 1e3:.2f}",
                f"<= {TARGET_FIRST_DISPATCH_S * 1e3:.0f}",
                ok,
            ]
        )
    ok = "ok" if cold_first <= TARGET_FIRST_DISPATCH_S else "ABOVE TARGET"
    target = f"<= {TARGET_FIRST_DISPATCH_S * 1e3:.0f}"
    rows.append(["cold: 1st run in process", f"{cold_first * 1e3:.2f}", "-", target, ok])
    print(f"\nstart_simulation() call -> first fit dispatch (median of {reps})\n")
    print(table(["fedhive thread", "median ms", "max ms", "target ms", "status"], rows))
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    if args.profile:
        print_profile(rounds, clients, 1, top=25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
