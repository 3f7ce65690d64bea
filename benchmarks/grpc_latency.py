"""gRPC latency: a small-model FedAvg round over gRPC, against plain grpcio unary calls.

Both paths use 4 client processes on 127.0.0.1 (``_grpc_bench_client.py``) holding a
100-parameter float32 model whose fit returns ``parameters + 1``:

- fedhive: ``start_server`` (FedAvg, fraction_fit 1.0, evaluation off, no evaluate_fn) in
  this process, clients ``start_numpy_client``. ms/round are differences of
  ``History.rounds`` ``elapsed_s`` after some warm-up rounds (the first one includes the
  clients connecting). A round is configure -> send 4 tasks over the clients' streams ->
  4 replies -> validate and fold -> new model.
- plain grpcio: each client process serves a unary raw-bytes ``Fit`` (grpc.server);
  this process sends the model's bytes to all 4 at once (``future()`` calls) and averages
  the 4 replies in float64, so a round is the same 4 request/response exchanges.
- plain grpcio streams (for reference, fedhive's shape): a ``grpc.aio`` server in a
  thread pushes the model's bytes down one long-lived raw-bytes bidi stream per client;
  each client (a sync stream fed by a queue, as fedhive's) answers with model + 1.

Run::

    .venv/bin/python benchmarks/grpc_latency.py           # 5 warm-up + 50 measured rounds
    .venv/bin/python benchmarks/grpc_latency.py --quick   # 2 clients, 2 warm-up + 10 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import queue
import shlex
import statistics
import sys
import threading
import time
from typing import Any

import grpc
import numpy as np
from grpc import aio

import fedhive as fl
from _grpc_bench import (
    RAW_OPTIONS,
    RAW_SERVICE,
    RAW_UNARY_METHOD,
    ClientProcesses,
    machine_note,
    median,
    quiet_fedhive_logs,
    status,
    table,
)
from fedhive.common.records import NDArrays, ndarrays_to_parameters
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

NUM_PARAMS = 100
TARGET_MS = 10.0


class _Recorder(RoundCallback):
    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.arrays: NDArrays = []

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.cpu.append(time.process_time())

    def on_run_end(self, engine: Engine, history: History) -> None:
        self.arrays = list(engine.parameters.arrays)


def run_fedhive(clients: int, warmup: int, rounds: int) -> tuple[list[float], list[float]]:
    """(seconds per measured round, this process's CPU seconds per measured round)."""
    recorder = _Recorder()
    groups: list[ClientProcesses] = []

    def started(server: Any) -> None:
        groups.append(
            ClientProcesses(
                "fedhive", clients, "--mode", "plus1", "--address", f"127.0.0.1:{server.port}"
            )
        )

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(NUM_PARAMS, np.float32)]),
    )
    try:
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            config=fl.server.ServerConfig(num_rounds=warmup + rounds, round_timeout=60.0),
            strategy=strategy,
            wait_timeout=60.0,
            callbacks=[recorder],
            on_started=started,
        )
        groups[0].finish()
    finally:
        for group in groups:
            group.kill()
    total = warmup + rounds
    results = [r["fit"]["num_results"] for r in history.rounds]
    if results != [clients] * total or float(recorder.arrays[0][0]) != total:
        raise RuntimeError(f"fedhive run incomplete or wrong: fit results per round {results}")
    elapsed = [r["elapsed_s"] for r in history.rounds]
    times = [b - a for a, b in itertools.pairwise(elapsed)][warmup - 1 :]
    cpu = [b - a for a, b in itertools.pairwise(recorder.cpu)][warmup - 1 :]
    return times, cpu


def run_grpcio_unary(clients: int, warmup: int, rounds: int) -> tuple[list[float], list[float]]:
    group = ClientProcesses("grpcio-unary", clients, stdin=True)
    channels: list[grpc.Channel] = []
    try:
        ports = [int(group.readline(i).split()[1]) for i in range(clients)]
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}", options=RAW_OPTIONS) for p in ports]
        stubs = [
            c.unary_unary(RAW_UNARY_METHOD, request_serializer=None, response_deserializer=None)
            for c in channels
        ]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=60)
        params = np.zeros(NUM_PARAMS, np.float32)
        times, cpu = [], []
        for _ in range(warmup + rounds):
            start, cpu_start = time.perf_counter(), time.process_time()
            request = params.tobytes()
            futures = [stub.future(request, timeout=60) for stub in stubs]
            acc = np.zeros(NUM_PARAMS, np.float64)
            for future in futures:
                acc += np.frombuffer(future.result(), dtype=np.float32)
            params = (acc / clients).astype(np.float32)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        if float(params[0]) != warmup + rounds:
            raise RuntimeError("plain grpcio computed a wrong model")
        for channel in channels:
            channel.close()
        group.finish()
    finally:
        for channel in channels:
            channel.close()
        group.kill()
    return times[warmup:], cpu[warmup:]


class PingPongServer:
    """grpc.aio in a thread, one raw-bytes bidi stream per client (fedhive's shape)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._outboxes: list[asyncio.Queue[bytes | None]] = []
        self._joined = threading.Semaphore(0)
        self._replies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._server: aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> PingPongServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(30)
        return self

    async def _open(self) -> None:
        server = aio.server(options=RAW_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(self._stream)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(RAW_SERVICE, {"Stream": handler})]
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def _stream(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._outboxes.append(outbox)
        self._joined.release()
        reader = asyncio.get_running_loop().create_task(self._read(context))
        try:
            while (message := await outbox.get()) is not None:
                await context.write(message)
        finally:
            reader.cancel()

    async def _read(self, context: aio.ServicerContext) -> None:
        while (message := await context.read()) is not aio.EOF:
            self._replies.put(message)

    def exchange(self, request: bytes) -> list[bytes]:
        """Send ``request`` to every client; their replies, as they come."""

        def send() -> None:
            for outbox in self._outboxes:
                outbox.put_nowait(request)

        self._loop.call_soon_threadsafe(send)
        return [self._replies.get(timeout=60) for _ in range(self.clients)]

    def wait_for_clients(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(self.clients):
            if not self._joined.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RuntimeError("plain grpcio stream: the clients did not connect")

    def close(self) -> None:
        def end() -> None:
            for outbox in self._outboxes:
                outbox.put_nowait(None)

        self._loop.call_soon_threadsafe(end)
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(5.0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def run_grpcio_stream(clients: int, warmup: int, rounds: int) -> tuple[list[float], list[float]]:
    server = PingPongServer(clients).start()
    group = ClientProcesses("grpcio-pingpong", clients, "--address", f"127.0.0.1:{server.port}")
    try:
        server.wait_for_clients()
        params = np.zeros(NUM_PARAMS, np.float32)
        times, cpu = [], []
        for _ in range(warmup + rounds):
            start, cpu_start = time.perf_counter(), time.process_time()
            acc = np.zeros(NUM_PARAMS, np.float64)
            for reply in server.exchange(params.tobytes()):
                acc += np.frombuffer(reply, dtype=np.float32)
            params = (acc / clients).astype(np.float32)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        if float(params[0]) != warmup + rounds:
            raise RuntimeError("plain grpcio stream computed a wrong model")
        server.close()
        group.finish()
    finally:
        group.kill()
    return times[warmup:], cpu[warmup:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 warm-up + 10 measured rounds, 2 clients"
    )
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 5)")
    parser.add_argument("--clients", type=int, default=None, help="default 4 (--quick: 2)")
    args = parser.parse_args(argv)
    quiet_fedhive_logs()
    rounds = args.rounds or (10 if args.quick else 50)
    warmup = max(1, args.warmup or (2 if args.quick else 5))
    clients = args.clients or (2 if args.quick else 4)
    note = machine_note()

    fed, fed_cpu = run_fedhive(clients, warmup, rounds)
    plain, plain_cpu = run_grpcio_unary(clients, warmup, rounds)
    stream, stream_cpu = run_grpcio_stream(clients, warmup, rounds)

    rows = []
    for name, times, cpu in (
        ("fedhive start_server + FedAvg", fed, fed_cpu),
        ("plain grpcio unary (4 futures)", plain, plain_cpu),
        ("plain grpcio bidi streams (aio)", stream, stream_cpu),
    ):
        ms = median(times) * 1e3
        deciles = statistics.quantiles(times, n=10)
        is_fed = name.startswith("fedhive")
        rows.append(
            [
                name,
                f"{ms:.2f}",
                f"{deciles[0] * 1e3:.2f}",
                f"{deciles[-1] * 1e3:.2f}",
                f"{median(cpu) * 1e3:.2f}",
                f"{median(times) / median(plain):.2f}x",
                f"<= {TARGET_MS:.0f}" if is_fed else "-",
                status(ms, TARGET_MS) if is_fed else "-",
            ]
        )
    print(
        f"gRPC latency: {clients} client processes on 127.0.0.1, {NUM_PARAMS} float32 params, "
        f"fit returns params + 1; {warmup} warm-up + {rounds} measured rounds per path"
    )
    print(f"{note}")
    print("(the machine is shared: absolute times vary, the same-run ratio is what to compare)\n")
    headers = [
        "path",
        "median ms",
        "p10 ms",
        "p90 ms",
        "server CPU ms",
        "ratio",
        "target ms",
        "status",
    ]
    print(table(headers, rows))
    print(
        "\nms = wall time of one round; server CPU ms = this process's CPU per round "
        "(median); ratio = median / plain grpcio median"
    )
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
