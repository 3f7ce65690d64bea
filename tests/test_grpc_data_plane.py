"""The data plane (transport/bulk.py): large tasks and replies on a side socket.

Real servers and clients on 127.0.0.1: client processes for the round trips, clients in
threads where a test makes one of them misbehave. The model is 12 MB of float32 small
integers (over the 8 MiB threshold), so every mean is exact and checked with ``==``.

This file is also the client program: ``python test_grpc_data_plane.py --address ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedhive as fl
from fedhive.client.start import _constant, _node_handler
from fedhive.common import ndarrays_to_parameters
from fedhive.common.errors import TransportError
from fedhive.common.records import NDArrays, Scalar
from fedhive.server import ServerConfig
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.engine import Engine
from fedhive.server.history import History
from fedhive.server.strategy import FedAvg
from fedhive.transport import bulk
from fedhive.transport.bulk import DOWNLOAD, MAGIC, UPLOAD, Refused
from fedhive.transport.data_link import DataLink
from fedhive.transport.frames import BufferPool
from fedhive.transport.grpc_client import ClientSecurity, ClientSession
from fedhive.transport.grpc_server import GrpcServer, ServerSecurity
from fedhive.transport.proto.fleet_pb2 import Frame
from grpc_helpers import client_tls_args, finish, make_certificates

NUM = 3_000_000  # 12 MB of float32


def model(offset: float = 0.0) -> NDArrays:
    pattern = np.arange(-500, 500, dtype=np.float32) + np.float32(offset)
    return [np.resize(pattern, (NUM - 1000,)), np.resize(pattern, (1000,))]


class Plus(fl.client.NumPyClient):
    """Returns the model plus ``delta`` (weight 1)."""

    def __init__(self, delta: float) -> None:
        self.delta = delta

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return [p + np.float32(self.delta) for p in parameters], 1, {}


def serve(n: int, **kwargs: Any) -> tuple[GrpcServer, SimpleClientManager]:
    manager = SimpleClientManager(wait_timeout=30.0)
    server = GrpcServer("127.0.0.1:0", client_manager=manager, **kwargs).start()
    return server, manager


def run(
    server: GrpcServer, manager: SimpleClientManager, n: int, rounds: int, step: float
) -> tuple[History, dict[int, bool]]:
    """``rounds`` of FedAvg over ``n`` clients; whether each new model is the old + step."""
    exact: dict[int, bool] = {}

    def evaluate(rnd: int, arrays: NDArrays, cfg: dict[str, Scalar]) -> None:
        if rnd > 0:
            want = model(step * rnd)
            exact[rnd] = all(np.array_equal(a, w) for a, w in zip(arrays, want, strict=True))

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        evaluate_fn=evaluate,
        initial_parameters=ndarrays_to_parameters(model()),
    )
    engine = Engine(
        strategy=strategy,
        transport=server,
        client_manager=manager,
        config=ServerConfig(num_rounds=rounds, round_timeout=60.0),
        seed=0,
        ordered=False,
    )
    return engine.run(), exact


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def ready(server: GrpcServer, n: int) -> None:
    """Wait until ``n`` clients are connected and every one of them reached the data plane."""
    wait_for(lambda: len(server._connections) == n)
    wait_for(lambda: all(c.bulk for c in list(server._connections.values())))


def spawn(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--address", address, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def session(cls: type[ClientSession], server: GrpcServer, delta: float, **kwargs: Any) -> Any:
    node = f"{cls.__name__.lower()}-{delta:g}"
    handle = _node_handler(_constant(Plus(delta).to_client()), (), node)
    security = kwargs.pop("security", ClientSecurity(insecure=True))
    return cls(f"127.0.0.1:{server.port}", node, handle, security=security, **kwargs)


def one_round(
    server: GrpcServer, manager: SimpleClientManager, n: int, step: float, threads: list[Any]
) -> tuple[History, dict[int, bool]]:
    """:func:`run` for one round once ``n`` clients reached the data plane; then the
    server ends the run and the client ``threads`` are joined."""
    try:
        ready(server, n)
        return run(server, manager, n, rounds=1, step=step)
    finally:
        server.finish_run()
        for thread in threads:
            thread.join(10)


def in_thread(*sessions: Any) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, daemon=True) for s in sessions]
    for thread in threads:
        thread.start()
    return threads


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raw_request(port: int, payload: bytes, read: int = 4096) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        out = b""
        while len(out) < read:
            try:
                chunk = sock.recv(read - len(out))
            except ConnectionResetError:  # the peer hung up without reading it all
                break
            if not chunk:
                break
            out += chunk
        return out


# -- round trips ----------------------------------------------------------------------------


def test_large_tasks_and_replies_move_on_the_data_plane_bit_for_bit() -> None:
    server, manager = serve(2)
    procs = [spawn(f"127.0.0.1:{server.port}", "--delta", str(d)) for d in (2, 6)]
    try:
        ready(server, 2)
        history, exact = run(server, manager, 2, rounds=2, step=4.0)
    finally:
        server.finish_run()
        results = finish(procs, timeout=30)
    assert [code for code, _ in results] == [0, 0], results
    assert exact == {1: True, 2: True}
    counts = server._data.transfers if server._data else {}
    assert (counts["probe"], counts["download"], counts["upload"]) == (2, 4, 4)
    # what History counts is what moved on the data plane (the messages, byte for byte)
    assert sum(r["bytes_up"] for r in history.rounds if "fit" in r) == counts["upload_bytes"]
    assert sum(r["bytes_down"] for r in history.rounds if "fit" in r) == counts["download_bytes"]


def test_without_the_data_plane_everything_stays_on_the_stream() -> None:
    server, manager = serve(2, data_plane=False)
    assert server.data_port == 0 and server._data is None
    threads = in_thread(session(ClientSession, server, 2), session(ClientSession, server, 6))
    try:
        wait_for(lambda: len(server._connections) == 2)
        _, exact = run(server, manager, 2, rounds=1, step=4.0)
    finally:
        server.finish_run()
    assert exact == {1: True}
    for thread in threads:
        thread.join(10)


def no_certificate(context: ssl.SSLContext, port: int) -> None:
    """Ask the data plane for something over TLS without a client certificate."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(MAGIC + b"P" + bytes(48))
        if not sock.recv(1):
            raise OSError("closed")


def test_mutual_tls_and_tokens_cover_the_data_plane(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    read = {k: v.read_bytes() for k, v in certs.items()}
    security = ServerSecurity(
        (read["ca"], read["server"], read["server_key"]),
        require_client_auth=True,
        tokens={"alice": "a-secret", "bob": "b-secret"},
    )
    server, manager = serve(2, security=security)
    tls = client_tls_args(certs)
    procs = [
        spawn(
            f"127.0.0.1:{server.port}",
            "--delta",
            "2",
            "--node-id",
            "alice",
            "--token",
            "a-secret",
            *tls,
        ),
        spawn(
            f"127.0.0.1:{server.port}",
            "--delta",
            "6",
            "--node-id",
            "bob",
            "--token",
            "b-secret",
            *tls,
        ),
    ]
    try:
        ready(server, 2)
        port = server.data_port
        # the data port speaks TLS only: plaintext gets nothing back
        assert raw_request(port, MAGIC + b"P" + bytes(48)) == b""
        # and under mutual TLS a peer without a client certificate gets no service
        context = ssl.create_default_context(cadata=read["ca"].decode())
        with pytest.raises((ssl.SSLError, OSError)):
            no_certificate(context, port)
        _, exact = run(server, manager, 2, rounds=1, step=4.0)
    finally:
        server.finish_run()
        results = finish(procs, timeout=30)
    assert [code for code, _ in results] == [0, 0], results
    assert exact == {1: True}
    counts = server._data.transfers if server._data else {}
    assert (counts["download"], counts["upload"]) == (2, 2)


def test_clients_on_one_event_loop_use_the_data_plane() -> None:
    server, manager = serve(2)
    proc = spawn(f"127.0.0.1:{server.port}", "--aio", "--delta", "4")
    try:
        ready(server, 2)
        _, exact = run(server, manager, 2, rounds=1, step=4.0)
    finally:
        server.finish_run()
        results = finish([proc], timeout=30)
    assert [code for code, _ in results] == [0], results
    assert exact == {1: True}
    counts = server._data.transfers if server._data else {}
    assert (counts["download"], counts["upload"]) == (2, 2)


# -- hostile peers and failures -------------------------------------------------------------


class Greedy(ClientSession):
    """Fetches its task, then tries the same ticket once more."""

    second: str = ""

    def data_frame(self, frame: Any) -> Any:
        task = super().data_frame(frame)
        if frame.kind == Frame.BULK and self.link is not None:
            try:
                self.link.fetch(frame.token, frame.total_size, 1 << 40, BufferPool(max_free=0))
            except Refused as exc:
                self.second = str(exc)
        return task


class Oversized(ClientSession):
    """Declares a 1 TiB upload on the data plane, then sends its reply on the stream."""

    refusal: str = ""

    def upload(self, reply: Any, pieces: Any) -> bool:
        assert self.link is not None
        token = self.link.uploads.pop(reply.metadata.reply_to)
        try:
            with contextlib.closing(
                self.link._open(UPLOAD, token, struct.pack("<Q", 1 << 40))
            ) as sock:
                bulk._read_status(sock)
        except Refused as exc:
            self.refusal = str(exc)
        return False


class Walled(ClientSession):
    """Cannot reach the data port (a firewall): large messages must use the stream."""

    def offered(self, welcome: Any) -> str | None:
        token = super().offered(welcome)
        assert self.link is not None
        self.link.port = closed_port()
        return token


class CutUploads(DataLink):
    def _open(self, op: bytes, token: str, extra: bytes = b"") -> Any:
        if op == UPLOAD:
            raise ConnectionResetError("the link went down")
        return super()._open(op, token, extra)


class Fallback(ClientSession):
    """Its data-plane uploads fail: the reply goes on the stream instead."""

    def offered(self, welcome: Any) -> str | None:
        token = super().offered(welcome)
        assert self.link is not None
        self.link.__class__ = CutUploads
        return token


def test_hostile_data_plane_peers_are_refused_and_the_round_is_exact() -> None:
    server, manager = serve(5, hello_timeout=1.0)
    port = server.data_port
    # garbage, an unknown ticket, silence: each refused (with its reason) or cut off
    assert raw_request(port, b"GET / HTTP/1.1\r\n" + bytes(60))[:1] == b"\x01"
    reply = raw_request(port, MAGIC + DOWNLOAD + bytes(48))
    assert reply[:1] == b"\x01" and b"unknown or used ticket" in reply
    started = time.monotonic()
    assert raw_request(port, b"") == b""  # said nothing: closed after hello_timeout
    assert time.monotonic() - started < 5
    sessions = [
        session(Greedy, server, 2),
        session(Oversized, server, 4),
        session(Walled, server, 6),
        session(Fallback, server, 8),
        session(ClientSession, server, 10, data_plane=False),
    ]
    threads = in_thread(*sessions)
    try:
        wait_for(lambda: len(server._connections) == 5)
        # the three that reach the data plane have said so; the walled one cannot
        wait_for(lambda: sum(c.bulk for c in list(server._connections.values())) == 3)
        history, exact = run(server, manager, 5, rounds=1, step=6.0)
    finally:
        server.finish_run()
    for thread in threads:
        thread.join(10)
    assert exact == {1: True}  # every reply was folded, whichever way it came
    assert history.rounds[-1]["fit"]["num_results"] == 5
    greedy, oversized = sessions[0], sessions[1]
    assert "unknown or used ticket" in greedy.second  # a ticket works once
    assert "over the limit" in oversized.refusal
    counts = server._data.transfers if server._data else {}
    # downloads: greedy, oversized, fallback; uploads: greedy only
    assert (counts["probe"], counts["download"], counts["upload"]) == (3, 3, 1)
    data = [r["reason"] for r in server.refusals if r["stage"] == "data"]
    assert any("not a fedhive data-plane request" in r for r in data)
    assert any("over the limit" in r for r in data)


class Slow(fl.client.NumPyClient):
    """``Plus`` that trains for ``seconds`` first."""

    def __init__(self, delta: float, seconds: float) -> None:
        self.plus, self.seconds = Plus(delta), seconds

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> Any:
        time.sleep(self.seconds)
        return self.plus.fit(parameters, config)


class Trickler(ClientSession):
    """Opens its data-plane upload at once, sends 1,000 bytes of it, and then only waits."""

    ended: str = ""

    def upload(self, reply: Any, pieces: Any) -> bool:
        assert self.link is not None
        token = self.link.uploads.pop(reply.metadata.reply_to)
        size = sum(len(p) for p in pieces)
        try:
            with contextlib.closing(
                self.link._answered(UPLOAD, token, struct.pack("<Q", size))
            ) as sock:
                sock.sendall(bytes(1000))
                sock.settimeout(30.0)
                bulk._read_status(sock)  # until the server ends the transfer
        except (OSError, Refused) as exc:
            self.ended = str(exc)
        return True  # not on the stream either


def test_a_stalled_data_plane_upload_gives_its_slot_up_when_another_waits() -> None:
    # a client that opened its 12 MB upload and stopped held the staging slot, and the
    # honest reply waited behind it until the round timed out
    server, manager = serve(2, upload_grace_s=1.0, max_staged_uploads=1)
    node = "honest-6"
    handle = _node_handler(_constant(Slow(6.0, 1.5).to_client()), (), node)
    honest = ClientSession(f"127.0.0.1:{server.port}", node, handle,
                           security=ClientSecurity(insecure=True))  # fmt: skip
    trickler = session(Trickler, server, 10.0)
    dropped: list[str] = []

    def trickle() -> None:
        try:
            trickler.run()
        except TransportError as exc:  # disconnected, as it should be
            dropped.append(str(exc))

    threads = [*in_thread(honest), threading.Thread(target=trickle, daemon=True)]
    threads[-1].start()
    started = time.monotonic()
    history, exact = one_round(server, manager, 2, 6.0, threads)
    assert time.monotonic() - started < 30  # not the round timeout (60 s)
    assert exact == {1: True}  # the honest reply, and only it, was folded
    fit = history.rounds[-1]["fit"]
    assert (fit["num_results"], fit["num_failures"]) == (1, 1)
    reasons = [r["reason"] for r in server.refusals]
    assert sum("too slow while others waited" in r for r in reasons) == 1, reasons
    assert len(dropped) == 1 and "RESOURCE_EXHAUSTED" in dropped[0], dropped
    assert "too slow" in trickler.ended  # told why on the data plane too


class Quitter(ClientSession):
    """Hangs up in the middle of fetching its task."""

    def data_frame(self, frame: Any) -> Any:
        if frame.kind != Frame.BULK or self.link is None:
            return super().data_frame(frame)
        with contextlib.closing(self.link._open(DOWNLOAD, frame.token)) as sock:
            bulk._read_status(sock)
            sock.recv(1000)
        return None


def test_a_client_that_breaks_off_a_download_fails_only_its_own_task() -> None:
    server, manager = serve(2)
    sessions = [session(Quitter, server, 2), session(ClientSession, server, 6)]
    history, _ = one_round(server, manager, 2, 6.0, in_thread(*sessions))
    fit = history.rounds[-1]["fit"]
    assert (fit["num_results"], fit["num_failures"]) == (1, 1)
    reasons = [str(f) for f in history.rounds[-1].get("failures", [])]
    assert any("data plane" in r for r in reasons), reasons


def test_a_client_whose_probe_finds_the_data_plane_busy_tries_again() -> None:
    server, manager = serve(1, max_handshakes=1, hello_timeout=3.0)
    squatter = socket.create_connection(("127.0.0.1", server.data_port))  # the only slot
    try:
        wait_for(lambda: server._data is not None and server._data._slots._value == 0)
        threads = in_thread(session(ClientSession, server, 4))
        ready(server, 1)  # turned away while the squatter held the slot, then let in
        _, exact = run(server, manager, 1, rounds=1, step=4.0)
    finally:
        squatter.close()
        server.finish_run()
    for thread in threads:
        thread.join(10)
    assert exact == {1: True}
    counts = server._data.transfers if server._data else {}
    assert (counts["probe"], counts["download"], counts["upload"]) == (1, 1, 1)
    assert counts["busy"] >= 1


def test_a_data_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match="could not bind the data port"):
            GrpcServer("127.0.0.1:0", data_port=port).start()


# -- the client program ---------------------------------------------------------------------


def client_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--delta", type=float, default=2.0)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--token", default="")
    parser.add_argument("--ca", default=None)
    parser.add_argument("--cert", default=None)
    parser.add_argument("--key", default=None)
    parser.add_argument("--aio", action="store_true", help="two nodes on one event loop")
    args = parser.parse_args()
    if args.aio:  # deltas delta - 2 and delta + 2: their mean is delta
        fl.client.start_clients(
            server_address=args.address,
            client_fn=lambda context: Plus(
                args.delta + (2.0 if context.node_id.endswith("-1") else -2.0)
            ).to_client(),
            node_ids=["aio-0", "aio-1"],
            insecure=True,
            max_retries=5,
        )
        return 0
    tls: dict[str, Any] = {"insecure": True}
    if args.ca:
        tls = {
            "root_certificates": Path(args.ca).read_bytes(),
            "certificate_chain": Path(args.cert).read_bytes(),
            "private_key": Path(args.key).read_bytes(),
        }
    fl.client.start_client(
        server_address=args.address,
        client=Plus(args.delta).to_client(),
        node_id=args.node_id,
        auth_token=args.token,
        max_retries=5,
        **tls,
    )
    return 0


if __name__ == "__main__":
    sys.exit(client_main())
