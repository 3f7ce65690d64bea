"""gRPC many clients: FedAvg rounds with 1,000 connected clients on one server.

``start_server`` runs in this process; 40 client processes (``_grpc_bench_client.py``)
host 25 fedhive clients each (``start_numpy_client`` in one thread per client, one
connection each), whose fit returns ``parameters + 1`` on a 100-parameter float32 model.
(Fewer, fuller processes of thread-based clients measure the client harness instead of
the server: such a session costs 3-4 threads, and with 125 sessions per process on this
2-CPU machine replies lag the fits by seconds; try ``--procs 8 --sessions 125``.)
``--aio`` hosts the clients with ``start_clients`` instead: all sessions of a process
on one asyncio loop, so 4 processes of 250 clients (the ``--aio`` default) suffice.
Evaluation is off. The run has one phase per ``fraction_fit`` (1.0, then 0.1): a warm-up
round (for the first phase it includes waiting for all clients to connect), then the
measured rounds. Reported per phase: median seconds per round, rounds per minute, client
updates folded per second, this process's CPU seconds per round (``time.process_time``:
the server's asyncio loop, the engine and this script's memory sampler), and the server
process's peak RSS above the post-import baseline (sampled from /proc every 2 ms).

Run::

    .venv/bin/python benchmarks/grpc_many_clients.py           # 40 x 25 = 1,000 clients
    .venv/bin/python benchmarks/grpc_many_clients.py --quick   # 2 x 25 = 50 clients
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fedhive as fl
from _grpc_bench import (
    MB,
    ClientProcesses,
    RssSampler,
    machine_note,
    median,
    quiet_fedhive_logs,
    rss_bytes,
    table,
)
from fedhive.common.records import ndarrays_to_parameters
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

NUM_PARAMS = 100


@dataclass
class Phase:
    fraction: float
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    start_rss: int = 0
    peak_rss: int = 0


class PhaseRunner(RoundCallback):
    """Times every round; switches ``fraction_fit`` and resets the RSS peak between phases."""

    def __init__(
        self,
        strategy: fl.server.strategy.FedAvg,
        phases: list[Phase],
        rounds: int,
        sampler: RssSampler,
        total: int,
    ) -> None:
        self.strategy = strategy
        self.total = total
        self.phases = phases
        self.rounds = rounds
        self.sampler = sampler
        self.mark = (time.perf_counter(), time.process_time())
        self.final_value = 0.0

    def use(self, phase: Phase) -> None:
        # min_fit_clients too: round 1 must not size its sample before all have connected
        self.strategy.fraction_fit = phase.fraction
        self.strategy.min_fit_clients = max(1, int(self.total * phase.fraction))

    def on_run_start(self, engine: Engine) -> None:
        self.use(self.phases[0])

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        now = (time.perf_counter(), time.process_time())
        index, position = divmod(record["round"] - 1, 1 + self.rounds)
        phase = self.phases[index]
        if position == 0:  # the warm-up round: measure from its end
            phase.start_rss = self.sampler.reset()
        else:
            phase.times.append(now[0] - self.mark[0])
            phase.cpu.append(now[1] - self.mark[1])
            phase.clients.append(record["fit"]["num_results"])
            phase.failures += record["fit"].get("num_failures", 0)
            for failure in record.get("failures", []):
                reason = str(failure["reason"])[:120]
                phase.reasons[reason] = phase.reasons.get(reason, 0) + 1
        if position == self.rounds:  # the phase's last round
            phase.peak_rss = self.sampler.peak
            if index + 1 < len(self.phases):
                self.use(self.phases[index + 1])
        self.mark = (time.perf_counter(), time.process_time())

    def on_run_end(self, engine: Engine, history: History) -> None:
        self.final_value = float(engine.parameters.arrays[0][0])


def run(
    procs: int,
    sessions: int,
    rounds: int,
    fractions: list[float],
    sampler: RssSampler,
    staged: int = 2,
    heartbeat: float = 5.0,
    kind: str = "fedhive",
) -> tuple[list[Phase], float, float]:
    """(phases, seconds until every client was connected, warm-up seconds of phase 1)."""
    total = procs * sessions
    phases = [Phase(f) for f in fractions]
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=fractions[0],
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_available_clients=total,
        initial_parameters=ndarrays_to_parameters([np.zeros(NUM_PARAMS, np.float32)]),
    )
    runner = PhaseRunner(strategy, phases, rounds, sampler, total)
    manager = SimpleClientManager(wait_timeout=600.0)
    groups: list[ClientProcesses] = []
    connected: list[float] = []
    started_at: list[float] = []

    def watch() -> None:
        while manager.num_available() < total and started_at:
            if time.perf_counter() - started_at[0] > 600:
                return
            time.sleep(0.01)
        connected.append(time.perf_counter())

    def started(server: Any) -> None:
        started_at.append(time.perf_counter())
        address = f"127.0.0.1:{server.port}"
        args = ["--mode", "plus1", "--sessions", str(sessions), "--address", address]
        args += ["--heartbeat", str(heartbeat)]
        groups.append(ClientProcesses(kind, procs, *args))
        threading.Thread(target=watch, daemon=True).start()

    try:
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            config=fl.server.ServerConfig(
                num_rounds=len(fractions) * (1 + rounds), round_timeout=300.0
            ),
            strategy=strategy,
            client_manager=manager,
            max_staged_uploads=staged,
            heartbeat_timeout=max(30.0, 6 * heartbeat),  # 30 s: start_server's default
            callbacks=[runner],
            on_started=started,
        )
        groups[0].finish(timeout=300)
    finally:
        for group in groups:
            group.kill()
    got = [r["fit"]["num_results"] for r in history.rounds]
    if len(got) != len(fractions) * (1 + rounds) or min(got) < 1:
        raise RuntimeError(f"rounds incomplete: fit results per round {got}")
    if runner.final_value != len(got):  # every round adds 1 to the model
        raise RuntimeError(f"wrong model: {runner.final_value} after {len(got)} rounds")
    connect_s = connected[0] - started_at[0] if connected else float("nan")
    return phases, connect_s, history.rounds[0]["elapsed_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 25 = 50 clients, 2 rounds")
    parser.add_argument("--procs", type=int, default=None, help="client processes (default 40)")
    parser.add_argument("--sessions", type=int, default=None, help="clients per process (25)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per phase")
    parser.add_argument(
        "--fractions", default="1.0,0.1", help="fraction_fit of each phase (default 1.0,0.1)"
    )
    parser.add_argument(
        "--staged", type=int, default=2, help="start_server's max_staged_uploads (default 2)"
    )
    parser.add_argument(
        "--heartbeat", type=float, default=5.0, help="clients' heartbeat_interval (default 5 s)"
    )
    parser.add_argument(
        "--aio", action="store_true", help="clients on asyncio (start_clients), 4 x 250"
    )
    args = parser.parse_args(argv)
    quiet_fedhive_logs()
    procs = args.procs or (2 if args.quick else 4 if args.aio else 40)
    sessions = args.sessions or (25 if args.quick or not args.aio else 250)
    rounds = args.rounds or (2 if args.quick else 5)
    fractions = [float(f) for f in args.fractions.split(",")]
    total = procs * sessions
    note = machine_note()
    base = rss_bytes()
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    with RssSampler() as sampler:
        sampler.reset()
        phases, connect_s, first_round_s = run(
            procs, sessions, rounds, fractions, sampler, args.staged, args.heartbeat,
            "fedhive-aio" if args.aio else "fedhive",
        )  # fmt: skip
        run_peak = sampler.peak
    wall = time.perf_counter() - wall_start
    cpu_total = time.process_time() - cpu_start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    rows = []
    for phase in phases:
        secs = median(phase.times)
        per_round = int(median(phase.clients))
        rows.append(
            [
                f"fraction_fit={phase.fraction:g}",
                str(per_round),
                f"{secs:.3f}",
                f"{min(phase.times):.3f}-{max(phase.times):.3f}",
                f"{60 / secs:.1f}",
                f"{per_round / secs:.0f}",
                f"{median(phase.cpu):.3f}",
                f"{median(phase.cpu) / per_round * 1e3:.2f}",
                f"{(phase.peak_rss - base) / MB:.0f}",
                str(phase.failures),
            ]
        )
    print(
        f"gRPC many clients: {total:,} clients ({procs} processes x {sessions} sessions"
        f"{', start_clients on asyncio' if args.aio else ', a thread per client'}) on "
        f"127.0.0.1, FedAvg, {NUM_PARAMS} float32 params, evaluation off, "
        f"max_staged_uploads={args.staged}, heartbeat_interval={args.heartbeat:g} s"
    )
    print(f"1 warm-up + {rounds} measured rounds per phase, medians; {note}")
    print("(the machine is shared and runs the clients too: absolute times vary)\n")
    headers = [
        "phase",
        "clients/round",
        "s/round",
        "min-max s",
        "rounds/min",
        "updates/s",
        "server CPU s/round",
        "CPU ms/update",
        "peak RSS extra MB",
        "failures",
    ]
    print(table(headers, rows))
    for phase in phases:
        for reason, count in phase.reasons.items():
            print(f"failures at fraction_fit={phase.fraction:g} ({count}x): {reason}")
        print(
            f"fraction_fit={phase.fraction:g} per-round s: "
            + " ".join(f"{t:.3f}" for t in phase.times)
        )
    print(
        f"\nall {total:,} clients connected {connect_s:.1f} s after the server started; "
        f"round 1 (includes that wait) ended at {first_round_s:.1f} s"
    )
    print(
        f"whole run: {wall:.1f} s wall, server process CPU {cpu_total:.1f} s, peak RSS "
        f"{run_peak / MB:.0f} MB ({(run_peak - base) / MB:.0f} MB above the post-import "
        f"baseline of {base / MB:.0f} MB; ru_maxrss {maxrss / MB:.0f} MB)"
    )
    print(
        "\nserver CPU s/round = this process's CPU seconds per round; peak RSS extra = "
        "server-process RSS peak during the phase above the post-import baseline"
    )
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
