"""One client's ``Join`` stream on the gRPC server: the connection's state, the HELLO
handshake and the loops that write its tasks and read its frames.

Internal to :mod:`fedhive.transport.grpc_server`, which owns the connections, admits
clients (``_admit``) and takes what they upload (:class:`~fedhive.transport.uploads.Uploads`);
split from it so that module holds the transport and this one a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from fedhive.common.errors import FedhiveError
from fedhive.common.message import Message
from fedhive.transport.base import Replies
from fedhive.transport.bulk import PROBE
from fedhive.transport.limits import ReplyBound
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.uploads import Uploads

if TYPE_CHECKING:
    from fedhive.transport.grpc_server import GrpcServer

__all__ = [
    "Connection",
    "LogBudget",
    "Outgoing",
    "Pending",
    "Refusal",
    "Servicer",
    "certificate_names",
    "printable",
]

log = logging.getLogger("fedhive.server")


@dataclass
class Pending:
    """A task sent on a connection and not yet answered."""

    task: Message  # its metadata only: the model it carried is not kept alive
    replies: Replies
    bound: ReplyBound | None  # what its reply may hold (None: only max_message_bytes)


class Outgoing:
    """A task's frames waiting in an outbox; ``frames`` is ``None`` once it was dropped
    (the engine gave up on the task), so its model is not kept for it."""

    __slots__ = ("frames", "message_id")

    def __init__(self, message_id: str, frames: Iterable[bytes]) -> None:
        self.message_id = message_id
        self.frames: Iterable[bytes] | None = frames


@dataclass
class Connection:
    """One admitted client's stream: what waits to be sent, what awaits a reply."""

    node_id: str
    outbox: asyncio.Queue[Iterable[Frame | bytes] | Outgoing | None]
    pending: dict[str, Pending] = field(default_factory=dict)
    queued: dict[str, Outgoing] = field(default_factory=dict)  # tasks not yet being sent
    last_seen: float = 0.0
    waiting: bool = False  # held back by the staging cap, not silent
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # its stream has ended
    violations: int = 0  # frames refused so far
    abort: tuple[grpc.StatusCode, str] | None = None  # how its stream is to end
    bulk: bool = False  # its client reached the data plane (transport/bulk.py)
    uploads: Uploads | None = None  # its stream uploads in progress, while it reads


def printable(text: str, limit: int = 500) -> str:
    """``text`` with control and other unprintable characters escaped, cut to ``limit``:
    what a peer sent never forges a log line or a terminal escape."""
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return out if len(out) <= limit else out[:limit] + "..."


class LogBudget:
    """At most ``per_second`` log lines a second (a token bucket of ``burst``)."""

    def __init__(self, per_second: float = 10.0, burst: float = 20.0) -> None:
        self.rate, self.burst = per_second, burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.skipped = 0

    def take(self) -> int | None:
        """``None`` when this line is not to be logged, else how many were skipped before."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.skipped += 1
            return None
        self.tokens -= 1
        skipped, self.skipped = self.skipped, 0
        return skipped


def certificate_names(context: aio.ServicerContext) -> list[str]:
    """The common name and subject alternative names of the peer's certificate."""
    auth = context.auth_context()  # without TLS: no certificate, no names
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for raw in auth.get(key, ()):
            names.append(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    return names


class Refusal(FedhiveError):
    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Servicer:
    def __init__(self, server: GrpcServer) -> None:
        self.server = server

    async def Join(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        server = self.server
        if server._handshakes >= server.max_handshakes:
            text = f"too many connections ({server.max_handshakes}) waiting to say HELLO"
            server.record_refusal(None, None, "hello", text)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, text)
            return
        server._handshakes += 1
        try:
            hello = await asyncio.wait_for(context.read(), server.hello_timeout)
        except TimeoutError:
            hello = None
        finally:
            server._handshakes -= 1
        if hello is None:
            text = f"no HELLO within {server.hello_timeout:g} s"
            server.record_refusal(None, None, "hello", text)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, text)
            return
        if hello is aio.EOF:
            return
        try:
            node_id = server._admit(hello, certificate_names(context))
        except Refusal as refusal:
            server.record_refusal(hello.node_id or None, None, "hello", refusal.text)
            await context.abort(refusal.code, printable(refusal.text))
            return
        loop = asyncio.get_running_loop()
        conn = Connection(node_id, asyncio.Queue(), last_seen=server.clock.now())
        server._connections[node_id] = conn
        welcome = Frame(kind=Frame.WELCOME, protocol_version=server.protocol_version)
        if server._data is not None:
            welcome.data_port = server.data_port
            welcome.token = server._data.issue(PROBE, conn)
        await context.write(welcome)
        server.client_manager.register(node_id)
        log.info("client %s joined", printable(repr(node_id)))
        reader = loop.create_task(self._read(conn, context))
        try:
            while True:
                item = await conn.outbox.get()
                if item is None:
                    break
                if isinstance(item, Outgoing):
                    conn.queued.pop(item.message_id, None)
                    frames, item.frames = item.frames, None
                    if frames is None:
                        continue  # dropped while it waited
                else:
                    frames = item
                del item
                for frame in frames:
                    await context.write(frame)
                del frames
        finally:
            reader.cancel()
            server._drop(conn, "the client disconnected")
            conn.closed.set()
        if conn.abort is not None:
            await context.abort(*conn.abort)

    async def _read(self, conn: Connection, context: aio.ServicerContext) -> None:
        server = self.server
        uploads = conn.uploads = Uploads(server, conn)
        try:
            while True:
                frame = await context.read()
                if frame is aio.EOF:
                    break
                conn.last_seen = server.clock.now()
                if frame.kind == Frame.HEARTBEAT:
                    continue
                if frame.kind != Frame.MESSAGE:
                    server._refuse(conn, f"unexpected frame kind {frame.kind}", "frame")
                    continue
                await uploads.add(frame)
        except (aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            uploads.close()
        server._drop(conn, "the client disconnected")
        conn.outbox.put_nowait(None)
