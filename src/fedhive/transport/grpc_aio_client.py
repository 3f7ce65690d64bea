"""The client side of fedhive's gRPC transport on asyncio: many sessions, one thread.

:class:`AsyncClientSession` speaks the same protocol as
:class:`~fedhive.transport.grpc_client.ClientSession` (HELLO, tasks in and replies out,
heartbeats, BYE) on a ``grpc.aio`` channel, so hundreds of sessions can share one event
loop. The client's own work (``handle(task) -> reply``: fit, evaluate) runs in an
executor, so a long fit never stops the session's heartbeats, and the loop only moves
frames. A session costs a few coroutines instead of three or four threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor

import grpc
from grpc import aio

from fedhive.common.message import Message
from fedhive.transport.frames import Assembler
from fedhive.transport.grpc_client import (
    DATA_KINDS,
    Retryable,
    SessionEnd,
    SessionOptions,
    check_welcome,
    read_task,
    translate_rpc_error,
)
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.wire import METHOD, WireFrame, parse_frame, serialize_frame

__all__ = ["AsyncClientSession"]

log = logging.getLogger("fedhive.client")


class AsyncClientSession(SessionOptions):
    """One connection on the running event loop: HELLO, then tasks in and replies out
    until BYE or a failure.

    ``handle(task) -> reply`` runs in :attr:`executor` (the loop's default executor when
    ``None``). :meth:`run` raises :class:`~fedhive.common.errors.AuthenticationError` if
    refused, :class:`~fedhive.transport.grpc_client.Retryable` (or another
    :class:`~fedhive.common.errors.TransportError`) if the connection fails, and returns
    :class:`~fedhive.transport.grpc_client.SessionEnd` after a BYE.
    """

    #: Where ``handle`` runs; ``None``: the event loop's default executor.
    executor: Executor | None = None

    def _setup(self) -> None:
        self._write_lock = asyncio.Lock()
        self._probe: asyncio.Future[bool] | None = None  # keeps the probe's task referenced

    async def run(self) -> SessionEnd:
        channel = self.security.aio_channel(self.address, self.channel_options())
        beat: asyncio.Task[None] | None = None
        try:
            join = channel.stream_stream(
                METHOD, request_serializer=serialize_frame, response_deserializer=parse_frame
            )
            call = join()
            await self._write(call, [self.hello()])
            await self._welcome(call)
            beat = asyncio.get_running_loop().create_task(self._heartbeat(call))
            return await self._serve(call)
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc, self.address, self.security) from None
        finally:
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
            await channel.close()

    async def _write(self, call: aio.StreamStreamCall, frames: Iterable[Frame | bytes]) -> None:
        """Write ``frames`` in order; one writer at a time per stream."""
        async with self._write_lock:
            for raw in frames:
                await call.write(raw)

    async def _heartbeat(self, call: aio.StreamStreamCall) -> None:
        beat = Frame(kind=Frame.HEARTBEAT)
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._write(call, [beat])
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the stream is over; reading it tells why

    async def _read(self, call: aio.StreamStreamCall) -> WireFrame | None:
        frame = await call.read()
        return None if frame is aio.EOF else frame

    async def _welcome(self, call: aio.StreamStreamCall) -> None:
        first = await self._read(call)
        if first is None:
            raise Retryable(f"{self.address} closed the connection before WELCOME")
        check_welcome(first, self.address, self.node_id)
        probe = self.offered(first)
        if probe is not None:
            self._probe = asyncio.get_running_loop().run_in_executor(None, probe)

    async def _serve(self, call: aio.StreamStreamCall) -> SessionEnd:
        assembler = Assembler(self.max_message_bytes, pool=self._buffers)
        loop = asyncio.get_running_loop()
        while (frame := await self._read(call)) is not None:
            task: Message | SessionEnd | None
            if frame.kind == Frame.BULK:
                task = await loop.run_in_executor(None, self.data_frame, frame)
            elif frame.kind in DATA_KINDS:
                task = self.data_frame(frame)
            else:
                task = read_task(frame, assembler)
            if isinstance(task, SessionEnd):
                return task
            if task is None:
                continue
            reply = await loop.run_in_executor(self.executor, self.handle, task)
            del task  # the received model, unless the reply shares it
            # each frame is cut from the reply's arrays as it is written, so the arrays
            # are not copied whole and may change again once the last frame is written
            pieces = self.reply_pieces(reply)
            if not (
                self.link is not None
                and self.wants_upload(reply, pieces)
                and await loop.run_in_executor(
                    None, self.link.upload, reply.metadata.reply_to, pieces
                )
            ):
                await self._write(call, self.frames(reply, pieces))
            del reply, pieces
        raise Retryable("the server closed the connection")
