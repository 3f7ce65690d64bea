"""Client processes for the gRPC benchmarks; run by ``_grpc_bench.ClientProcesses``.

Kinds:

- ``fedhive``: ``--sessions`` fedhive clients (``start_numpy_client``, one thread and one
  connection each). ``--mode echo``: fit returns the received parameters unchanged with
  num_examples 1; ``--mode plus1``: parameters + 1.
- ``grpcio-stream``: the plain-grpcio baseline of grpc_round.py: one bidi stream of raw
  bytes; every model received (an 8-byte size, then chunks) is streamed back in chunks.
- ``grpcio-pingpong``: one bidi stream of raw bytes; each message is a float32 model,
  answered with model + 1 (grpc_latency.py's stream baseline: fedhive's shape).
- ``tcp``: the same as ``grpcio-stream`` over a raw TCP socket.
- ``grpcio-unary``: serves a unary raw-bytes ``Fit`` (float32 params + 1) on 127.0.0.1,
  prints ``port N`` and serves until stdin closes (grpc_latency.py's baseline).

Each process ends by printing one JSON line: its peak RSS and CPU time.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from _grpc_bench import (
    MIB,
    RAW_OPTIONS,
    RAW_SERVICE,
    RAW_STREAM_METHOD,
    SIZE,
    quiet_fedhive_logs,
)

if TYPE_CHECKING:
    import grpc

# Each kind imports only what it uses (numpy, grpc, fedhive): client processes start faster.


def _bench_client(mode: str) -> Any:
    import fedhive as fl
    from fedhive.common.records import NDArrays, Scalar

    class BenchClient(fl.client.NumPyClient):
        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            if mode == "echo":
                return parameters, 1, {}
            return [p + 1 for p in parameters], 1, {}

        def evaluate(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[float, int, dict[str, Scalar]]:
            return 0.0, 1, {}

    return BenchClient()


def run_fedhive(args: argparse.Namespace) -> None:
    import fedhive as fl

    quiet_fedhive_logs()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            fl.client.start_numpy_client(
                server_address=args.address,
                client=_bench_client(args.mode),
                insecure=True,
                node_id=f"p{args.index}-s{i}",
                max_retries=20,
                chunk_bytes=args.chunk_bytes,
                heartbeat_interval=args.heartbeat,
            )
        except BaseException as exc:  # reported below, after every session ended
            errors.append(exc)

    if args.sessions == 1:
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed, first: {errors[0]!r}")


def run_fedhive_aio(args: argparse.Namespace) -> None:
    """``--sessions`` fedhive clients on one asyncio loop (``start_clients``)."""
    import fedhive as fl

    quiet_fedhive_logs()
    fl.client.start_clients(
        server_address=args.address,
        client_fn=lambda context: _bench_client(args.mode).to_client(),
        node_ids=[f"p{args.index}-s{i}" for i in range(args.sessions)],
        insecure=True,
        max_retries=20,
        chunk_bytes=args.chunk_bytes,
        heartbeat_interval=args.heartbeat,
    )


def run_grpcio_stream(args: argparse.Namespace) -> None:
    import grpc

    channel = grpc.insecure_channel(args.address, options=RAW_OPTIONS)
    call = channel.stream_stream(
        RAW_STREAM_METHOD, request_serializer=None, response_deserializer=None
    )
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    buffer: bytearray | None = None
    filled = 0
    try:
        for message in call(requests()):
            if buffer is None:
                (total,) = SIZE.unpack(message)
                buffer, filled = bytearray(total), 0
                continue
            buffer[filled : filled + len(message)] = message
            filled += len(message)
            if filled == len(buffer):
                view = memoryview(buffer)
                outbox.put(SIZE.pack(len(buffer)))
                for start in range(0, len(buffer), args.chunk_bytes):
                    outbox.put(bytes(view[start : start + args.chunk_bytes]))
                view.release()
                buffer = None
    finally:
        outbox.put(None)
        channel.close()


def run_grpcio_pingpong(args: argparse.Namespace) -> None:
    """One bidi stream; every message is a float32 model, answered at once with model + 1."""
    import grpc
    import numpy as np

    channel = grpc.insecure_channel(args.address, options=RAW_OPTIONS)
    call = channel.stream_stream(
        RAW_STREAM_METHOD, request_serializer=None, response_deserializer=None
    )
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    try:
        for message in call(requests()):
            outbox.put((np.frombuffer(message, dtype=np.float32) + 1).tobytes())
    finally:
        outbox.put(None)
        channel.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False if the peer closed before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("the server closed mid-message")
        got += n
    return True


def run_tcp(args: argparse.Namespace) -> None:
    host, port = args.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        header = bytearray(SIZE.size)
        while _recv_exact(sock, memoryview(header)):
            (total,) = SIZE.unpack(header)
            buffer = bytearray(total)
            _recv_exact(sock, memoryview(buffer))
            sock.sendall(header)
            sock.sendall(buffer)


def run_grpcio_unary(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import numpy as np

    def fit(request: bytes, context: grpc.ServicerContext) -> bytes:
        return (np.frombuffer(request, dtype=np.float32) + 1).tobytes()

    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=RAW_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(fit)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(RAW_SERVICE, {"Fit": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    sys.stdin.read()  # serve until the benchmark closes our stdin
    server.stop(None)


def peak_rss_bytes() -> int:
    """VmHWM: unlike ru_maxrss, it does not count the parent's pages from before exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


RUNNERS = {
    "fedhive": run_fedhive,
    "fedhive-aio": run_fedhive_aio,
    "grpcio-stream": run_grpcio_stream,
    "grpcio-pingpong": run_grpcio_pingpong,
    "tcp": run_tcp,
    "grpcio-unary": run_grpcio_unary,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(RUNNERS))
    parser.add_argument("--address", default="")
    parser.add_argument("--index", type=int, default=0, help="this process's number")
    parser.add_argument("--mode", choices=("echo", "plus1"), default="echo")
    parser.add_argument("--sessions", type=int, default=1, help="fedhive clients in this process")
    parser.add_argument("--chunk-bytes", type=int, default=MIB)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="fedhive heartbeat s")
    args = parser.parse_args()
    start = time.perf_counter()
    RUNNERS[args.kind](args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report: dict[str, Any] = {
        "peak_rss_mb": peak_rss_bytes() / 1e6,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
