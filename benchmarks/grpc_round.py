"""gRPC round: one FedAvg round of a 100 MB model with 4 client processes, against plain
grpcio and a raw TCP socket moving the same bytes.

All paths run on 127.0.0.1 in this script, one after the other, each with 4 fresh client
processes (``_grpc_bench_client.py``):

- fedhive: ``start_server`` (FedAvg, fraction_fit 1.0, evaluation off, no evaluate_fn) in
  this process; clients ``start_numpy_client`` whose fit returns the received parameters
  unchanged (num_examples 1). Per-round seconds are differences of ``History.rounds``
  ``elapsed_s``; 1 warm-up round (it includes the clients connecting) + N measured rounds
  in one ``start_server`` call. Every round re-sends the model, streams 4 uploads back,
  decodes, validates and folds them and finalizes the mean; the final model is checked
  to be bit-identical to the initial one. Run twice, each in a fresh process of this
  script: with the defaults, then "lean": FedAvg's opt-in float32 accumulator
  (``accumulator = "model"``) and a fixed 1 MiB gRPC flow-control window per client
  stream (``upload_window_bytes``) instead of gRPC's adaptive one, which on this busy
  loopback grows to several MB per client while the server's CPU is taken. Both use the
  data plane (``transport/bulk.py``: the 100 MB model and replies move on a side socket,
  the control on the gRPC stream); a third run, "stream only", passes
  ``data_plane=False`` so every byte goes through gRPC as before the data plane.
- plain grpcio: a minimal ``grpc.aio`` service (the server architecture fedhive uses) with
  raw-bytes (identity) serializers and one bidi stream per client: each round the server
  streams the model bytes to every client in 1 MiB chunks and each client streams them
  back; a round ends when all 4 uploads are received (no decoding, no aggregation).
- raw TCP: one socket per client; the server ``sendall``s the model, each client sends
  it back; a round ends when all 4 uploads are received.

Memory: the server process's RSS is sampled from /proc every 2 ms; reported is the peak
above the RSS just before the path starts, including the model the server holds, as a
multiple of the model size. Each fedhive path runs in a process of its own, so its start
is the post-import baseline; plain grpcio and raw TCP run afterwards in this process.
Uploads of 64 MiB or more are staged on disk as they arrive (``spill_bytes``) and read
back a part at a time, so the server holds the model and the aggregate (float64: 2x the
model; float32: 1x) plus gRPC's and the allocator's buffers (measured at about 17 MB plus
4 MB per connected client with a 1 MB model) and what clients have sent into their
flow-control windows. Client processes report their own peak RSS (VmHWM).

Run::

    .venv/bin/python benchmarks/grpc_round.py           # 100 MB model, 1 + 5 rounds per path
    .venv/bin/python benchmarks/grpc_round.py --quick   # 10 MB model, 2 clients, 1 + 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc import aio

import fedhive as fl
from _grpc_bench import (
    MB,
    MIB,
    RAW_OPTIONS,
    RAW_SERVICE,
    SIZE,
    ClientProcesses,
    RssSampler,
    machine_note,
    median,
    quiet_fedhive_logs,
    rss_bytes,
    status,
    table,
)
from fedhive.common.records import NDArrays, ndarrays_to_parameters
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

NUM_ARRAYS = 5
TARGET_RATIO = 1.3
TARGET_MEMORY_X = 3.0
CHUNK = MIB  # fedhive's DEFAULT_CHUNK_BYTES, used by the grpcio baseline too
LEAN_WINDOW = MIB  # start_server's upload_window_bytes in the lean fedhive path


@dataclass
class PathResult:
    name: str
    times: list[float]
    cpu: list[float]  # this (server) process's CPU seconds per round
    start_rss: int
    peak_rss: int
    clients: list[dict[str, Any]] = field(default_factory=list)

    @property
    def extra(self) -> int:
        return self.peak_rss - self.start_rss


def make_model(num_params: int) -> NDArrays:
    rng = np.random.default_rng(0)
    sizes = [num_params // NUM_ARRAYS] * NUM_ARRAYS
    sizes[-1] += num_params - sum(sizes)
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


# -- fedhive -------------------------------------------------------------------------------


class _Recorder(RoundCallback):
    """This process's CPU time at the end of every round, and the final model."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.arrays: NDArrays = []

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.cpu.append(time.process_time())

    def on_run_end(self, engine: Engine, history: History) -> None:
        self.arrays = list(engine.parameters.arrays)


def run_fedhive(
    num_params: int,
    clients: int,
    rounds: int,
    sampler: RssSampler,
    start_rss: int,
    staged: int = 2,
    lean: bool = False,
    stream: bool = False,
) -> PathResult:
    final = _Recorder()
    procs: list[ClientProcesses] = []

    def started(server: Any) -> None:
        procs.append(ClientProcesses("fedhive", clients, "--address", f"127.0.0.1:{server.port}"))

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        # the server holds the only copy: the check below regenerates the model
        initial_parameters=ndarrays_to_parameters(make_model(num_params)),
    )
    if lean:
        strategy.accumulator = "model"
    try:
        history = fl.server.start_server(
            server_address="127.0.0.1:0",
            config=fl.server.ServerConfig(num_rounds=1 + rounds, round_timeout=600.0),
            strategy=strategy,
            wait_timeout=120.0,
            max_staged_uploads=staged,
            upload_window_bytes=LEAN_WINDOW if lean else None,
            data_plane=not stream,
            callbacks=[final],
            on_started=started,
        )
        peak = sampler.peak
        reports = procs[0].finish()
    finally:
        for group in procs:
            group.kill()
    results = [r["fit"]["num_results"] for r in history.rounds]
    if results != [clients] * (1 + rounds):
        raise RuntimeError(f"fedhive rounds incomplete: fit results per round {results}")
    expected = make_model(num_params)
    if not all(np.array_equal(a, b) for a, b in zip(final.arrays, expected, strict=True)):
        raise RuntimeError("fedhive's final model differs from the echoed one")
    elapsed = [r["elapsed_s"] for r in history.rounds]
    times = [b - a for a, b in itertools.pairwise(elapsed)]
    cpu = [b - a for a, b in itertools.pairwise(final.cpu)]
    name = (
        "fedhive, float32 accumulator, 1 MiB windows"
        if lean
        else "fedhive, stream only (data_plane=False)"
        if stream
        else "fedhive start_server + FedAvg"
    )
    return PathResult(name, times, cpu, start_rss, peak, reports)


# -- plain grpcio --------------------------------------------------------------------------


class RawStreamServer:
    """A grpc.aio server streaming raw bytes: one bidi stream per client, rounds on demand."""

    def __init__(self, payload: bytes, clients: int) -> None:
        self.payload = payload
        self.clients = clients
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._outboxes: list[asyncio.Queue[bool]] = []
        self._joined = threading.Semaphore(0)
        self._uploads = threading.Semaphore(0)
        self._server: aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> RawStreamServer:
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
        outbox: asyncio.Queue[bool] = asyncio.Queue()
        self._outboxes.append(outbox)
        self._joined.release()
        reader = asyncio.get_running_loop().create_task(self._read(context))
        try:
            payload, total = self.payload, len(self.payload)
            while await outbox.get():
                await context.write(SIZE.pack(total))
                for start in range(0, total, CHUNK):
                    await context.write(payload[start : start + CHUNK])
        finally:
            reader.cancel()

    async def _read(self, context: aio.ServicerContext) -> None:
        buffer: bytearray | None = None
        filled = 0
        while (message := await context.read()) is not aio.EOF:
            if buffer is None:
                (total,) = SIZE.unpack(message)
                buffer, filled = bytearray(total), 0
                continue
            buffer[filled : filled + len(message)] = message
            filled += len(message)
            if filled == len(buffer):
                buffer = None
                self._uploads.release()

    def wait_for_clients(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(self.clients):
            if not self._joined.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RuntimeError("plain grpcio: the clients did not connect")

    def round(self) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) of one round."""
        start, cpu = time.perf_counter(), time.process_time()

        def go() -> None:
            for outbox in self._outboxes:
                outbox.put_nowait(True)

        self._loop.call_soon_threadsafe(go)
        for _ in range(self.clients):
            if not self._uploads.acquire(timeout=600):
                raise RuntimeError("plain grpcio: an upload did not arrive")
        return time.perf_counter() - start, time.process_time() - cpu

    def close(self) -> None:
        def end() -> None:
            for outbox in self._outboxes:
                outbox.put_nowait(False)

        self._loop.call_soon_threadsafe(end)
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(5.0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def run_grpcio(num_params: int, clients: int, rounds: int, sampler: RssSampler) -> PathResult:
    start_rss = sampler.reset()
    payload = b"".join(a.tobytes() for a in make_model(num_params))
    server = RawStreamServer(payload, clients).start()
    group = ClientProcesses("grpcio-stream", clients, "--address", f"127.0.0.1:{server.port}")
    try:
        server.wait_for_clients()
        measured = [server.round() for _ in range(1 + rounds)][1:]
        peak = sampler.peak
        server.close()
        reports = group.finish()
    finally:
        group.kill()
    times, cpu = [t for t, _ in measured], [c for _, c in measured]
    return PathResult("plain grpcio (aio, raw bytes)", times, cpu, start_rss, peak, reports)


# -- raw TCP -------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("a TCP client closed mid-message")
        got += n


def run_tcp(num_params: int, clients: int, rounds: int, sampler: RssSampler) -> PathResult:
    start_rss = sampler.reset()
    payload = b"".join(a.tobytes() for a in make_model(num_params))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    group = ClientProcesses("tcp", clients, "--address", f"127.0.0.1:{port}")
    done: list[threading.Semaphore] = []
    starts: list[threading.Semaphore] = []
    errors: list[BaseException] = []

    def serve(conn: socket.socket, go: threading.Semaphore, finished: threading.Semaphore) -> None:
        try:
            with conn:
                for _ in range(1 + rounds):
                    go.acquire()
                    conn.sendall(SIZE.pack(len(payload)))
                    conn.sendall(payload)
                    header = bytearray(SIZE.size)
                    _recv_exact(conn, memoryview(header))
                    buffer = bytearray(SIZE.unpack(header)[0])
                    _recv_exact(conn, memoryview(buffer))
                    del buffer
                    finished.release()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            finished.release()

    try:
        listener.settimeout(120)
        threads = []
        for _ in range(clients):
            conn, _ = listener.accept()
            go, finished = threading.Semaphore(0), threading.Semaphore(0)
            starts.append(go)
            done.append(finished)
            threads.append(threading.Thread(target=serve, args=(conn, go, finished)))
            threads[-1].start()
        times, cpu = [], []
        for _ in range(1 + rounds):
            start, cpu_start = time.perf_counter(), time.process_time()
            for go in starts:
                go.release()
            for finished in done:
                finished.acquire()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            if errors:
                raise RuntimeError(f"raw TCP failed: {errors[0]!r}")
        peak = sampler.peak
        for thread in threads:
            thread.join()
        reports = group.finish()
    finally:
        listener.close()
        group.kill()
    return PathResult("raw TCP socket", times[1:], cpu[1:], start_rss, peak, reports)


# -- report --------------------------------------------------------------------------------


def fedhive_in_own_process(path: str, argv: list[str] | None, base: int) -> PathResult:
    """Run one fedhive path in a fresh process of this script; RSS relative to ``base``."""
    args = list(sys.argv[1:] if argv is None else argv)
    done = subprocess.run(
        [sys.executable, __file__, *args, "--path", path], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {path} path failed:\n{done.stderr}")
    result = PathResult(**json.loads(done.stdout.strip().splitlines()[-1]))
    result.start_rss += base
    result.peak_rss += base
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 MB model, 1 + 2 rounds, 2 clients")
    parser.add_argument("--mb", type=float, default=None, help="model MB (default 100; quick 10)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 5)")
    parser.add_argument("--clients", type=int, default=None, help="default 4 (--quick: 2)")
    parser.add_argument(
        "--staged", type=int, default=2, help="start_server's max_staged_uploads (default 2)"
    )
    parser.add_argument("--path", choices=["fedhive", "lean", "stream"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_fedhive_logs()
    model_mb = args.mb or (10.0 if args.quick else 100.0)
    rounds = args.rounds or (2 if args.quick else 5)
    num_params = int(model_mb * MB) // 4
    model_bytes = num_params * 4
    clients = args.clients or (2 if args.quick else 4)
    note = machine_note()
    base = rss_bytes()  # post-import baseline
    if args.path:  # one fedhive path, in a process of its own
        with RssSampler() as sampler:
            result = run_fedhive(
                num_params, clients, rounds, sampler, sampler.reset(), args.staged,
                lean=args.path == "lean", stream=args.path == "stream",
            )  # fmt: skip
        result.start_rss -= base
        result.peak_rss -= base
        print(json.dumps(dataclasses.asdict(result)))
        return 0

    fed, lean, stream = (
        fedhive_in_own_process(path, argv, base) for path in ("fedhive", "lean", "stream")
    )
    with RssSampler() as sampler:
        plain = run_grpcio(num_params, clients, rounds, sampler)
        tcp = run_tcp(num_params, clients, rounds, sampler)

    grpc_s = median(plain.times)
    moved = 2 * clients * model_bytes
    time_rows, memory_rows = [], []
    for path in (fed, lean, stream, plain, tcp):
        is_fed = path in (fed, lean, stream)
        secs = median(path.times)
        ratio = secs / grpc_s
        time_rows.append(
            [
                path.name,
                f"{secs:.3f}",
                f"{min(path.times):.3f}-{max(path.times):.3f}",
                f"{moved / secs / MB:.0f}",
                f"{median(path.cpu):.3f}",
                f"{sum(r.get('cpu_s', 0.0) for r in path.clients) / (len(path.times) + 1):.3f}",
                f"{ratio:.2f}x",
                f"<= {TARGET_RATIO}x" if is_fed else "-",
                status(ratio, TARGET_RATIO) if is_fed else "-",
            ]
        )
        x_model = path.extra / model_bytes
        client_rss = max((r.get("peak_rss_mb", 0.0) for r in path.clients), default=0.0)
        memory_rows.append(
            [
                path.name,
                f"{(path.start_rss - base) / MB:.0f}",
                f"{path.extra / MB:.0f}",
                f"{x_model:.2f}x",
                f"<= {TARGET_MEMORY_X:.0f}x" if is_fed else "-",
                status(x_model, TARGET_MEMORY_X) if is_fed else "-",
                f"{client_rss:.0f}",
            ]
        )
    print(
        f"gRPC round: {clients} client processes on 127.0.0.1, model {model_bytes / MB:.1f} MB "
        f"({num_params:,} float32 in {NUM_ARRAYS} arrays), {CHUNK // MIB} MiB chunks, "
        f"fedhive max_staged_uploads={args.staged}"
    )
    print(f"1 warm-up + {rounds} measured rounds per path, medians; {note}")
    print("(the machine is shared: absolute times vary, the same-run ratios are what to compare)\n")
    headers = [
        "path",
        "s/round",
        "min-max s",
        "MB/s",
        "server CPU s",
        "clients CPU s",
        "ratio",
        "target",
        "status",
    ]
    print(table(headers, time_rows))
    print(
        f"\nMB/s = {2 * clients} x model moved per round / s; server CPU s = this process's CPU "
        "seconds per round; clients CPU s = all client processes' CPU seconds over the path / its "
        "rounds (warm-up included, their start too); ratio = s/round / plain grpcio s/round\n"
    )
    headers = [
        "path",
        "start MB",
        "peak extra MB",
        "x model",
        "target",
        "status",
        "client peak RSS MB",
    ]
    print(table(headers, memory_rows))
    print(
        f"\npeak extra = server-process RSS peak (sampled every 2 ms) above the RSS at path start;"
        f"\nstart MB = path-start RSS above the post-import baseline ({base / MB:.0f} MB; fedhive "
        "paths: their own process's); client peak RSS = max VmHWM of the client processes"
    )
    print(f"\nfedhive per-round s: {' '.join(f'{t:.3f}' for t in fed.times)}")
    print(f"fedhive lean per-round s: {' '.join(f'{t:.3f}' for t in lean.times)}")
    print(f"fedhive stream-only per-round s: {' '.join(f'{t:.3f}' for t in stream.times)}")
    print(f"plain grpcio per-round s: {' '.join(f'{t:.3f}' for t in plain.times)}")
    print(f"raw TCP per-round s: {' '.join(f'{t:.3f}' for t in tcp.times)}")
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
