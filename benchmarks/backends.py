"""Local backends: thread vs process workers for start_simulation, side by side.

Three client workloads, each trained by every client in every round:

- ``torch``: a PyTorch MLP (40 -> 160 -> 80 -> 10, 20,250 params), SGD, batch 10,
  2 local epochs over 200 samples drawn from the client's partition-seeded numpy RNG;
- ``numpy``: multinomial logistic regression (40 x 10) with numpy SGD, same data and
  schedule (small numpy ops release the GIL only partly);
- ``pure-python``: a loop of 200k float additions, holding the GIL throughout.

For each workload: ``backend="thread"`` with 1 and 2 workers and ``backend="process"``
with 2 workers; 20 clients, all of them fit every round, 3 rounds, no evaluation. Each
configuration gets one warm-up run (1 round) first (``--quick`` skips it for the process
pool). Per-round wall time comes from the history's ``elapsed_s``; the median is over the
rounds of the measured run. The process
pool starts lazily, so round 1 carries its one-off start cost (spawning the workers and
importing torch in them): start cost = round 1 - median of the later rounds.

``--overhead`` measures per-round overhead instead: 1,000 clients per round with a
trivial client (it returns the model it got, 10 float32), so a round's time is the
backend's and the engine's own cost. ``thread``, ``process`` and ``ray`` (2 workers each)
run in turn, ``--repeats`` times interleaved (thread, process, ray, thread, ...), each run
``--rounds`` rounds of which the first is dropped (it starts the workers). Ray's session
is started once, before the runs, and joined by every run (Ray's own start is not a
round's cost). Per round: wall time, the driver's CPU time (``time.process_time``) and the
CPU time of the driver's whole process tree (worker processes, Ray's raylet, GCS and
actors; ``/proc``); medians over all measured rounds. The target: Ray at most 2x the
local (thread) backend.

Run::

    .venv/bin/python benchmarks/backends.py          # 20 clients x 3 rounds
    .venv/bin/python benchmarks/backends.py --quick  # 6 clients x 1 round, small workloads
    nice -n 10 .venv/bin/python benchmarks/backends.py --overhead --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedhive.client import NumPyClient
from fedhive.client.context import Context
from fedhive.common.records import NDArrays, Scalar, ndarrays_to_parameters
from fedhive.server import RoundCallback
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

FEATURES, CLASSES, BATCH = 40, 10, 10
HIDDEN = (160, 80)
CONFIGS = (("thread", 1), ("thread", 2), ("process", 2))
FULL: dict[str, Scalar] = {"samples": 200, "epochs": 2, "loops": 200_000}
QUICK: dict[str, Scalar] = {"samples": 50, "epochs": 1, "loops": 20_000}


def client_data(context: Context) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The client's samples: features from its partition seed, labels from a fixed teacher."""
    pid = int(context.node_config["partition-id"])
    rng = np.random.default_rng(1000 + pid)
    x = rng.normal(size=(int(context.run_config["samples"]), FEATURES)).astype(np.float32)
    teacher = np.random.default_rng(7).normal(size=(FEATURES, CLASSES)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1), rng


def batches(n: int, epochs: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches for ``epochs`` shuffled passes over ``n`` samples."""
    out: list[np.ndarray] = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        out += [perm[i : i + BATCH] for i in range(0, n, BATCH)]
    return out


def dense_init(sizes: tuple[int, ...]) -> NDArrays:
    """Weights and biases for a chain of dense layers (seeded, He-scaled)."""
    rng = np.random.default_rng(0)
    arrays: NDArrays = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        w = rng.normal(scale=np.sqrt(2.0 / fan_in), size=(fan_out, fan_in))
        arrays += [w.astype(np.float32), np.zeros(fan_out, np.float32)]
    return arrays


class TorchClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.ctx = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        x_np, y_np, rng = client_data(self.ctx)
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        params = [torch.from_numpy(p).requires_grad_() for p in parameters]
        opt = torch.optim.SGD(params, lr=0.05)
        for idx_np in batches(len(x_np), int(self.ctx.run_config["epochs"]), rng):
            idx = torch.from_numpy(idx_np)
            h = x[idx]
            for i in range(0, len(params), 2):
                h = torch.nn.functional.linear(h, params[i], params[i + 1])
                h = torch.relu(h) if i + 2 < len(params) else h
            loss = torch.nn.functional.cross_entropy(h, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().numpy() for p in params], len(x_np), {"loss": float(loss.detach())}


class NumpyClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.ctx = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        x, y, rng = client_data(self.ctx)
        w, b = parameters  # (CLASSES, FEATURES), (CLASSES,): private copies
        onehot = np.eye(CLASSES, dtype=np.float32)[y]
        for idx in batches(len(x), int(self.ctx.run_config["epochs"]), rng):
            logits = x[idx] @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            grad = p / p.sum(axis=1, keepdims=True) - onehot[idx]
            w -= 0.1 * (grad.T @ x[idx]) / len(idx)
            b -= 0.1 * grad.mean(axis=0)
        return [w, b], len(x), {}


class PurePythonClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.ctx = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        total, step = 0.0, 1.0 + int(self.ctx.node_config["partition-id"]) * 1e-6
        for _ in range(int(self.ctx.run_config["loops"])):
            total += step
        return [p + np.float32(total * 1e-9) for p in parameters], 1, {}


def torch_client_fn(context: Context) -> NumPyClient:
    return TorchClient(context)


def numpy_client_fn(context: Context) -> NumPyClient:
    return NumpyClient(context)


def pure_python_client_fn(context: Context) -> NumPyClient:
    return PurePythonClient(context)


WORKLOADS: dict[str, tuple[Callable[[Context], NumPyClient], Callable[[], NDArrays]]] = {
    "torch": (torch_client_fn, lambda: dense_init((FEATURES, *HIDDEN, CLASSES))),
    "numpy": (numpy_client_fn, lambda: dense_init((FEATURES, CLASSES))),
    "pure-python": (pure_python_client_fn, lambda: [np.zeros(100, np.float32)]),
}


def run(
    workload: str, backend: str, workers: int, clients: int, rounds: int, sizes: dict[str, Scalar]
) -> tuple[list[float], float]:
    """(wall seconds of each round, seconds for the whole start_simulation call)."""
    client_fn, init = WORKLOADS[workload]
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(init()),
    )
    start = time.perf_counter()
    history = start_simulation(
        client_fn=client_fn,
        num_clients=clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        backend=backend,
        num_workers=workers,
        seed=0,
        run_config=sizes,
    )
    total = time.perf_counter() - start
    fits = [(r["fit"]["num_results"], r["fit"]["num_failures"]) for r in history.rounds]
    assert fits == [(clients, 0)] * rounds, f"{workload}/{backend}/{workers} incomplete: {fits}"
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in history.rounds]
    return [b - a for a, b in itertools.pairwise(elapsed)], total


class Trivial(NumPyClient):
    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        return parameters, 1, {}


def trivial_client_fn(context: Context) -> NumPyClient:
    return Trivial()


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every live descendant (``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return sum(used.get(pid, 0.0) for pid in mine)


class RoundCosts(RoundCallback):
    """Per round: wall seconds, driver CPU seconds and process-tree CPU seconds."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self._last = (0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), tree_cpu_seconds()

    def on_run_start(self, engine: Any) -> None:
        self._last = self._now()

    def on_round_end(self, engine: Any, record: dict[str, Any]) -> None:
        now = self._now()
        self.rows.append((now[0] - self._last[0], now[1] - self._last[1], now[2] - self._last[2]))
        self._last = self._now()  # the tree scan itself is not the next round's cost


def overhead_run(backend: str, clients: int, rounds: int) -> list[tuple[float, float, float]]:
    costs = RoundCosts()
    history = start_simulation(
        client_fn=trivial_client_fn,
        num_clients=clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        ),
        backend=backend,
        num_workers=2,
        seed=0,
        callbacks=[costs],
    )
    fits = [(r["fit"]["num_results"], r["fit"]["num_failures"]) for r in history.rounds]
    assert fits == [(clients, 0)] * rounds, f"{backend} incomplete: {fits}"
    return costs.rows[1:]  # round 1 starts the workers


def _ratio(value: float, base: float) -> str:
    """``value / base`` as ``1.23x``; ``n/a`` when the base measured nothing (a round
    shorter than the kernel's 10 ms CPU tick reads as 0 s of process-tree CPU)."""
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def overhead(clients: int, rounds: int, repeats: int, backends: list[str]) -> None:
    if "ray" in backends:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load_before = os.getloadavg()
    rows: dict[str, list[tuple[float, float, float]]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            rows[backend] += overhead_run(backend, clients, rounds)
    load_after = os.getloadavg()
    medians = {
        b: tuple(statistics.median(r[i] for r in rows[b]) for i in range(3)) for b in backends
    }
    base = medians[backends[0]]
    print(f"Per-round overhead: {clients} clients per round, trivial client (10 float32),")
    print(f"2 workers; {repeats} interleaved runs x {rounds - 1} measured rounds per backend;")
    print("medians; ratio = backend / " + backends[0])
    print(f"{os.cpu_count()} cores; load average (1, 5, 15 min) before {_load(load_before)},")
    print(f"after {_load(load_after)}")
    print()
    headers = ["backend", "rounds", "wall s/round", "ratio", "driver CPU s", "ratio"]
    headers += ["tree CPU s", "ratio", "ms per client-round"]
    out = []
    for b in backends:
        wall, cpu, tree = medians[b]
        out.append(
            [
                b,
                str(len(rows[b])),
                f"{wall:.3f}",
                _ratio(wall, base[0]),
                f"{cpu:.3f}",
                _ratio(cpu, base[1]),
                f"{tree:.3f}",
                _ratio(tree, base[2]),
                f"{1000 * wall / clients:.3f}",
            ]
        )
    print(table(headers, out))
    print("\ntree CPU: the driver and all its descendant processes (Ray's daemons and actors,")
    print("the process pool's workers), live at the end of each round")
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 clients, 1 round, small work")
    parser.add_argument("--clients", type=int, default=None, help="default 20 (--quick: 6)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    parser.add_argument("--overhead", action="store_true", help="per-round overhead, with Ray")
    parser.add_argument("--repeats", type=int, default=3, help="--overhead: interleaved runs")
    parser.add_argument(
        "--backends", nargs="+", default=["thread", "process", "ray"], help="--overhead: these"
    )
    args = parser.parse_args(argv)
    if args.overhead:
        overhead(args.clients or 1000, args.rounds or 6, args.repeats, args.backends)
        return 0
    clients = args.clients or (6 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = dict(QUICK if args.quick else FULL)
    warm = not args.quick  # a process pool takes seconds to start: --quick warms threads only

    rows: list[list[str]] = []
    for workload in args.workloads or list(WORKLOADS):
        base: float | None = None
        for backend, workers in CONFIGS:
            if warm or backend == "thread":
                run(workload, backend, workers, clients, 1, sizes)
            per_round, total = run(workload, backend, workers, clients, rounds, sizes)
            med = statistics.median(per_round)
            base = base or med
            later = statistics.median(per_round[1:]) if rounds > 1 else None
            rows.append(
                [
                    workload,
                    backend,
                    str(workers),
                    f"{med:.3f}",
                    f"{base / med:.3g}x",
                    f"{per_round[0]:.3f}",
                    "-" if later is None else f"{later:.3f}",
                    "-" if later is None else f"{per_round[0] - later:+.3f}",
                    f"{total:.2f}",
                ]
            )
    print(f"Local backends: {clients} clients x {rounds} rounds, all clients fit each round,")
    print(f"{sizes['samples']} samples x {sizes['epochs']} epochs (batch {BATCH}) per client,")
    print(f"pure-python {sizes['loops']} additions; median s/round over the measured run", end="")
    print(" after a 1-round warm-up;" if warm else " (--quick: no process warm-up);")
    print(f"speed-up vs thread/1; {os.cpu_count()} cores, torch {torch.__version__}")
    print()
    headers = ["workload", "backend", "workers", "median s/round", "speed-up", "round 1 s"]
    headers += ["later s/round", "start cost s", "run s"]
    print(table(headers, rows))
    print("\nstart cost = round 1 - median of later rounds (process: spawn + worker imports)")
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
