"""The data plane: large messages on a plain (or TLS) socket beside the ``Join`` stream.

gRPC moves every byte through HTTP/2 frames and a few copies per chunk; a socket moves a
100 MB model in about 0.6x grpcio's time (``benchmarks/grpc_round.py``). So the control
stays on the stream and only the bytes of large messages move here, to and from whoever
holds the ticket the stream handed out:

- the server's WELCOME names the data port and carries a probe ticket; a client that
  can reach the port redeems it (op ``P``), and only then does the server use the data
  plane for it (a client behind a firewall that lets only gRPC through keeps the stream);
- a task of ``bulk_bytes`` or more goes as a BULK frame (its size and a ticket) on the
  stream, and the client fetches its bytes here (op ``D``, acknowledged once read);
- a task whose reply may be that large comes after a TICKET frame, and the client
  uploads such a reply here (op ``U``) instead of in chunks; if the data plane fails it
  sends the reply on the stream, as before.

One TCP connection per transfer::

    client -> server   MAGIC (4) | op (1) | ticket id (16) | secret (32) [| size (8), op U]
    server -> client   status (1: 0 ok, else 1 | length (2) | utf-8 reason)
    op D               server -> client size (8) | bytes;  client -> server ack (1)
    op U               once a staging slot is free: status; client -> server bytes;
                       server -> client status when the reply is taken

The socket speaks TLS whenever the gRPC server does, with the same certificate and, under
mutual TLS, the same CA check of the client's certificate. A ticket is 48 random bytes,
sent only on its node's authenticated stream; it is good for one transfer, for one task
of one connection, and dies with the task or the connection. The server bounds
everything else as on the stream: a peer must present a ticket within ``hello_timeout``,
at most ``max_connections`` transfers run at once, an upload may be no larger than what
a reply to its task can hold (:mod:`fedhive.transport.limits`), waits for a staging slot
or spill budget like any other, and is decoded and checked by the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedhive.common.errors import SerdeError, TransportError
from fedhive.transport.frames import Assembler, MemorySink
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.uploads import Free, Progress, TooSlow, hold, upload_limit

if TYPE_CHECKING:
    from fedhive.transport.grpc_server import GrpcServer
    from fedhive.transport.grpc_stream import Connection
    from fedhive.transport.limits import ReplyBound
    from fedhive.transport.security import ServerSecurity

__all__ = ["DEFAULT_BULK_BYTES", "DataPlane", "server_tls"]

log = logging.getLogger("fedhive.transport")


#: Messages of at least this many bytes use the data plane (when both sides have it).
DEFAULT_BULK_BYTES = 8 << 20

MAGIC = b"FHD1"
PROBE, DOWNLOAD, UPLOAD = b"P", b"D", b"U"
_HEAD = struct.Struct("<4sc16s32s")
_SIZE = struct.Struct("<Q")
_OK = b"\x00"
_SCRATCH = 1 << 20  # what a spilled upload is received through


class Refused(TransportError):
    """The other side of a transfer refused it, with its reason."""


class _NotAnswered(OSError):
    """A transfer that ended before the server said anything: worth another try."""


def _status(reason: str | None = None) -> bytes:
    if reason is None:
        return _OK
    text = reason.encode("utf-8")[:4000]
    return b"\x01" + struct.pack("<H", len(text)) + text


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"the peer closed the connection at byte {got} of {len(view)}")
        got += n


def _recv_paced(sock: socket.socket, view: memoryview, pace: Progress, whole: bool = True) -> int:
    """Receive into ``view`` (all of it, or with ``whole`` False at least a byte) on a
    socket whose timeout is ``pace.poll``, asking ``pace`` after each receive and each
    timeout (it raises when the upload is too slow or silent too long); the bytes read."""
    got = 0
    while got < len(view) and (whole or not got):
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:  # socket.timeout
            pace.check(silent=True)
            continue
        if n == 0:
            raise ConnectionError(f"the upload ended at byte {got} of {len(view)}")
        got += n
        pace.got(n)
        pace.check()
    return got


def _recv(sock: socket.socket, nbytes: int) -> bytes:
    buffer = bytearray(nbytes)
    _recv_exact(sock, memoryview(buffer))
    return bytes(buffer)


def _read_status(sock: socket.socket) -> None:
    if _recv(sock, 1) != _OK:
        _raise_refusal(sock)


def _raise_refusal(sock: socket.socket) -> None:
    """Read the reason that follows a status that is not ok, and raise it."""
    (length,) = struct.unpack("<H", _recv(sock, 2))
    raise Refused(_recv(sock, length).decode("utf-8", "replace"))


# -- TLS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pem_paths(*pems: bytes) -> Iterator[list[str]]:
    """Paths that read as ``pems`` for as long as the block runs: ``ssl`` loads keys only
    from files, so a private key lives in an anonymous memory file (Linux) or a private
    temporary directory that is removed at once, never in a named file left behind."""
    with contextlib.ExitStack() as stack:
        paths = []
        memfd = getattr(os, "memfd_create", None)
        folder = None
        for i, pem in enumerate(pems):
            if memfd is not None:
                fd = memfd("fedhive-pem", os.MFD_CLOEXEC)
                stack.callback(os.close, fd)
                os.write(fd, pem)
                paths.append(f"/proc/self/fd/{fd}")
                continue
            if folder is None:
                folder = stack.enter_context(tempfile.TemporaryDirectory())
            path = os.path.join(folder, f"{i}.pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(pem)
            paths.append(path)
        yield paths


def server_tls(security: ServerSecurity) -> ssl.SSLContext | None:
    """The data plane's TLS for a gRPC server with ``security`` (``None``: plaintext)."""
    if security.certificates is None:
        return None
    ca, cert, key = security.certificates
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _pem_paths(cert, key) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path)
    if security.require_client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca.decode("ascii"))
    return context


def split_host(address: str) -> str:
    """The host of a ``host:port`` address (brackets of an IPv6 literal removed)."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or "0.0.0.0"


# -- server ---------------------------------------------------------------------------------


@dataclass
class Ticket:
    op: bytes
    secret: bytes
    conn: Connection
    message_id: str  # the task it is for ("" for a probe)
    pieces: Sequence[bytes | memoryview] | None = None  # a download's bytes


class DataPlane:
    """The server's data socket: a listener thread, one thread per transfer (blocking
    sockets: ``sendall`` of the model's own views, ``recv_into`` the staging buffer)."""

    def __init__(self, server: GrpcServer, host: str, port: int, max_connections: int = 64) -> None:
        self.server = server
        self.tls = server_tls(server.security)
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._live: set[socket.socket] = set()
        #: finished transfers by op ("probe", "download", "upload") and bytes moved, and
        #: connections closed unserved because ``max_connections`` were running ("busy")
        self.transfers: Counter[str] = Counter()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, where = infos[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.bind(where)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.25)  # so close() is seen without waking accept() some other way
        self._listener = listener
        self.port: int = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fedhive-data", daemon=True)
        self._thread.start()

    # tickets (the stream's side, on the event loop)

    def issue(
        self,
        op: bytes,
        conn: Connection,
        message_id: str = "",
        pieces: Sequence[bytes | memoryview] | None = None,
    ) -> str:
        key, secret = secrets.token_bytes(16), secrets.token_bytes(32)
        with self._lock:
            self._tickets[key] = Ticket(op, secret, conn, message_id, pieces)
        return (key + secret).hex()

    def frames(
        self,
        conn: Connection,
        mid: str,
        pieces: Sequence[bytes | memoryview],
        bound: ReplyBound | None,
        chunks: Iterable[bytes],
    ) -> Iterable[Frame | bytes]:
        """What goes on a data-plane client's stream for a task instead of its ``chunks``:
        a BULK frame when it is ``bulk_bytes`` or more (its bytes wait here; the ticket is
        made when the frame is written), after a TICKET frame when its reply may be."""
        bulk_bytes = self.server.bulk_bytes
        head = []
        if bound is None or bound.max_bytes >= bulk_bytes:
            token = self.issue(UPLOAD, conn, mid)
            head.append(Frame(kind=Frame.TICKET, message_id=mid, token=token))
        size = sum(len(p) for p in pieces)
        if size < bulk_bytes:
            return itertools.chain(head, chunks)

        def bulk() -> Iterator[Frame]:
            token = self.issue(DOWNLOAD, conn, mid, pieces)
            yield Frame(kind=Frame.BULK, message_id=mid, total_size=size, token=token)

        return itertools.chain(head, bulk())

    def sweep(self) -> None:
        """Forget the tickets of connections that are gone and of tasks no longer waited for."""
        live = self.server._connections
        with self._lock:
            for key, ticket in list(self._tickets.items()):
                conn = ticket.conn
                if live.get(conn.node_id) is not conn or (
                    ticket.message_id and ticket.message_id not in conn.pending
                ):
                    del self._tickets[key]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()
        with self._lock:
            self._tickets.clear()
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # transfers (threads)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                # a burst of joins is not an offence: the client tries again, or keeps to
                # the stream
                log.debug("data plane busy: closed a connection")
                with self._lock:
                    self.transfers["busy"] += 1
                raw.close()
                continue
            threading.Thread(target=self._transfer, args=(raw,), daemon=True).start()

    def _on_loop(self, fn: object, *args: object) -> None:
        loop = self.server._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]

    def _transfer(self, raw: socket.socket) -> None:
        sock = raw
        with self._lock:
            self._live.add(raw)
        ticket: Ticket | None = None
        try:
            raw.settimeout(self.server.hello_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True)
            magic, op, key, secret = _HEAD.unpack(_recv(sock, _HEAD.size))
            ticket = self._redeem(magic, op, key, secret)
            sock.settimeout(self.server.heartbeat_timeout)
            if op == PROBE:
                self._on_loop(self.server._data_ready, ticket.conn)
                sock.sendall(_OK)
                self._count("probe", 0)
            elif op == DOWNLOAD:
                self._count("download", self._download(sock, ticket))
            else:
                self._count("upload", self._upload(sock, ticket))
        except TooSlow as slow:  # another upload waits for the room this one holds
            if ticket is not None:
                self._on_loop(self.server._evict, ticket.conn, str(slow), "data")
            with contextlib.suppress(OSError):
                sock.sendall(_status(str(slow)))
        except Refused as refusal:
            conn = ticket.conn if ticket is not None else None
            self._on_loop(self.server._refuse_data, conn, str(refusal))
            with contextlib.suppress(OSError):
                sock.sendall(_status(str(refusal)))
        except (OSError, struct.error) as exc:  # ssl.SSLError is an OSError
            if ticket is not None and ticket.op == DOWNLOAD:
                reason = f"its task could not be sent on the data plane: {exc}"
                self._on_loop(self.server._fail_task, ticket.conn, ticket.message_id, reason)
            log.debug("data transfer ended: %s", exc)
        finally:
            with self._lock:
                self._live.discard(raw)
            sock.close()
            self._slots.release()

    def _count(self, op: str, nbytes: int) -> None:
        with self._lock:
            self.transfers[op] += 1
            self.transfers[f"{op}_bytes"] += nbytes

    def _redeem(self, magic: bytes, op: bytes, key: bytes, secret: bytes) -> Ticket:
        if magic != MAGIC:
            raise Refused("not a fedhive data-plane request")
        with self._lock:
            ticket = self._tickets.get(key)
            if ticket is None or not hmac.compare_digest(ticket.secret, secret):
                raise Refused("unknown or used ticket")
            if ticket.op != op:
                raise Refused(f"the ticket is for op {ticket.op!r}, not {op!r}")
            del self._tickets[key]  # one transfer per ticket
        conn = ticket.conn
        if self.server._connections.get(conn.node_id) is not conn:
            raise Refused("the ticket's connection is closed")
        if ticket.message_id and ticket.message_id not in conn.pending:
            raise Refused("no task waits for this transfer")
        return ticket

    async def _admit(self, conn: Connection, size: int) -> Free:
        """On the event loop, where the connection's tasks live: refuse an upload larger
        than a reply to them can be, else wait for its staging slot or spill budget."""
        server = self.server
        limit = upload_limit(server, conn)
        if size > limit:
            raise Refused(f"the upload declares {size} bytes, over the limit of {limit}")
        return await hold(server, conn, size, server._data_assembler.spills(size))

    def _download(self, sock: socket.socket, ticket: Ticket) -> int:
        pieces, ticket.pieces = ticket.pieces or (), None
        size = sum(len(p) for p in pieces)
        sock.sendall(_OK + _SIZE.pack(size))
        for piece in pieces:
            sock.sendall(piece)
        del pieces
        if _recv(sock, 1) != _OK:
            raise ConnectionError("the client did not acknowledge its task")
        return size

    def _upload(self, sock: socket.socket, ticket: Ticket) -> int:
        server, conn = self.server, ticket.conn
        (size,) = _SIZE.unpack(_recv(sock, _SIZE.size))
        loop = server._loop
        if loop is None:
            raise ConnectionError("the server is not serving")
        assembler: Assembler = server._data_assembler
        free = asyncio.run_coroutine_threadsafe(self._admit(conn, size), loop).result()
        try:
            sink = assembler.sink(ticket.message_id, size)
        except SerdeError as exc:
            loop.call_soon_threadsafe(free)
            raise Refused(str(exc)) from None
        try:
            sock.sendall(_OK)
            pace = Progress(server)
            sock.settimeout(pace.poll)
            if isinstance(sink, MemorySink):
                _recv_paced(sock, sink.view, pace)
            else:
                scratch = memoryview(bytearray(min(_SCRATCH, max(size, 1))))
                left = size
                while left:
                    n = _recv_paced(sock, scratch[: min(left, len(scratch))], pace, whole=False)
                    sink.write(scratch[:n])
                    left -= n
            data = sink.finish()
        except BaseException:
            sink.close()
            loop.call_soon_threadsafe(free)
            raise
        asyncio.run_coroutine_threadsafe(server._deliver(conn, data, free), loop).result()
        del data
        sock.sendall(_OK)
        return size


def __getattr__(name: str) -> object:
    """The client's side lives in :mod:`fedhive.transport.data_link` (the old names
    still resolve here)."""
    if name in ("DataLink", "client_tls"):
        from fedhive.transport import data_link

        return getattr(data_link, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
