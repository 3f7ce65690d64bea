"""A client's side of the data plane (:mod:`fedhive.transport.bulk`): where it is, how
to speak TLS to it, and the fetches and uploads of large messages."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from fedhive.common.errors import TransportError
from fedhive.transport.bulk import (
    _HEAD,
    _OK,
    _SIZE,
    DOWNLOAD,
    MAGIC,
    PROBE,
    UPLOAD,
    Refused,
    _NotAnswered,
    _pem_paths,
    _raise_refusal,
    _read_status,
    _recv,
    _recv_exact,
    split_host,
)
from fedhive.transport.frames import BufferPool

if TYPE_CHECKING:
    from fedhive.transport.grpc_client import ClientSecurity

__all__ = ["DataLink", "client_tls"]

log = logging.getLogger("fedhive.transport")
T = TypeVar("T")


def client_tls(security: ClientSecurity) -> ssl.SSLContext | None:
    """The data plane's TLS for a client with ``security``: the server is checked as its
    gRPC channel checks it (these roots, else the system's; the host name)."""
    if security.insecure:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if security.root_certificates is not None:
        context.load_verify_locations(cadata=security.root_certificates.decode("ascii"))
    else:
        context.load_default_certs()
    if security.certificate_chain is not None and security.private_key is not None:
        with _pem_paths(security.certificate_chain, security.private_key) as (cert, key):
            context.load_cert_chain(cert, key)
    return context


class DataLink:
    """A client's side of the data plane: where it is, how to speak TLS to it, and the
    upload tickets the stream has handed out (task id -> ticket)."""

    def __init__(
        self,
        address: str,
        port: int,
        security: ClientSecurity,
        timeout: float = 60.0,
        upload_wait: float = 600.0,
    ) -> None:
        self.host = split_host(address)
        self.port = port
        self.tls = client_tls(security)
        self.timeout = timeout
        self.upload_wait = upload_wait  # for a staging slot on a busy server
        self.uploads: dict[str, str] = {}
        self.ready = False

    def _open(self, op: bytes, token: str, extra: bytes = b"") -> socket.socket:
        """A connection to the data port that has asked for ``op`` with ``token``."""
        try:
            ticket = bytes.fromhex(token)
        except ValueError:
            ticket = b""
        if len(ticket) != 48:
            raise TransportError("the server sent a malformed data-plane ticket")
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_hostname=self.host)
            sock.sendall(_HEAD.pack(MAGIC, op, ticket[:16], ticket[16:]) + extra)
        except BaseException:
            raw.close()
            raise
        return sock

    def probe(self, token: str, waits: Sequence[float] = (0.5, 1.0, 2.0)) -> bool:
        """Redeem the WELCOME's ticket: whether this client can use the data plane
        (tried again after each of ``waits`` while a busy server turns it away)."""
        try:
            self._tried(lambda: self._answered(PROBE, token).close(), waits)
        except Refused as exc:
            log.info("the server refused this client's data-plane probe: %s", exc)
            return False
        except (OSError, TransportError) as exc:
            log.info(
                "the server's data port %s:%d is not reachable (%s); large messages go on "
                "the gRPC stream",
                self.host,
                self.port,
                exc,
            )
            return False
        self.ready = True
        return True

    def fetch(self, token: str, total_size: int, max_bytes: int, pool: BufferPool) -> memoryview:
        """The bytes of a task announced by a BULK frame of ``total_size`` bytes."""
        if total_size > max_bytes:
            raise TransportError(f"a task of {total_size} bytes is over the limit of {max_bytes}")
        return self._tried(lambda: self._fetch(token, total_size, pool))

    @staticmethod
    def _tried(call: Callable[[], T], waits: Sequence[float] = (0.2, 1.0)) -> T:
        """``call()``, tried again after each of ``waits`` while the server closes the
        connection without an answer (busy: at most so many transfers at once)."""
        for wait in waits:
            try:
                return call()
            except _NotAnswered:
                time.sleep(wait)
        return call()

    def _answered(self, op: bytes, token: str, extra: bytes = b"") -> socket.socket:
        """A connection whose request the server has taken (its first status was ok);
        :class:`_NotAnswered` when it closed without a word (busy), :class:`Refused`
        with its reason."""
        try:
            sock = self._open(op, token, extra)
        except OSError as exc:
            raise _NotAnswered(str(exc)) from None
        try:
            if op == UPLOAD:
                sock.settimeout(self.upload_wait)  # the server may wait for a staging slot
            try:
                first = sock.recv(1)
            except OSError as exc:
                raise _NotAnswered(str(exc)) from None
            if not first:
                raise _NotAnswered("the data plane closed the connection (busy?)")
            if first != _OK:
                _raise_refusal(sock)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _upload(self, token: str, size: int, pieces: Sequence[bytes | memoryview]) -> None:
        with contextlib.closing(self._answered(UPLOAD, token, _SIZE.pack(size))) as sock:
            for piece in pieces:
                sock.sendall(piece)
            sock.settimeout(self.upload_wait)
            _read_status(sock)

    def _fetch(self, token: str, total_size: int, pool: BufferPool) -> memoryview:
        with contextlib.closing(self._answered(DOWNLOAD, token)) as sock:
            (size,) = _SIZE.unpack(_recv(sock, _SIZE.size))
            if size != total_size:
                raise TransportError(f"the data plane sent {size} bytes, announced {total_size}")
            view = memoryview(pool.take(size))  # type: ignore[arg-type]
            _recv_exact(sock, view)
            sock.sendall(_OK)
        return view

    def upload(self, reply_to: str, pieces: Sequence[bytes | memoryview]) -> bool:
        """Send a reply here; ``False`` when it could not (send it on the stream then).
        A reply the server refused counts as sent: the stream would refuse it too."""
        token = self.uploads.pop(reply_to, None)
        if token is None or not self.ready:
            return False
        size = sum(len(p) for p in pieces)
        try:
            self._tried(lambda: self._upload(token, size, pieces))
        except Refused as exc:
            log.warning("the server refused this client's reply: %s", exc)
            return True
        except (OSError, TransportError) as exc:
            log.warning("the data plane failed (%s); the reply goes on the gRPC stream", exc)
            return False
        return True
