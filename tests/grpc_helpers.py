"""Running a real server (in a thread) and real client processes on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fedhive as fl

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
        paths[label].write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths
