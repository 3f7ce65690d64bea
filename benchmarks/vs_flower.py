"""fedhive side by side with Flower (``flwr[simulation]==1.42.0``): five workloads, one script.

Every workload runs ``--repeats`` times per framework (and fedhive backend), each run in a
fresh process, interleaved (fedhive's variants, then Flower, again), and each figure is the
median over the runs; Flower runs in a child process of its own virtual
environment (``--flower-python``; ``make flower-venv`` builds ``.venv-flower``), because
``flwr`` 1.42 pins ``protobuf<7`` and ``packaging<26``, which conflict with this project's
pins. Its side is ``_flower_side.py``; the sizes and the client training code both sides
run are in ``_vs_common.py``. Ratios are Flower / fedhive (above 1: fedhive is faster or
smaller).

1. ``overhead``: engine overhead per client-round and fixed start cost. A trivial client
   (returns the model it got, 10 float32), 100 clients all fit every round, 12 rounds,
   no evaluation. Per client-round = median round (rounds 2-12) / 100; fixed = the
   whole call - 12 x the median round (start, a slow first round, shutdown: Flower starts
   Ray while its first round waits, fedhive before its first round). fedhive: thread and Ray
   backends (2 workers); Flower: ``run_simulation`` (Ray, ``num_cpus=1`` per client).
   For fedhive on Ray, the child starts Ray itself (``ray.init``, which the backend joins)
   and stops it after, timed apart: "fixed beyond Ray's start/stop" is the fixed cost
   without them (Flower's column there is its whole fixed cost).
2. ``mlp``: 1,000 clients, 10% per round, the MNIST-1D MLP (40 -> 64 -> 10), one epoch
   (batch 8, lr 0.05) on 16 samples per client, in numpy on both sides (Flower's venv has
   no torch), 6 rounds: median round (rounds 2-6) and the peak RSS of the whole process
   tree (the driver, Ray's daemons and actors), sampled every 0.1 s.
3. ``aggregate``: FedAvg over 100 results of 1M float32: time and peak memory above the
   inputs (this process, sampled every 5 ms). Flower: ``FedAvg.aggregate_fit`` with the
   results as Flower hands them to a strategy (serialized parameters); fedhive: its
   Flower-style ``aggregate_fit`` and the streaming aggregator its engine folds replies
   into (``fit_aggregator``), which sums in float64 by default, and with the opt-in
   float32 accumulator (``accumulator = "model"``, ``streaming-f32``).
4. ``grpc``: a 100 MB model over gRPC with 4 client processes on 127.0.0.1; 1 warm-up + 3
   measured rounds; median round and the server's peak RSS above its post-import RSS.
   fedhive: ``grpc_round.py``'s fedhive path (``start_server``), with the defaults and
   "lean": the opt-in float32 accumulator (Flower's ``FedAvg`` also sums in the model's
   float32) and 1 MiB upload windows (``start_server(upload_window_bytes=1 << 20)``), and
   "stream": the defaults with ``data_plane=False`` (every byte through gRPC);
   Flower: its ``start_server``/``start_client``.
5. ``secagg``: SecAgg+ at n = 50, 1M parameters, trivial client; 1 warm-up + 2 measured
   rounds. fedhive: ``secure_aggregation={"degree": "complete"}`` (every other client
   holds a share; threshold from the threat model), thread backend; Flower:
   ``SecAggPlusWorkflow(num_shares=50, reconstruction_threshold=33)`` in ``run_simulation``.
   Each side keeps its own quantization defaults (fedhive 12 bits, clip 1; Flower 2^22
   levels, clip 8).

Run::

    nice -n 10 .venv/bin/python benchmarks/vs_flower.py --flower-python .venv-flower/bin/python
    ... --workloads overhead aggregate    # a subset
    ... --repeats 5                       # interleaved runs per side (default 3)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import signal
import statistics
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
    descendants,
    mlp_init,
    mlp_train,
)

HERE = Path(__file__).resolve().parent
MB = 1 << 20
WORKLOADS = ("overhead", "mlp", "aggregate", "grpc", "secagg")


# -- fedhive's side (each in a process of its own) -----------------------------------------


def _simulate(backend: str, rounds: int, **kwargs: Any) -> dict[str, Any]:
    from fedhive.simulation import start_simulation

    begin = time.perf_counter()
    ray_s = 0.0
    with RssSampler(tree=True, every=0.1) as memory:
        if backend == "ray":  # Ray's own start and stop, timed apart (as the backend would)
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray_s = time.perf_counter() - begin
        history = start_simulation(backend=backend, seed=0, num_workers=2, **kwargs)
        if backend == "ray":
            stop = time.perf_counter()
            ray.shutdown()
            ray_s += time.perf_counter() - stop
    total = time.perf_counter() - begin
    fits = [(r["fit"]["num_results"], r["fit"]["num_failures"]) for r in history.rounds]
    assert len(fits) == rounds and all(f == 0 for _, f in fits), fits
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in history.rounds]
    per_round = [b - a for a, b in itertools.pairwise(elapsed)]
    return {"rounds": per_round, "total_s": total, "ray_s": ray_s, "peak": memory.peak}


def fedhive_overhead(backend: str) -> dict[str, Any]:
    from fedhive.client import NumPyClient
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.server.config import ServerConfig
    from fedhive.server.strategy import FedAvg

    class Trivial(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return parameters, 1, {}

    return _simulate(
        backend,
        OVERHEAD_ROUNDS,
        client_fn=lambda context: Trivial(),
        num_clients=OVERHEAD_CLIENTS,
        config=ServerConfig(num_rounds=OVERHEAD_ROUNDS),
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(10, np.float32)]),
        ),
    )


_DATA: dict[str, np.ndarray] = {}  # the training set, loaded once per process


def _mlp_client_fn(context: Any) -> Any:
    from fedhive.client import NumPyClient

    if not _DATA:
        with np.load(os.environ["VS_FLOWER_MNIST1D"]) as data:
            _DATA.update(x=data["x"], y=data["y"])
    x_train, y_train = _DATA["x"], _DATA["y"]
    pid = int(context.node_config["partition-id"])
    rows = client_rows(pid, len(y_train))
    x, y = x_train[rows], y_train[rows]

    class Mlp(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return mlp_train(parameters, x, y, pid), len(y), {}

    return Mlp()


def fedhive_mlp(backend: str) -> dict[str, Any]:
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.server.config import ServerConfig
    from fedhive.server.strategy import FedAvg

    return _simulate(
        backend,
        MLP_ROUNDS,
        client_fn=_mlp_client_fn,
        num_clients=MLP_CLIENTS,
        config=ServerConfig(num_rounds=MLP_ROUNDS),
        strategy=FedAvg(
            fraction_fit=MLP_FRACTION,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters(mlp_init()),
        ),
    )


def fedhive_aggregate(mode: str) -> dict[str, Any]:
    from fedhive.common.records import Code, FitRes, Status, ndarrays_to_parameters
    from fedhive.server.client_manager import ClientProxy
    from fedhive.server.strategy import FedAvg

    rng = np.random.default_rng(0)
    results = [
        (
            ClientProxy(str(i)),
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters([rng.random(AGG_PARAMS, dtype=np.float32)]),
                1 + i,
                {},
            ),
        )
        for i in range(AGG_RESULTS)
    ]
    strategy = FedAvg()
    if mode.endswith("-f32"):
        strategy.accumulator = "model"  # sums in the model's float32, not float64
    initial = ndarrays_to_parameters([np.zeros(AGG_PARAMS, np.float32)])
    with RssSampler(tree=False, every=0.005) as memory:
        base = memory.now()
        wall, cpu = time.perf_counter(), time.process_time()
        if mode == "aggregate_fit":
            params, _ = strategy.aggregate_fit(1, results, [])
        else:
            aggregator = strategy.fit_aggregator(1, initial)
            for client, res in results:
                aggregator.add(client, res)
            params, _ = aggregator.finalize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert params is not None
    return {"wall_s": wall, "cpu_s": cpu, "peak_above": memory.peak - base, "base": base}


def fedhive_grpc(variant: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "grpc_round.py"),
            "--mb",
            str(GRPC_PARAMS * 4 / 1000000.0),
            "--rounds",
            str(GRPC_ROUNDS),
            "--clients",
            str(GRPC_CLIENTS),
            "--path",
            variant if variant in ("lean", "stream") else "fedhive",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rounds": result["times"], "peak_above": result["peak_rss"]}


def fedhive_secagg() -> dict[str, Any]:
    from fedhive.client import NumPyClient
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.server.config import ServerConfig
    from fedhive.server.strategy import FedAvg

    class Trivial(NumPyClient):
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return parameters, 1, {}

    out = _simulate(
        "thread",
        1 + SECAGG_ROUNDS,
        client_fn=lambda context: Trivial(),
        num_clients=SECAGG_CLIENTS,
        config=ServerConfig(num_rounds=1 + SECAGG_ROUNDS),
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=SECAGG_CLIENTS,
            min_available_clients=SECAGG_CLIENTS,
            initial_parameters=ndarrays_to_parameters([np.zeros(SECAGG_PARAMS, np.float32)]),
        ),
        secure_aggregation={"degree": "complete"},
    )
    out["rounds"] = out["rounds"][1:]
    return out


def fedhive_side(workload: str, variant: str) -> dict[str, Any]:
    if workload == "overhead":
        return fedhive_overhead(variant)
    if workload == "mlp":
        return fedhive_mlp(variant)
    if workload == "aggregate":
        return fedhive_aggregate(variant)
    if workload == "grpc":
        return fedhive_grpc(variant)
    return fedhive_secagg()


# -- the driver ----------------------------------------------------------------------------


def _child(argv: list[str], env: dict[str, str], timeout: float, tries: int = 2) -> dict[str, Any]:
    """Run one side; again if Ray's node missed its start or the run hung (then its whole
    process tree is stopped: a dead raylet leaves Flower's simulation waiting for ever)."""
    why = ""
    for _ in range(tries):
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in sorted(descendants(proc.pid), reverse=True):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate()
            why = f"no result within {timeout:g} s (stopped)"
            print(f"({shlex.join(argv[1:3])}: {why}; again)", flush=True)
            continue
        if proc.returncode == 0:
            return json.loads(out.strip().splitlines()[-1])
        why = err[-4000:]
        # Ray gives its node 30 s to start (fixed in Ray); a loaded machine can miss it
        if "timed out during startup" not in err:
            break
        print(f"({shlex.join(argv[1:3])}: Ray's node did not start in time; again)", flush=True)
    raise RuntimeError(f"{shlex.join(argv)} failed: {why}")


def _variants(workload: str) -> list[str]:
    return {
        "overhead": ["thread", "ray"],
        "mlp": ["thread", "ray"],
        "aggregate": ["aggregate_fit", "streaming", "streaming-f32"],
        "grpc": ["default", "lean", "stream"],
    }.get(workload, ["-"])


def _fixed(run: dict[str, Any]) -> float:
    """The call's time beyond its rounds at the steady rate: start, a slow first round
    (Flower starts Ray while its first round waits), shutdown."""
    return float(run["total_s"] - len(run["rounds"]) * statistics.median(run["rounds"][1:]))


#: Per workload: (key, label, format) of each figure of a row; smaller is better for all.
METRICS: dict[str, list[tuple[str, str, str]]] = {
    "overhead": [
        ("client_ms", "ms/client-round", "10.3f"),
        ("fixed_s", "s fixed", "8.2f"),
        ("beyond_ray_s", "s fixed beyond Ray's start/stop", "8.2f"),
    ],
    "mlp": [("round_s", "s/round", "8.3f"), ("peak_mb", "MB tree peak RSS", "8.0f")],
    "secagg": [("round_s", "s/round", "8.3f"), ("peak_mb", "MB tree peak RSS", "8.0f")],
    "grpc": [("round_s", "s/round", "8.3f"), ("peak_mb", "MB server peak above start", "8.0f")],
    "aggregate": [
        ("wall_s", "s wall", "8.3f"),
        ("cpu_s", "s CPU", "8.3f"),
        ("peak_mb", "MB peak above inputs", "8.0f"),
    ],
}


def _metrics(workload: str, run: dict[str, Any], flower: bool) -> dict[str, float]:
    """One run's figures (smaller is better for each)."""
    if workload == "overhead":
        client = 1000 * statistics.median(run["rounds"][1:]) / OVERHEAD_CLIENTS
        fixed = max(_fixed(run), 1e-3)
        # Flower starts Ray inside run_simulation: its figure stays the whole fixed cost
        beyond = fixed if flower else max(fixed - run["ray_s"], 1e-3)
        return {"client_ms": client, "fixed_s": fixed, "beyond_ray_s": beyond}
    if workload == "aggregate":
        peak = max(run["peak_above"], MB) / MB  # below 1 MB is sampling noise
        return {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_mb": peak}
    rounds = run["rounds"][1:] if workload == "mlp" else run["rounds"]
    if workload == "grpc":
        peak = run["peak"] - run["base"] if flower else run["peak_above"]
    else:
        peak = run["peak"]
    return {"round_s": statistics.median(rounds), "peak_mb": max(peak, MB) / MB}


def _rows(workload: str, runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """One row per side: the median of each figure over the repeats (its range in
    brackets when repeated), and for fedhive the ratios Flower / fedhive of the medians."""
    metrics = METRICS[workload]
    medians = {
        side: {key: statistics.median(r[key] for r in rs) for key, _, _ in metrics}
        for side, rs in runs.items()
    }
    out = []
    for side, rs in runs.items():
        cells = []
        for key, label, fmt in metrics:
            cell = f"{medians[side][key]:{fmt}} {label}"
            if len(rs) > 1:
                low, high = min(r[key] for r in rs), max(r[key] for r in rs)
                cell += f" [{low:.3g}-{high:.3g}]"
            cells.append(cell)
        row = f"{side:22} " + "  ".join(cells)
        if side != "flower":
            ratios = " ".join(
                f"{medians['flower'][key] / medians[side][key]:6.1f}x" for key, _, _ in metrics
            )
            row += f"   ratios {ratios}"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-python", default=".venv-flower/bin/python")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per side's run")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # fedhive child: workload
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(fedhive_side(args.side, args.variant)))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    flower_python = os.path.abspath(args.flower_python)  # a venv's python: no symlinks resolved
    env = dict(os.environ)
    lines = [
        "fedhive vs Flower 1.42.0 (flwr[simulation]); ratios = Flower / fedhive of the medians",
        f"{os.cpu_count()} cores; {args.repeats} interleaved runs per side (fedhive's variants,"
        " then Flower, repeated); medians, [min-max] over the runs",
        f"load average at start {_load()}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        from fedhive.data import load_mnist1d

        data = load_mnist1d(num_samples=4000, seed=0)
        env["VS_FLOWER_MNIST1D"] = str(Path(tmp) / "mnist1d.npz")
        np.savez(env["VS_FLOWER_MNIST1D"], x=data.x_train, y=data.y_train)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        flower_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        flower_env["PYTHONPATH"] = str(HERE)
        for workload in args.workloads:
            sides = ["fedhive " + v for v in _variants(workload)] + ["flower"]
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side in sides:
                    if side == "flower":
                        argv_ = [flower_python, str(HERE / "_flower_side.py"), workload]
                        raw = _child(argv_, flower_env, args.timeout)
                    else:
                        variant = side.split(" ", 1)[1]
                        argv_ = [sys.executable, __file__, "--side", workload, "--variant", variant]
                        raw = _child(argv_, env, args.timeout)
                    print(f"raw {workload} {side}: {json.dumps(raw)}", file=sys.stderr, flush=True)
                    runs[side].append(_metrics(workload, raw, side == "flower"))
            lines += ["", f"[{workload}] (load average after: {_load()})"]
            lines += _rows(workload, runs)
            print("\n".join(lines[-len(sides) - 2 :]), flush=True)
    lines += ["", f"load average at end {_load()}"]
    lines.append(f"reproduce: nice -n 10 .venv/bin/python {shlex.join(sys.argv)}")
    print("\n" + "\n".join(lines))


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
