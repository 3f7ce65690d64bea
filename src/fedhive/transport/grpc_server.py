"""The server side of fedhive's gRPC transport.

One asyncio event loop (in a background thread) serves every client's long-lived
``Join`` stream. The engine, in its own thread, calls :meth:`GrpcServer.send`: tasks are
encoded there (a model shared by many tasks is encoded once) and handed to the loop,
which streams them in chunks to each client and puts every reply, reassembled and
validated, into the engine's ``Replies`` mailbox.

A client is admitted only after a HELLO with the right protocol version and, when tokens
are enrolled, its own token; it never receives anything before that. A reply is accepted
only from the connection of the node the task was sent to. A client that disconnects or
stops sending heartbeats fails its pending tasks at once, so the round goes on without it.
Malformed, oversized or unexpected frames are logged with the node's id and dropped; the
server keeps serving everyone else.

Memory: at most ``max_staged_uploads`` client uploads are held at once (being received
or waiting for the engine), plus the one the engine is folding; further uploads wait in
gRPC flow control, so server memory stays near global model + aggregate + the cap,
whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from fedhive.common.errors import FedhiveError, SerdeError, TransportError
from fedhive.common.message import Message
from fedhive.server.client_manager import SimpleClientManager
from fedhive.transport.base import Replies, Transport
from fedhive.transport.codec import decode_wire, encode_content, encode_wire
from fedhive.transport.frames import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Assembler,
    message_frames,
)
from fedhive.transport.proto import fleet_pb2_grpc
from fedhive.transport.proto.fleet_pb2 import Frame

__all__ = ["GrpcServer", "ServerSecurity"]

log = logging.getLogger("fedhive.server")


@dataclass(frozen=True)
class ServerSecurity:
    """TLS and client authentication for :class:`GrpcServer`.

    ``certificates`` is Flower's triple ``(ca_cert, server_cert, server_key)`` (PEM bytes);
    ``require_client_auth`` turns on mutual TLS (clients present certificates signed by
    ``ca_cert``). ``tokens`` enrolls clients: ``node_id -> secret``; when given, a client
    must present its node id and token in its HELLO.
    """

    certificates: tuple[bytes, bytes, bytes] | None = None
    require_client_auth: bool = False
    tokens: Mapping[str, str] | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.certificates is None:
            if self.require_client_auth:
                raise TransportError("mutual TLS needs certificates=(ca, cert, key)")
            return None
        ca, cert, key = self.certificates
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca if self.require_client_auth else None,
            require_client_auth=self.require_client_auth,
        )


@dataclass
class _Pending:
    task: Message
    replies: Replies


@dataclass
class _Connection:
    node_id: str
    outbox: asyncio.Queue[Iterable[Frame] | None]
    pending: dict[str, _Pending] = field(default_factory=dict)
    last_seen: float = 0.0
    waiting: bool = False  # held back by the staging cap, not silent


class GrpcServer(Transport):
    """Serves ``Join`` streams and implements the engine's :class:`Transport`."""

    def __init__(
        self,
        address: str = "0.0.0.0:8080",
        *,
        client_manager: SimpleClientManager | None = None,
        security: ServerSecurity | None = None,
        max_message_bytes: int = 1 << 40,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        heartbeat_timeout: float = 30.0,
        protocol_version: int = PROTOCOL_VERSION,
        max_staged_uploads: int = 2,
    ) -> None:
        self.address = address
        self.client_manager = client_manager or SimpleClientManager(wait_timeout=0.0)
        self.security = security or ServerSecurity()
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.heartbeat_timeout = heartbeat_timeout
        self.protocol_version = protocol_version
        if max_staged_uploads < 1:
            raise TransportError(f"max_staged_uploads must be >= 1, got {max_staged_uploads}")
        self.max_staged_uploads = max_staged_uploads
        self._staging: asyncio.Semaphore | None = None
        self.port: int | None = None
        self._connections: dict[str, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.refused: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> GrpcServer:
        """Bind and serve in a background thread; returns once the port is open."""
        self._thread = threading.Thread(target=self._serve, name="fedhive-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise TransportError(f"cannot serve on {self.address}: {self._startup_error}")
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._open())
        except Exception as exc:  # reported to start() in the caller's thread
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _open(self) -> None:
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", self.chunk_bytes + (1 << 16)),
                ("grpc.max_send_message_length", self.chunk_bytes + (1 << 16)),
            ]
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(_Servicer(self), server)
        creds = self.security.credentials()
        if creds is None:
            port = server.add_insecure_port(self.address)
        else:
            port = server.add_secure_port(self.address, creds)
        if port == 0:
            raise TransportError(f"could not bind {self.address}")
        await server.start()
        self._staging = asyncio.Semaphore(self.max_staged_uploads)
        self._server = server
        self.port = port
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_heartbeats())

    def close(self, reason: str = "the server is shutting down") -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(reason), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _shutdown(self, reason: str) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for conn in list(self._connections.values()):
            await conn.outbox.put([Frame(kind=Frame.BYE, text=reason)])
            await conn.outbox.put(None)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def finish_run(self, reason: str = "the run is finished") -> None:
        """Tell every connected client that the run ended (BYE), then stop serving."""
        self.close(reason)

    # -- the Transport interface -------------------------------------------------------------

    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        if self._loop is None:
            raise TransportError("the server is not started")
        shared: dict[int, bytes] = {}
        batch = []
        for task in messages:
            key = id(task.content)
            if key not in shared:
                shared[key] = encode_content(task.content)
            batch.append((task, encode_wire(task, shared[key])))
        self._loop.call_soon_threadsafe(self._route, batch, replies)

    def _route(self, batch: list[tuple[Message, list[bytes]]], replies: Replies) -> None:
        for task, pieces in batch:
            conn = self._connections.get(task.metadata.node_id)
            if conn is None:
                replies.put(task.error_reply("the client is not connected"))
                continue
            conn.pending[task.metadata.message_id] = _Pending(task, replies)
            # lazily chunked: one chunk copy at a time, the encoded model shared by all
            frames = message_frames(task.metadata.message_id, pieces, self.chunk_bytes)
            conn.outbox.put_nowait(frames)

    # -- connections -------------------------------------------------------------------------

    def _admit(self, hello: Frame) -> str:
        """The node id of an acceptable HELLO, else raise with the reason."""
        if hello.kind != Frame.HELLO:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION, "expected HELLO first")
        if hello.protocol_version != self.protocol_version:
            raise _Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: the server speaks version {self.protocol_version}, "
                f"the client version {hello.protocol_version}; upgrade the older side",
            )
        node_id = hello.node_id
        if not node_id:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "HELLO without a node id")
        tokens = self.security.tokens
        if tokens is not None:
            expected = tokens.get(node_id)
            if expected is None or not hmac.compare_digest(expected, hello.token):
                raise _Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client {node_id!r} is not enrolled or its token is wrong",
                )
        if node_id in self._connections:
            raise _Refusal(
                grpc.StatusCode.ALREADY_EXISTS, f"client {node_id!r} is already connected"
            )
        return node_id

    def _drop(self, conn: _Connection, reason: str) -> None:
        for pending in conn.pending.values():
            pending.replies.put(pending.task.error_reply(reason))
        conn.pending.clear()
        if self._connections.get(conn.node_id) is conn:
            del self._connections[conn.node_id]
            self.client_manager.unregister(conn.node_id)
            log.info("client %s left: %s", conn.node_id, reason)

    def _deliver(self, conn: _Connection, data: memoryview) -> None:
        """Hand a complete upload to the engine; its staging slot frees when it is taken."""
        try:
            reply = decode_wire(data)
        except SerdeError as exc:
            self._unstage()
            self._refuse(conn, f"malformed message: {exc}")
            self._fail_only_task(conn, f"its reply was malformed: {exc}")
            return
        meta = reply.metadata
        pending = conn.pending.pop(meta.reply_to, None)
        if pending is None:
            self._unstage()
            self._refuse(conn, f"reply to a task it was not given ({meta.reply_to!r})")
            return
        if meta.node_id != conn.node_id:
            self._unstage()
            pending.replies.put(pending.task.error_reply("reply carried another node's id"))
            self._refuse(conn, f"reply claims to come from {meta.node_id!r}")
            return
        pending.replies.put(reply, on_taken=self._unstage_from_engine)

    def _unstage(self) -> None:
        if self._staging is not None:
            self._staging.release()

    def _unstage_from_engine(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._unstage)

    def _fail_only_task(self, conn: _Connection, reason: str) -> None:
        """A refused reply answers the task when the client had only one."""
        if len(conn.pending) == 1:
            (mid,) = conn.pending
            pending = conn.pending.pop(mid)
            pending.replies.put(pending.task.error_reply(reason))

    def _refuse(self, conn: _Connection, reason: str) -> None:
        text = f"refused from client {conn.node_id!r}: {reason}"
        log.warning(text)
        self.refused.append(text)

    async def _watch_heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout / 4))
            now = loop.time()
            for conn in list(self._connections.values()):
                if not conn.waiting and now - conn.last_seen > self.heartbeat_timeout:
                    self._drop(conn, f"no heartbeat for {self.heartbeat_timeout:.0f} s")
                    conn.outbox.put_nowait(None)

    @property
    def connected(self) -> list[str]:
        return sorted(self._connections)


class _Refusal(FedhiveError):
    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Servicer(fleet_pb2_grpc.FleetServicer):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server

    async def Join(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        server = self.server
        hello = await context.read()
        if hello is aio.EOF:
            return
        try:
            node_id = server._admit(hello)
        except _Refusal as refusal:
            log.warning("refused a client (%s): %s", hello.node_id or "?", refusal.text)
            await context.abort(refusal.code, refusal.text)
            return
        loop = asyncio.get_running_loop()
        conn = _Connection(node_id, asyncio.Queue(), last_seen=loop.time())
        server._connections[node_id] = conn
        await context.write(Frame(kind=Frame.WELCOME, protocol_version=server.protocol_version))
        server.client_manager.register(node_id)
        log.info("client %s joined", node_id)
        reader = loop.create_task(self._read(conn, context))
        try:
            while True:
                frames = await conn.outbox.get()
                if frames is None:
                    break
                for frame in frames:
                    await context.write(frame)
        finally:
            reader.cancel()
            server._drop(conn, "the client disconnected")

    async def _stage(self, conn: _Connection) -> None:
        staging = self.server._staging
        if staging is None:
            return
        conn.waiting = True
        try:
            await staging.acquire()
        finally:
            conn.waiting = False
            conn.last_seen = asyncio.get_running_loop().time()

    async def _read(self, conn: _Connection, context: aio.ServicerContext) -> None:
        server = self.server
        assembler = Assembler(server.max_message_bytes)
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await context.read()
                if frame is aio.EOF:
                    break
                conn.last_seen = loop.time()
                if frame.kind == Frame.HEARTBEAT:
                    continue
                if frame.kind != Frame.MESSAGE:
                    server._refuse(conn, f"unexpected frame kind {frame.kind}")
                    continue
                if not assembler.is_open(frame.message_id):
                    if assembler.open_count >= len(conn.pending):
                        server._refuse(conn, "upload without a task waiting for it")
                        continue
                    await self._stage(conn)  # backpressure: at most N uploads held at once
                try:
                    done = assembler.add(frame)
                except SerdeError as exc:
                    if not assembler.is_open(frame.message_id):
                        server._unstage()
                    server._refuse(conn, str(exc))
                    server._fail_only_task(conn, f"its reply was refused: {exc}")
                    continue
                if done is not None:
                    server._deliver(conn, done[1])
                    done = None  # the upload now belongs to the engine; keep no reference
        except (aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            for _ in range(assembler.open_count):  # abandoned uploads free their slots
                server._unstage()
            assembler.clear()
        server._drop(conn, "the client disconnected")
        conn.outbox.put_nowait(None)
