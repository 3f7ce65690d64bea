"""The client side of fedhive's gRPC transport: one session with a server."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from fedhive.common.errors import AuthenticationError, SerdeError, TransportError
from fedhive.common.message import Message
from fedhive.transport.codec import decode_wire, encode_wire
from fedhive.transport.data_link import DataLink
from fedhive.transport.frames import DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION, Assembler, BufferPool
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.wire import (
    METHOD,
    WireFrame,
    message_frame_bytes,
    parse_frame,
    serialize_frame,
)

__all__ = [
    "AuditLog",
    "ClientSecurity",
    "ClientSession",
    "Retryable",
    "SessionEnd",
    "SessionOptions",
    "check_welcome",
    "connection_hint",
    "read_task",
    "translate_rpc_error",
]

log = logging.getLogger("fedhive.client")


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves who it is and checks the server.

    ``root_certificates`` verifies the server (TLS); ``certificate_chain`` and
    ``private_key`` present a client certificate (mutual TLS); ``token`` is the secret
    enrolled for this node on the server. ``insecure=True`` uses a plaintext channel.
    """

    insecure: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    token: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials of a channel; ``None`` when ``insecure``."""
        if self.insecure:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, creds, options=options)

    def aio_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """The same channel on ``grpc.aio``, for sessions on an event loop."""
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, creds, options=options)


class AuditLog:
    """Appends one JSON line per message that leaves the site: time, kind, size, hash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, message: Message, pieces: Sequence[bytes | memoryview]) -> None:
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        entry = {
            "time": time.time(),
            "kind": message.metadata.message_type,
            "round": message.metadata.server_round,
            "error": message.error is not None,
            "size": sum(len(p) for p in pieces),
            "sha256": digest.hexdigest(),
        }
        with self._lock, self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class SessionEnd:
    """Why a session ended normally: the server said BYE (``reason``)."""

    reason: str


class SessionOptions:
    """What every client session is given: the server, this node, its work
    (``handle(task) -> reply``), its credentials and the protocol's sizes and timers.

    ``buffers`` recycles the buffers of received messages; sessions of one process may
    share one (a session's own keeps one idle buffer of a model's size between rounds).
    ``data_plane`` lets large messages use the server's data port when it offers one and
    this client can reach it (:mod:`fedhive.transport.bulk`); ``False`` keeps them all on
    the gRPC stream.
    """

    def __init__(
        self,
        address: str,
        node_id: str,
        handle: Callable[[Message], Message],
        *,
        security: ClientSecurity,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = 1 << 40,
        heartbeat_interval: float = 5.0,
        audit: AuditLog | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        buffers: BufferPool | None = None,
        data_plane: bool = True,
    ) -> None:
        self.address = address
        self.node_id = node_id
        self.handle = handle
        self.security = security
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.heartbeat_interval = heartbeat_interval
        self.audit = audit
        self.protocol_version = protocol_version
        self._buffers = buffers or BufferPool(max_free=1)
        self.data_plane = data_plane
        self.link: DataLink | None = None  # the server's data plane, once offered
        self._setup()

    def _setup(self) -> None:
        """What a kind of session adds to its state at construction."""

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.chunk_bytes + (1 << 16)),
            ("grpc.max_send_message_length", self.chunk_bytes + (1 << 16)),
        ]

    def reply_pieces(self, reply: Message) -> list[bytes | memoryview]:
        """``reply`` encoded (views of its arrays), recorded in the audit log if any."""
        pieces = encode_wire(reply)
        if self.audit is not None:
            self.audit.record(reply, pieces)
        return pieces

    def frames(self, reply: Message, pieces: list[bytes | memoryview]) -> Iterator[bytes]:
        """``reply``'s serialized frames, cut lazily from ``pieces``."""
        return message_frame_bytes(reply.metadata.message_id, pieces, self.chunk_bytes)

    def wants_upload(self, reply: Message, pieces: list[bytes | memoryview]) -> bool:
        """Whether ``reply`` goes on the data plane: the server handed out a ticket for
        it and it is more than one chunk."""
        link = self.link
        if link is None or reply.metadata.reply_to not in link.uploads:
            return False
        if sum(len(p) for p in pieces) <= self.chunk_bytes:
            link.uploads.pop(reply.metadata.reply_to, None)
            return False
        return True

    def upload(self, reply: Message, pieces: list[bytes | memoryview]) -> bool:
        """Send a large reply on the data plane; ``False``: send it on the stream."""
        return (
            self.link is not None
            and self.wants_upload(reply, pieces)
            and self.link.upload(reply.metadata.reply_to, pieces)
        )

    def offered(self, welcome: Frame | WireFrame) -> Callable[[], bool] | None:
        """Take the data plane a WELCOME offers; the probe to run (blocking), if any."""
        if not self.data_plane or not welcome.data_port or not welcome.token:
            return None
        self.link = DataLink(self.address, welcome.data_port, self.security)
        return functools.partial(self.link.probe, welcome.token)

    def data_frame(self, frame: Frame | WireFrame) -> Message | None:
        """A TICKET (kept for the reply) or a BULK frame (its task, fetched: blocking)."""
        link = self.link
        if link is None:
            log.warning("dropped a data-plane frame: this client was offered no data plane")
            return None
        if frame.kind == Frame.TICKET:
            link.uploads[frame.message_id] = frame.token
            return None
        try:
            view = link.fetch(frame.token, frame.total_size, self.max_message_bytes, self._buffers)
            return decode_wire(view)
        except (OSError, TransportError, SerdeError) as exc:
            log.warning("could not fetch task %r from the data plane: %s", frame.message_id, exc)
            return None

    def hello(self) -> Frame:
        return Frame(
            kind=Frame.HELLO,
            protocol_version=self.protocol_version,
            node_id=self.node_id,
            token=self.security.token,
        )


class ClientSession(SessionOptions):
    """One connection: HELLO, then tasks in and replies out until BYE or a failure.

    ``handle(task) -> reply`` does the client's work. Raises
    :class:`AuthenticationError` if refused, :class:`TransportError` if the connection
    fails (the caller may retry), and returns :class:`SessionEnd` after a BYE.
    """

    def _setup(self) -> None:
        self._outbox: queue.SimpleQueue[Iterable[Frame | bytes] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._requests_started = threading.Event()
        self._requests_done = threading.Event()

    def _requests(self) -> Iterator[Frame | bytes]:
        self._requests_started.set()
        try:
            while True:
                frames = self._outbox.get()
                if frames is None:
                    return
                yield from frames
        finally:
            self._requests_done.set()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self._outbox.put([Frame(kind=Frame.HEARTBEAT)])

    def run(self) -> SessionEnd:
        channel = self.security.channel(self.address, self.channel_options())
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        try:
            join = channel.stream_stream(
                METHOD, request_serializer=serialize_frame, response_deserializer=parse_frame
            )
            responses = join(self._requests())
            self._outbox.put([self.hello()])
            self._welcome(responses)
            beat.start()
            return self._serve(responses)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, self.address, self.security) from None
        finally:
            self._stop.set()
            self._outbox.put(None)
            channel.close()
            self._quiesce(beat)

    def _quiesce(self, beat: threading.Thread) -> None:
        """Wait (briefly) for this session's threads to leave gRPC and our generators.

        A thread still inside gRPC while the interpreter shuts down can abort the
        process ("terminate called without an active exception") after a finished run.
        """
        if beat.is_alive():
            beat.join(timeout=2.0)
        if self._requests_started.is_set():
            self._requests_done.wait(timeout=2.0)

    def _welcome(self, responses: Any) -> None:
        first = next(responses)
        check_welcome(first, self.address, self.node_id)
        probe = self.offered(first)
        if probe is not None:
            threading.Thread(target=probe, daemon=True).start()

    def _serve(self, responses: Any) -> SessionEnd:
        assembler = Assembler(self.max_message_bytes, pool=self._buffers)
        for frame in responses:
            task: Message | SessionEnd | None
            if frame.kind in DATA_KINDS:
                task = self.data_frame(frame)
            else:
                task = read_task(frame, assembler)
            if isinstance(task, SessionEnd):
                return task
            if task is None:
                continue
            reply = self.handle(task)
            del task  # the received model, unless the reply shares it
            self._reply(reply, responses)
            del reply
        raise Retryable("the server closed the connection")

    def _reply(self, reply: Message, call: Any) -> None:
        """Send ``reply``, framed lazily, and return once gRPC has taken every frame.

        The frames view the reply's arrays without copying them, so this waits until
        they have all been serialized: only then may the client change those arrays.
        If the stream ends first, it returns at once; reading the stream tells why.
        """
        pieces = self.reply_pieces(reply)
        if self.upload(reply, pieces):
            return
        sent = threading.Event()
        self._outbox.put(_then_set(self.frames(reply, pieces), sent))
        while not sent.wait(0.5) and call.is_active():
            pass


#: Frames of the data plane (transport/bulk.py) on the stream.
DATA_KINDS = (Frame.BULK, Frame.TICKET)


def check_welcome(first: Frame | WireFrame, address: str, node_id: str) -> None:
    """Raise unless the server's first frame admits this client."""
    if first.kind == Frame.ERROR:
        raise TransportError(f"the server refused this client: {first.text}")
    if first.kind != Frame.WELCOME:
        raise TransportError(f"expected WELCOME from the server, got frame kind {first.kind}")
    log.info("joined %s as %s", address, node_id)


def read_task(frame: Frame | WireFrame, assembler: Assembler) -> Message | SessionEnd | None:
    """One frame from the server: a complete task, the end of the run, or ``None`` (more
    to come, or a malformed task that was dropped with a warning). Raises
    :class:`TransportError` when the server reports an error."""
    if frame.kind == Frame.BYE:
        return SessionEnd(frame.text or "the server ended the run")
    if frame.kind == Frame.ERROR:
        raise TransportError(f"the server reported an error: {frame.text}")
    if frame.kind != Frame.MESSAGE:
        return None
    try:
        done = assembler.add(frame)
        return None if done is None else decode_wire(done[1])
    except SerdeError as exc:
        log.warning("dropped a malformed task from the server: %s", exc)
        return None


def translate_rpc_error(
    exc: grpc.RpcError, address: str, security: ClientSecurity | None = None
) -> Exception:
    """The fedhive error for a failed ``Join`` stream: refusals are final, the rest
    :class:`Retryable`. A connection that fails in a way that names its cause (a TLS
    mismatch, a certificate, nothing listening) says it in one line that names the flag
    to change (:func:`connection_hint`); others keep gRPC's words."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthenticationError(f"the server refused this client: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return TransportError(f"the server refused the connection: {details}")
    hint = connection_hint(str(details), address, security)
    if hint is not None:
        return Retryable(f"cannot connect to {address}: {hint}")
    return Retryable(f"connection to {address} failed ({code}): {details}")


#: gRPC's words for a server certificate this client's CA did not sign.
_UNTRUSTED = (
    "bad_signature",
    "certificate verify failed",
    "certificate_verify_failed",
    "unable to get local issuer",
)


def connection_hint(details: str, address: str, security: ClientSecurity | None) -> str | None:
    """One line on why a connection to ``address`` failed, from gRPC's ``details`` and
    how this client connects; ``None`` when the details do not say."""
    text = details.lower()
    if "connection refused" in text:
        return (
            "nothing is listening there (connection refused); is the server up, and --server right?"
        )
    if security is None:
        return None
    if "wrong_version_number" in text and not security.insecure:
        return (
            "the server does not speak TLS (started with --insecure?); connect with "
            "--insecure (insecure=True) or serve with --cert/--key"
        )
    if "socket closed" in text:
        if security.insecure:
            return (
                "the server closed the connection: it serves TLS; connect with "
                "--root-certificates CA.pem (root_certificates=) instead of --insecure"
            )
        if security.certificate_chain is None:
            return (
                "the server closed the TLS handshake: it requires a client certificate "
                "(mutual TLS); add --cert CLIENT.pem --key CLIENT.key "
                "(certificate_chain=, private_key=)"
            )
        return (
            "the server refused this client's certificate; use a --cert signed by the CA "
            "that the server trusts (its --ca)"
        )
    if any(word in text for word in _UNTRUSTED):
        return (
            "the server's certificate is not signed by the CA given with --root-certificates "
            "(root_certificates=); give the CA that signed the server's certificate"
        )
    if "peer name" in text or "hostname" in text:
        return (
            "the server's certificate does not name the host given with --server; connect "
            "by a name it holds, or remake it with fedhive certs --host HOST"
        )
    return None


def _then_set(frames: Iterator[bytes], done: threading.Event) -> Iterator[bytes]:
    """``frames``, then ``done`` is set (also when the generator is closed early)."""
    try:
        yield from frames
    finally:
        done.set()


class Retryable(TransportError):
    """A connection failure worth retrying (server down, network glitch)."""
