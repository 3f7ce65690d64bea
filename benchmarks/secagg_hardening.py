"""What the SecAgg+ hardening costs: the same round on the unhardened and the hardened code.

The issue 13 target: at n = 100 clients x 1M parameters with the default degree, the
hardened protocol (threshold and neighbour checks, every consistency signature verified,
the graph derived from every client's committed randomness in ``secagg.graph``) costs at
most 10% more than the unhardened one, on the client and on the server.

Each side is a source tree (``--side NAME=SRC``, the folder holding ``fedhive``); each
run is a fresh process that imports that tree and runs ``start_simulation`` (thread
backend, one worker, seed 0, trivial client compute as in ``benchmarks/secagg.py``:
``fit`` returns the model plus a per-client constant) for one warm-up round and
``--rounds`` timed rounds, with and without 10% of the clients dropping in ``fit``
(after sharing their keys, the costly case). The sides run in interleaved repeated
sets (side order rotated each set), so slow spells of a shared machine fall on every
side alike; the table gives medians over the sets and, per set, the ratio of each side
to the first (the baseline), then the median of those ratios.

What is measured, per timed round:

- **client CPU/update**: CPU seconds (``time.thread_time``) of the client worker thread
  inside the client app (a first mod around everything: SecAgg+ mod, ``fit``), summed
  over all messages of the round, divided by the masked updates (survivors);
- **client mod/update**: the SecAgg+ mod's own ``timings`` parts (wall seconds), summed
  over clients, per update, and the part for the graph stage (``graph``) alone;
- **server CPU/round**: CPU seconds of the server thread inside the fit round.

The code before the hardening also predates the per-message byte accounting (``bytes_up``
and ``bytes_down`` in History, which came with compression); the side ``src:no-bytes``
runs today's code with that accounting switched off, so that against ``before`` only the
hardening differs.

Run (from the repository root; ``before`` is a checkout of the unhardened code)::

    git archive 5f7a2ad src | tar -x -C /some/dir/before
    nice -n 10 .venv/bin/python benchmarks/secagg_hardening.py \\
        --side before=/some/dir/before/src --side after=src --side hardening=src:no-bytes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

DROP_FRACTION = 0.1
TARGET = 1.10  # hardened / unhardened, client and server


# -- one run, in a worker process that imports one side's fedhive --------------------------


def worker(
    n: int, params: int, drop: float, rounds: int, pinned: bool, count_bytes: bool = True
) -> dict[str, Any]:
    import random

    import numpy as np

    if not count_bytes:  # this side leaves out the byte accounting (see --side)
        from fedhive.transport.inprocess import InProcessTransport

        InProcessTransport.wire_bytes = lambda self, message: 0  # type: ignore[method-assign]

    from fedhive.client import NumPyClient
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.secagg import SecAggPlusMod, SecAggPlusWorkflow
    from fedhive.secagg import primitives as p
    from fedhive.server.config import ServerConfig
    from fedhive.server.strategy import FedAvg
    from fedhive.simulation import start_simulation

    class Bench(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.delta = np.float32(0.001 * (1 + pid % 7))
            self.num = 1 + pid % 10

        def fit(self, parameters, config):
            return [p + self.delta for p in parameters], self.num, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    dropped = {str(i) for i in random.Random(7).sample(range(n), round(n * drop))}
    cpu: dict[int, float] = defaultdict(float)
    lock = threading.Lock()

    def meter(message, context, call_next):
        start = time.thread_time()
        try:
            return call_next(message, context)
        finally:
            with lock:
                cpu[message.metadata.server_round] += time.thread_time() - start

    def dropout(message, context, call_next):
        if message.metadata.message_type == "fit" and context.node_id in dropped:
            raise ConnectionError("benchmark dropout")
        return call_next(message, context)

    timings: dict[str, float] = {}
    secagg: Any = SecAggPlusMod(timings=timings)
    if pinned:  # every client pins every enrolled identity (the malicious-server model)
        identities = {str(i): p.new_identity() for i in range(n)}
        peers = {node: p.identity_public(secret) for node, secret in identities.items()}
        mods = {
            node: SecAggPlusMod(trusted_identities=peers, identity=secret, timings=timings)
            for node, secret in identities.items()
        }

        def secagg(message, context, call_next):
            return mods[context.node_id](message, context, call_next)

    parts: dict[int, dict[str, float]] = {}
    server_cpu: dict[int, float] = {}
    inner = SecAggPlusWorkflow(bits=12, clip=1.0)

    def workflow(driver) -> None:
        before, start = dict(timings), time.thread_time()
        try:
            inner(driver)
        finally:
            server_cpu[driver.server_round] = time.thread_time() - start
            parts[driver.server_round] = {
                k: v - before.get(k, 0.0) for k, v in dict(timings).items()
            }

    rng = np.random.default_rng(0)
    big = params * 6 // 10
    shapes = [
        (big // 100, 100),
        (params * 3 // 10,),
        (params - big // 100 * 100 - params * 3 // 10,),
    ]
    model = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    history = start_simulation(
        client_fn=lambda context: Bench(int(context.node_config["partition-id"])),
        num_clients=n,
        strategy=FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(model),
        ),
        config=ServerConfig(num_rounds=1 + rounds),
        backend="thread",
        num_workers=1,
        seed=0,
        mods=[meter, dropout, secagg],
        fit_workflow=workflow,
    )
    records = {int(r["round"]): r for r in history.rounds if r.get("round", 0) >= 1}
    timed = range(2, 2 + rounds)
    updates = [int(records[r]["fit"]["num_results"]) for r in timed]
    if any(u != n - len(dropped) for u in updates):
        raise RuntimeError(f"rounds with {updates} results, {n - len(dropped)} expected")
    secagg = records[1 + rounds]["fit"]["secagg"]
    return {
        "client_cpu": [cpu[r] / u for r, u in zip(timed, updates, strict=True)],
        "client_mod": [sum(parts[r].values()) / u for r, u in zip(timed, updates, strict=True)],
        "client_graph": [
            parts[r].get("graph", 0.0) / u for r, u in zip(timed, updates, strict=True)
        ],
        "server_cpu": [server_cpu[r] for r in timed],
        "k": secagg.get("degree"),
        "t": secagg.get("threshold"),
        "graph": secagg.get("graph", "server-drawn"),
        "load": os.getloadavg()[0],
    }


# -- the driver: interleaved sets ------------------------------------------------------------


def run_side(
    src: str, n: int, params: int, drop: float, rounds: int, pinned: bool
) -> dict[str, Any]:
    src, _, option = src.partition(":")
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    cmd = [sys.executable, __file__, "--worker", str(n), str(params), str(drop), str(rounds)]
    cmd.append("pinned" if pinned else "unpinned")
    cmd.append("no-bytes" if option == "no-bytes" else "bytes")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({src}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--side",
        action="append",
        required=True,
        help="NAME=SRC[:no-bytes]; the first is the baseline; ':no-bytes' runs that side "
        "without the per-message byte accounting, which the code before the hardening lacks",
    )
    add("--clients", type=int, default=100)
    add("--params", type=int, default=1_000_000)
    add("--rounds", type=int, default=2, help="timed rounds per run, after one warm-up")
    add("--sets", type=int, default=3, help="interleaved repeated sets of runs")
    add("--no-drop", action="store_true", help="only the row without dropouts")
    add("--pinned", action="store_true", help="clients pin each other's identity keys")
    add("--out", help="write the table here as well")
    args = parser.parse_args(argv)
    sides = [tuple(s.split("=", 1)) for s in args.side]
    drops = [0.0] if args.no_drop else [0.0, DROP_FRACTION]
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    began = time.perf_counter()
    results: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for s in range(args.sets):
        for drop in drops:
            order = sides[s % len(sides) :] + sides[: s % len(sides)]
            for name, src in order:
                res = run_side(src, args.clients, args.params, drop, args.rounds, args.pinned)
                results[(drop, name)].append(res)
                print(
                    f"set {s + 1} drop {drop:.0%} {name}: client CPU "
                    f"{statistics.median(res['client_cpu']):.4f} s/update, server CPU "
                    f"{statistics.median(res['server_cpu']):.2f} s, load {res['load']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    minutes = (time.perf_counter() - began) / 60
    load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    say(
        f"SecAgg+ hardening cost: n={args.clients} x P={args.params:,} parameters, default "
        f"degree, bits=12, clip=1.0; {args.sets} interleaved sets x {args.rounds} timed rounds; "
        + ("identities pinned (malicious-server model)" if args.pinned else "identities not pinned")
    )
    say(f"machine: {os.cpu_count()} CPUs; load average {load_start} at start, {load_end} at end")
    say(
        f"(1/5/15 min); whole benchmark {minutes:.1f} min; sides: "
        + ", ".join(f"{name} = {src}" for name, src in sides)
    )
    base = sides[0][0]
    metrics = [
        ("client_cpu", "client CPU s/update"),
        ("client_mod", "client mod s/update"),
        ("client_graph", "  of which graph"),
        ("server_cpu", "server CPU s/round"),
    ]
    for drop in drops:
        say()
        say(f"{'no dropouts' if not drop else f'{drop:.0%} drop after sharing keys'}")
        header = f"{'metric':24}" + "".join(f"{name:>16}" for name, _ in sides)
        say(header)
        for key, label in metrics:
            row = f"{label:24}"
            for name, _ in sides:
                med = statistics.median(v for r in results[(drop, name)] for v in r[key])
                row += f"{med:>16.4f}"
            say(row)
        for name, _ in sides:
            runs = results[(drop, name)]
            load = "/".join(f"{r['load']:.1f}" for r in runs)
            say(
                f"  {name}: k={runs[0]['k']} t={runs[0]['t']} graph {runs[0]['graph']}; "
                f"load (1 min) at the end of each run {load}"
            )
        for key, label in (("client_cpu", "client CPU"), ("server_cpu", "server CPU")):
            for name, _ in sides[1:]:
                ratios = [
                    statistics.median(a[key]) / statistics.median(b[key])
                    for a, b in zip(results[(drop, name)], results[(drop, base)], strict=True)
                ]
                med = statistics.median(ratios)
                verdict = "within" if med <= TARGET else "ABOVE"
                say(
                    f"{label} {name}/{base} per set: "
                    + " ".join(f"{x:.3f}" for x in ratios)
                    + f"   median {med:.3f} ({verdict} the {TARGET:.2f}x target)"
                )
    say()
    say("reproduce: " + " ".join(["benchmarks/secagg_hardening.py", *(argv or sys.argv[1:])]))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        n, params, drop, rounds, pins, count = sys.argv[2:8]
        result = worker(int(n), int(params), float(drop), int(rounds), pins == "pinned",
                        count_bytes=count != "no-bytes")  # fmt: skip
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
