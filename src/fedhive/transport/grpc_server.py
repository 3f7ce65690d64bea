"""The server side of fedhive's gRPC transport.

One asyncio event loop (in a background thread) serves every client's long-lived
``Join`` stream. The engine, in its own thread, calls :meth:`GrpcServer.send`: tasks are
encoded there (a model shared by many tasks is encoded once, as views of its arrays, not
a copy) and handed to the loop, which streams them in chunks to each client (one copy
per chunk, made as it is sent) and puts every reply, reassembled and validated, into the
engine's ``Replies`` mailbox.

A client is admitted only after a HELLO with the right protocol version and, when tokens
are enrolled, its own token; it never receives anything before that. A reply is accepted
only from the connection of the node the task was sent to. A client that disconnects or
stops sending heartbeats fails its pending tasks at once, so the round goes on without it.
Malformed, oversized or unexpected frames are logged with the node's id and dropped; the
server keeps serving everyone else.

Memory: an upload of ``spill_bytes`` or more (64 MiB by default) is written to an
anonymous temporary file in ``spill_dir`` as its chunks arrive, and the engine reads it
back through a memory mapping, dropping each part once it has been validated or folded
(:mod:`fedhive.common.spill`); any number of such uploads stream in at once. A smaller
upload is staged in memory and holds a staging slot from its first chunk until the
engine is done with it (it asks for the next reply). At most ``max_staged_uploads``
uploads hold slots at once and, beyond the first, only while their sizes add up to at
most ``max_staged_bytes``; further uploads wait in gRPC flow control. So server memory
stays near global model + aggregate + the staged uploads, plus what each client may
send ahead into its flow-control window. gRPC sizes that window to the link's
bandwidth x delay (megabytes on a long link, more on loopback); ``upload_window_bytes``
fixes it instead, which bounds that memory and caps one upload's speed at about the
window per round trip.

Data plane: a task or reply of ``bulk_bytes`` or more moves on a side socket, with clients
that reached it (:mod:`fedhive.transport.bulk`); ``data_plane=False`` keeps to the stream.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import math
import os
import socket
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from fedhive.common.clock import Clock, SystemClock
from fedhive.common.errors import SerdeError, TransportError
from fedhive.common.message import Message
from fedhive.transport.base import (
    DEFAULT_MIN_UPLOAD_RATE,
    DEFAULT_STAGED_BYTES,
    Replies,
    Transport,
)
from fedhive.transport.bulk import DEFAULT_BULK_BYTES, DataPlane, split_host
from fedhive.transport.codec import decode_wire, encode_content, encode_wire
from fedhive.transport.frames import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Assembler,
    BufferPool,
)
from fedhive.transport.grpc_stream import (
    Connection,
    LogBudget,
    Outgoing,
    Pending,
    Refusal,
    Servicer,
    printable,
)
from fedhive.transport.limits import DEFAULT_MARGIN_BYTES, ReplyBound, reply_bound
from fedhive.transport.membership import Membership, NodeSet
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.security import ServerSecurity
from fedhive.transport.uploads import Free, SpillBudget, Staging
from fedhive.transport.wire import (
    SERVICE,
    WireFrame,
    message_frame_bytes,
    parse_frame,
    serialize_frame,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fedhive.common.serde import Pieces

__all__ = ["DEFAULT_SPILL_TOTAL", "DEFAULT_STAGED_BYTES", "GrpcServer", "ServerSecurity"]

#: Default of ``max_spill_bytes``: uploads staged on disk at once (beyond the first).
DEFAULT_SPILL_TOTAL = 16 << 30


log = logging.getLogger("fedhive.server")


class GrpcServer(Transport):
    """Serves ``Join`` streams and implements the engine's :class:`Transport`.

    Against hostile peers: a stream must say HELLO within ``hello_timeout`` seconds, and
    at most ``max_handshakes`` streams may be waiting to (more are refused at once with
    ``RESOURCE_EXHAUSTED``); a connection without streams is closed after
    ``max_connection_idle_s``, and any after ``max_connection_age_s`` when set (clients
    reconnect); a client whose frames are refused ``max_violations`` times is
    disconnected. While an upload waits for a staging slot (or spill budget), an upload
    (on the stream or the data plane) holding one that has sent nothing for
    ``upload_grace_s`` seconds, or less than
    ``min_upload_rate`` bytes a second since it got its slot (once it has held it that
    long), is refused and its client disconnected (it reconnects): two clients that open
    uploads and stop cannot keep everyone else's replies waiting. With nobody waiting a
    slow upload keeps its slot. Refusals are logged escaped and rate-limited, and the latest
    ``max_refused_kept`` are kept in :attr:`refused` (text) and :attr:`refusals`
    (``client_id``, ``round``, ``stage``, ``reason``). An upload may hold what a reply
    to its task can need (:func:`~fedhive.transport.limits.reply_bound`:
    ``reply_records`` model-sized records plus ``reply_margin_bytes``), and uploads
    staged on disk add up to at most ``max_spill_bytes`` beyond the first. The port is
    bound exclusively (no ``SO_REUSEPORT``): a second server on it fails.
    """

    max_refused_kept = 1000

    def __init__(
        self,
        address: str = "0.0.0.0:8080",
        *,
        client_manager: Membership | None = None,
        security: ServerSecurity | None = None,
        max_message_bytes: int = 1 << 40,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        heartbeat_timeout: float = 30.0,
        protocol_version: int = PROTOCOL_VERSION,
        max_staged_uploads: int = 2,
        max_staged_bytes: int | None = DEFAULT_STAGED_BYTES,
        upload_window_bytes: int | None = None,
        spill_bytes: int | None = DEFAULT_STAGED_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
        clock: Clock | None = None,
        reply_records: int = 2,
        reply_margin_bytes: int = DEFAULT_MARGIN_BYTES,
        max_spill_bytes: int | None = DEFAULT_SPILL_TOTAL,
        hello_timeout: float = 10.0,
        max_handshakes: int = 64,
        max_violations: int = 16,
        max_connection_idle_s: float = 300.0,
        max_connection_age_s: float | None = None,
        data_plane: bool = True,
        data_port: int = 0,
        bulk_bytes: int = DEFAULT_BULK_BYTES,
        min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE,
        upload_grace_s: float = 10.0,
    ) -> None:
        self.address = address
        # heartbeats are timed on it (a test moves a ManualClock past heartbeat_timeout)
        self.clock: Clock = clock or SystemClock()
        # told who joins and leaves: the engine's client manager, else a plain NodeSet
        self.client_manager: Membership = (
            client_manager if client_manager is not None else NodeSet()
        )
        self.security = security or ServerSecurity()
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.heartbeat_timeout = heartbeat_timeout
        self.protocol_version = protocol_version
        if max_staged_uploads < 1:
            raise TransportError(f"max_staged_uploads must be >= 1, got {max_staged_uploads}")
        if max_staged_bytes is not None and max_staged_bytes < 0:
            raise TransportError(f"max_staged_bytes must be >= 0, got {max_staged_bytes}")
        if upload_window_bytes is not None and upload_window_bytes < 1:
            raise TransportError(f"upload_window_bytes must be >= 1, got {upload_window_bytes}")
        if spill_bytes is not None and spill_bytes < 1:
            raise TransportError(f"spill_bytes must be >= 1 or None, got {spill_bytes}")
        if spill_dir is not None and not os.path.isdir(spill_dir):
            raise TransportError(f"spill_dir {os.fspath(spill_dir)!r} is not a directory")
        if reply_records < 1 or reply_margin_bytes < 0:
            raise TransportError(
                f"reply_records must be >= 1 and reply_margin_bytes >= 0, got "
                f"{reply_records} and {reply_margin_bytes}"
            )
        if max_spill_bytes is not None and max_spill_bytes < 0:
            raise TransportError(f"max_spill_bytes must be >= 0 or None, got {max_spill_bytes}")
        if hello_timeout <= 0 or max_handshakes < 1 or max_violations < 1:
            raise TransportError(
                f"hello_timeout must be > 0, max_handshakes and max_violations >= 1; got "
                f"{hello_timeout}, {max_handshakes}, {max_violations}"
            )
        if not (min_upload_rate >= 0 and upload_grace_s > 0) or math.isinf(upload_grace_s):
            raise TransportError(
                f"min_upload_rate must be >= 0 and upload_grace_s a number > 0; got "
                f"{min_upload_rate}, {upload_grace_s}"
            )
        if bulk_bytes < 1 or not 0 <= data_port < 65536:
            raise TransportError(
                f"bulk_bytes must be >= 1 and data_port a port; got {bulk_bytes}, {data_port}"
            )
        self.min_upload_rate = float(min_upload_rate)
        self.upload_grace_s = float(upload_grace_s)
        self.data_plane = data_plane
        self.data_port = data_port  # the bound port once started (0: none)
        self.bulk_bytes = bulk_bytes
        self._data: DataPlane | None = None
        self.hello_timeout = hello_timeout
        self.max_handshakes = max_handshakes
        self.max_violations = max_violations
        self.max_connection_idle_s = max_connection_idle_s
        self.max_connection_age_s = max_connection_age_s
        self._handshakes = 0  # streams that have not said HELLO yet
        self._log_budget = LogBudget()
        self.reply_records = reply_records
        self.reply_margin_bytes = reply_margin_bytes
        self.max_spill_bytes = max_spill_bytes
        self._spilling = SpillBudget(max_spill_bytes)
        self._bound: ReplyBound | None = None  # of a reply to the latest model sent
        # decoding a reply (its JSON header, its arrays' views) is kept off the event loop
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedhive-decode")
        self.max_staged_uploads = max_staged_uploads
        self.max_staged_bytes = max_staged_bytes
        self.upload_window_bytes = upload_window_bytes
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir
        self._staging = Staging(max_staged_uploads, max_staged_bytes)
        self._wire_sizes: dict[str, int] = {}  # message id -> bytes, until the engine asks
        self._buffers = BufferPool(max_free=max_staged_uploads, keep=self._uploads_queued)
        # where the data plane's uploads are written (its own sink; open ones are not kept)
        self._data_assembler = Assembler(
            max_message_bytes, pool=self._buffers, spill_bytes=spill_bytes, spill_dir=spill_dir
        )
        self.port: int | None = None
        self._connections: dict[str, Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._watchdog: asyncio.Task[None] | None = None
        #: the latest refusals, as text and as records (client id, round, stage, reason)
        self.refused: deque[str] = deque(maxlen=self.max_refused_kept)
        self.refusals: deque[dict[str, Any]] = deque(maxlen=self.max_refused_kept)

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

    def _options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.chunk_bytes + (1 << 16)),
            ("grpc.max_send_message_length", self.chunk_bytes + (1 << 16)),
            ("grpc.so_reuseport", 0),  # a second server on this port fails to bind
            # clients in one process share a connection (gRPC pools them): one stream each
            ("grpc.max_concurrent_streams", 4096),
            ("grpc.server_handshake_timeout_ms", int(self.hello_timeout * 1000)),
            ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", 5000),
            ]
        if self.upload_window_bytes is not None:
            options += [
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", self.upload_window_bytes),
            ]
        return options

    async def _open(self) -> None:
        server = aio.server(options=self._options())
        handlers = {
            "Join": grpc.stream_stream_rpc_method_handler(
                Servicer(self).Join,
                request_deserializer=parse_frame,
                response_serializer=serialize_frame,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        creds = self.security.credentials()
        try:
            if creds is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, creds)
        except RuntimeError:
            port = 0
        if port == 0:
            raise TransportError(f"could not bind {self.address}: {_bind_problem(self.address)}")
        if self.data_plane:
            host = split_host(self.address)
            try:
                self._data = DataPlane(self, host, self.data_port, self.max_handshakes)
            except OSError as exc:
                await server.stop(None)
                raise TransportError(
                    f"could not bind the data port {host}:{self.data_port}: {exc.strerror or exc}"
                ) from None
            self.data_port = self._data.port
        await server.start()
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
        if self._data is not None:
            self._data.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self, reason: str) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        connections = list(self._connections.values())
        for conn in connections:
            await conn.outbox.put([Frame(kind=Frame.BYE, text=reason)])
            await conn.outbox.put(None)
        # Let every stream write its BYE before the server stops: a client that misses it
        # would take the closed connection for a restart and keep reconnecting.
        waits = [asyncio.ensure_future(conn.closed.wait()) for conn in connections]
        if waits:
            await asyncio.wait(waits, timeout=5.0)
            for wait in waits:
                wait.cancel()
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
        shared: dict[int, Pieces] = {}
        batch = []
        for task in messages:
            key = id(task.content)
            if key not in shared:
                shared[key] = encode_content(task.content)
                self._learn_model(task.content)
            pieces = encode_wire(task, shared[key])
            self._wire_sizes[task.metadata.message_id] = sum(len(p) for p in pieces)
            batch.append((Message(task.metadata, None), pieces))
        self._loop.call_soon_threadsafe(self._route, batch, replies, self._bound)

    def wire_bytes(self, message: Message) -> int:
        """What this server sent (a task) or received (a reply) for ``message``."""
        size = self._wire_sizes.pop(message.metadata.message_id, None)
        return super().wire_bytes(message) if size is None else size

    def _learn_model(self, content: object) -> None:
        """A task carrying the model sets what replies may hold from now on."""
        parameters = getattr(content, "parameters", None)
        arrays = getattr(parameters, "arrays", None)
        if arrays:
            self._bound = reply_bound(arrays, self.reply_records, self.reply_margin_bytes)

    def _route(
        self, batch: list[tuple[Message, Pieces]], replies: Replies, bound: ReplyBound | None
    ) -> None:
        for task, pieces in batch:
            conn = self._connections.get(task.metadata.node_id)
            if conn is None:
                replies.put(task.error_reply("the client is not connected"))
                continue
            if replies.cancelled:
                continue  # given up on before it was routed
            mid = task.metadata.message_id
            conn.pending[mid] = Pending(task, replies, bound)
            out = Outgoing(mid, self._frames(conn, mid, pieces, bound))
            conn.queued[mid] = out
            conn.outbox.put_nowait(out)

    def _frames(
        self, conn: Connection, mid: str, pieces: Pieces, bound: ReplyBound | None
    ) -> Iterable[Frame | bytes]:
        """What goes on ``conn``'s stream for a task: its chunks, or what the data plane
        puts there instead (:meth:`DataPlane.frames`)."""
        chunks = message_frame_bytes(mid, pieces, self.chunk_bytes)
        if self._data is None or not conn.bulk:
            return chunks
        return self._data.frames(conn, mid, pieces, bound, chunks)

    def _data_ready(self, conn: Connection) -> None:
        """``conn``'s client reached the data plane: large messages may go there now."""
        if self._connections.get(conn.node_id) is conn:
            conn.bulk = True

    def _refuse_data(self, conn: Connection | None, reason: str) -> None:
        if conn is None:  # before a ticket said whose it is
            self.record_refusal(None, None, "data", reason)
        else:
            self._refuse(conn, reason, "data")

    def _fail_task(self, conn: Connection, mid: str, reason: str) -> None:
        """Answer task ``mid`` of ``conn`` with an error reply (if it still waits)."""
        pending = conn.pending.pop(mid, None)
        if pending is not None:
            pending.replies.put(pending.task.error_reply(reason))

    def _drop_abandoned(self) -> None:
        """Forget tasks whose mailbox was cancelled (the engine gave up on them): they no
        longer wait for a reply, and those not yet sent are not sent (nor kept)."""
        for conn in self._connections.values():
            for mid in [m for m, p in conn.pending.items() if p.replies.cancelled]:
                del conn.pending[mid]
                self._wire_sizes.pop(mid, None)
                out = conn.queued.pop(mid, None)
                if out is not None:
                    out.frames = None
        if self._data is not None:
            self._data.sweep()

    # -- connections -------------------------------------------------------------------------

    def _admit(self, hello: WireFrame, certified: Sequence[str] = ()) -> str:
        """The node id of an acceptable HELLO (``certified``: the names of the client's
        certificate, under mutual TLS), else raise with the reason."""
        if hello.kind != Frame.HELLO:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "expected HELLO first")
        if hello.protocol_version != self.protocol_version:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: the server speaks version {self.protocol_version}, "
                f"the client version {hello.protocol_version}; upgrade the older side",
            )
        node_id = hello.node_id
        if not node_id:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "HELLO without a node id")
        tokens = self.security.tokens
        if tokens is not None:
            expected = tokens.get(node_id)
            given = hello.token.encode("utf-8", "surrogatepass")
            if expected is None or not hmac.compare_digest(expected.encode("utf-8"), given):
                raise Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client {node_id!r} is not enrolled or its token is wrong",
                )
        # Under mutual TLS a certificate that names a node binds it: without tokens any
        # name it holds, with tokens an enrolled one (a certificate naming no enrolled node
        # proves membership only, and the token says which node).
        bound = tokens is None or any(name in tokens for name in certified)
        if self.security.require_client_auth and bound and node_id not in certified:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"node id {node_id!r} is not a name in its client certificate "
                f"({', '.join(map(repr, certified)) or 'none'}); connect as one of those",
            )
        if node_id in self._connections:
            raise Refusal(
                grpc.StatusCode.ALREADY_EXISTS, f"client {node_id!r} is already connected"
            )
        return node_id

    def _drop(self, conn: Connection, reason: str) -> None:
        for pending in conn.pending.values():
            pending.replies.put(pending.task.error_reply(reason))
        conn.pending.clear()
        if self._connections.get(conn.node_id) is conn:
            del self._connections[conn.node_id]
            self.client_manager.unregister(conn.node_id)
            log.info("client %s left: %s", printable(repr(conn.node_id)), reason)

    def _upload_bound(self, conn: Connection) -> ReplyBound | None:
        """What one upload of ``conn`` may hold: the widest bound of its pending tasks
        (``None`` when one of them has none: then only ``max_message_bytes`` applies)."""
        bound: ReplyBound | None = None
        for pending in conn.pending.values():
            if pending.bound is None:
                return None
            bound = pending.bound.widest(bound)
        return bound

    async def _deliver(self, conn: Connection, data: memoryview, free: Free) -> None:
        """Hand a complete upload to the engine; ``free`` (its staging slot or spill
        budget) runs when the engine is done with it."""
        bound = self._upload_bound(conn)
        loop = asyncio.get_running_loop()
        size = len(data)
        try:
            reply = await loop.run_in_executor(
                self._decoder, decode_wire, data, bound.header if bound else None
            )
        except SerdeError as exc:
            free()
            self._refuse(conn, f"malformed message: {exc}", "decode")
            self._fail_only_task(conn, f"its reply was malformed: {exc}")
            return
        finally:
            del data
        meta = reply.metadata
        self._wire_sizes[meta.message_id] = size
        pending = conn.pending.pop(meta.reply_to, None)
        if pending is None:
            free()
            self._refuse(conn, f"reply to a task it was not given ({meta.reply_to!r})", "reply")
            return
        if meta.node_id != conn.node_id:
            free()
            pending.replies.put(pending.task.error_reply("reply carried another node's id"))
            self._refuse(conn, f"reply claims to come from {meta.node_id!r}", "reply")
            return
        pending.replies.put(reply, release=functools.partial(self._free_from_engine, free))

    def _room_wanted(self) -> bool:
        """Whether an upload waits for a staging slot or spill budget."""
        return bool(self._staging.waiting or self._spilling.waiting)

    def _uploads_queued(self) -> bool:
        """Whether an upload waits for a slot: a freed upload buffer is then worth keeping."""
        return self._staging.waiting > 0

    def _free_from_engine(self, free: Free) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(free)

    def _fail_only_task(self, conn: Connection, reason: str) -> None:
        """A refused reply answers the task when the client had only one."""
        if len(conn.pending) == 1:
            self._fail_task(conn, next(iter(conn.pending)), reason)

    def _refuse(self, conn: Connection, reason: str, stage: str = "upload") -> None:
        """Record a refused frame or upload of ``conn``; disconnect a repeat offender."""
        self.record_refusal(conn.node_id, _round_of(conn), stage, reason)
        conn.violations += 1
        if conn.violations >= self.max_violations:
            self._evict(conn, f"too many refused frames ({conn.violations})", "disconnect")

    def _evict(self, conn: Connection, text: str, stage: str = "upload") -> None:
        """Record ``text`` and disconnect ``conn`` (``RESOURCE_EXHAUSTED``, once): its
        tasks fail with the reason, its stream ends and its uploads give their room back."""
        if conn.abort is not None:
            return
        self.record_refusal(conn.node_id, _round_of(conn), stage, text)
        conn.abort = (grpc.StatusCode.RESOURCE_EXHAUSTED, text)
        self._drop(conn, f"disconnected: {text}")
        conn.outbox.put_nowait(None)

    def record_refusal(
        self, client_id: str | None, server_round: int | None, stage: str, reason: str
    ) -> None:
        """Keep (bounded) and log (escaped, rate-limited) one refusal."""
        who = printable(repr(client_id) if client_id else "?")
        reason = printable(reason)
        text = f"refused from client {who}: {reason}"
        self.refused.append(text)
        self.refusals.append(
            {"client_id": client_id, "round": server_round, "stage": stage, "reason": reason}
        )
        skipped = self._log_budget.take()
        if skipped is not None:
            more = f" ({skipped} more refusals were not logged)" if skipped else ""
            log.warning("%s [%s]%s", text, stage, more)

    def _evict_slow_uploads(self, now: float) -> None:
        """While an upload waits for room, disconnect clients whose stream uploads
        holding room stall or crawl (:meth:`Uploads.too_slow`)."""
        if not self._room_wanted():
            return
        for conn in list(self._connections.values()):
            reason = None if conn.uploads is None else conn.uploads.too_slow(now)
            if reason is not None:
                self._evict(conn, f"upload too slow while others waited: {reason}")

    async def _watch_heartbeats(self) -> None:
        while True:
            # the check runs in real time; what counts as silence is measured on the clock
            await asyncio.sleep(min(1.0, self.heartbeat_timeout / 4, self.upload_grace_s / 4))
            self._drop_abandoned()
            now = self.clock.now()
            self._evict_slow_uploads(now)
            for conn in list(self._connections.values()):
                if not conn.waiting and now - conn.last_seen > self.heartbeat_timeout:
                    self._drop(conn, f"no heartbeat for {self.heartbeat_timeout:.0f} s")
                    conn.outbox.put_nowait(None)

    @property
    def connected(self) -> list[str]:
        return sorted(self._connections)


def _round_of(conn: Connection) -> int | None:
    """The round of ``conn``'s (first) pending task, for a refusal's record."""
    pending = next(iter(conn.pending.values()), None)
    return pending.task.metadata.server_round if pending is not None else None


def _bind_problem(address: str) -> str:
    """Why ``address`` cannot be bound, in words ("address already in use", ...)."""
    host, port = split_host(address), address.rpartition(":")[2]
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, kind, proto, _, where = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use (is another server running on that port?)"
        return exc.strerror or str(exc)
    except ValueError:
        return "not a host:port address"
    return "gRPC could not bind it"
