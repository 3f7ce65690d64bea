"""Running a real server (in a thread) and real client processes on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fedhive as fl
from fedhive.common.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "apps" / "grpc_client.py"


class ServerThread:
    """``start_server`` in a thread; ``address`` once listening, ``history`` when done."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.history = None
        self.error: BaseException | None = None
        self.server = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        def started(server):
            self.server = server
            self._ready.set()

        try:
            self.history = fl.server.start_server(
                server_address="127.0.0.1:0", on_started=started, **self.kwargs
            )
        except BaseException as exc:  # handed to the test thread
            self.error = exc
            self._ready.set()

    def start(self) -> ServerThread:
        self.thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("the server did not finish")
        if self.error is not None:
            raise self.error
        return self.history


def client_process(address: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(
        [sys.executable, str(CLIENT), "--address", address, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs, timeout: float = 60.0) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out.append((proc.returncode, err))
    return out


def client_tls_args(certs: dict[str, Path]) -> list[str]:
    """The test client program's flags for mutual TLS with :func:`make_certificates`'s."""
    return [
        "--ca",
        str(certs["ca"]),
        "--cert",
        str(certs["client"]),
        "--key",
        str(certs["client_key"]),
    ]


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject, issuer, public, signer, *, ca=False, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = key()
    ca = build(
        name("fedhive test CA"), name("fedhive test CA"), ca_key.public_key(), ca_key, ca=True
    )
    server_key = key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = build(name("localhost"), ca.subject, server_key.public_key(), ca_key, san=san)
    client_key = key()
    client = build(name("client-0"), ca.subject, client_key.public_key(), ca_key)
    paths = {}
    for label, obj in (("ca", ca), ("server", server), ("client", client)):
        paths[label] = directory / f"{label}.pem"
        paths[label].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for label, k in (("server_key", server_key), ("client_key", client_key)):
        paths[label] = directory / f"{label}.pem"
        pem = k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(paths[label], pem, mode=0o600)  # private keys: owner only
    return paths


def engine_over_sessions(
    model,
    handler_for,
    nodes,
    *,
    rounds: int = 2,
    accumulator: str = "float64",
    chunk_bytes: int = 1 << 16,
    **server_kwargs,
):
    """``rounds`` FedAvg rounds of an ``Engine`` on a ``GrpcServer`` in this process, with
    one in-process ``ClientSession`` thread per node answering with ``handler_for(node)``.

    Returns ``(history, engine, staged)``: ``staged`` lists the byte size of every upload
    that took an in-memory staging slot.
    """
    from fedhive.common.records import ndarrays_to_parameters
    from fedhive.server import ServerConfig
    from fedhive.server.client_manager import SimpleClientManager
    from fedhive.server.engine import Engine
    from fedhive.server.strategy import FedAvg
    from fedhive.transport.grpc_client import ClientSecurity, ClientSession
    from fedhive.transport.grpc_server import GrpcServer
    from fedhive.transport.uploads import Staging as _Staging

    manager = SimpleClientManager(wait_timeout=20.0)
    server = GrpcServer(
        "127.0.0.1:0", client_manager=manager, chunk_bytes=chunk_bytes, **server_kwargs
    ).start()
    staged: list[tuple[int, int]] = []  # (bytes, slots held after taking it)
    take = _Staging._take

    def tracking_take(self: _Staging, nbytes: int) -> None:
        take(self, nbytes)
        staged.append((nbytes, self.held))

    _Staging._take = tracking_take
    try:
        for node in nodes:
            session = ClientSession(
                f"127.0.0.1:{server.port}",
                node,
                handler_for(node),
                security=ClientSecurity(insecure=True),
                chunk_bytes=chunk_bytes,
            )
            threading.Thread(target=session.run, daemon=True).start()
        strategy = FedAvg(min_fit_clients=len(nodes), min_available_clients=len(nodes),
                          fraction_evaluate=0.0,
                          initial_parameters=ndarrays_to_parameters(model))  # fmt: skip
        strategy.accumulator = accumulator
        config = ServerConfig(num_rounds=rounds, round_timeout=60)
        engine = Engine(strategy=strategy, transport=server, client_manager=manager,
                        config=config, ordered=False)  # fmt: skip
        history = engine.run()
    finally:
        _Staging._take = take
        server.finish_run()
    return history, engine, staged


def message_frames(message_id: str, pieces, chunk_bytes: int = 1 << 20):
    """MESSAGE frames carrying ``pieces`` (concatenated) in chunks of ``chunk_bytes``, as
    generated ``Frame`` objects (the transport sends ``message_frame_bytes``' bytes)."""
    from fedhive.transport.proto.fleet_pb2 import Frame
    from fedhive.transport.wire import message_frame_bytes

    for raw in message_frame_bytes(message_id, pieces, chunk_bytes):
        yield Frame.FromString(raw)


def secure_mean_round(num_clients: int, secure_aggregation: dict, extra: list[list[str]] = (),
                      timeout: float = 150, **server_kw):  # fmt: skip
    """One SecAgg+ round over gRPC: a FedAvg server whose centralized loss is the new
    model's mean, four client processes (``--pid 0..3``), the ``extra`` ones, and one that
    dies while training; the history once every process has ended."""
    from fedhive.common import ndarrays_to_parameters
    from fedhive.server import ServerConfig
    from fedhive.server.strategy import FedAvg

    server_kw.setdefault("wait_timeout", 30)
    server = ServerThread(
        config=ServerConfig(num_rounds=1, round_timeout=server_kw.pop("round_timeout", 60)),
        strategy=FedAvg(
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
            evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
        ),
        secure_aggregation=secure_aggregation,
        **server_kw,
    ).start()
    procs = [client_process(server.address, "--pid", str(i)) for i in range(4)]
    procs += [client_process(server.address, *args) for args in extra]
    procs.append(client_process(server.address, "--pid", "9", "--mode", "die"))
    history = server.join(timeout=timeout)
    finish(procs)
    return history
