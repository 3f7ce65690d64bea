"""Uploads on the gRPC server: the staging slots and spill budget that bound what is held,
and one connection's uploads in progress (:class:`Uploads`).

An upload holds a slot (in memory, or spill budget on disk) from its first frame until the
engine is done with its reply, so memory stays near model + aggregate + the cap while
other uploads wait in gRPC flow control (docs/design.md, Deployment over gRPC).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedhive.common.errors import SerdeError, TransportError
from fedhive.transport.frames import Assembler

if TYPE_CHECKING:
    from fedhive.transport.grpc_server import GrpcServer
    from fedhive.transport.grpc_stream import Connection
    from fedhive.transport.wire import WireFrame

__all__ = [
    "Free",
    "Once",
    "Progress",
    "SpillBudget",
    "Staging",
    "TooSlow",
    "Uploads",
    "hold",
    "nothing",
    "upload_limit",
]


Free = Callable[[], None]  # gives back what one upload holds (a staging slot, spill budget)


def nothing() -> None:
    """What an upload that holds nothing gives back."""


class Staging:
    """Upload slots: at most ``count`` held and, beyond the first, ``budget`` bytes in all.

    Waiters are served in arrival order. Lives on the event loop.
    """

    def __init__(self, count: int, budget: int | None) -> None:
        self.count = count
        self.budget = budget
        self.held = 0
        self.bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, nbytes: int) -> bool:
        if self.held >= self.count:
            return False
        return self.held == 0 or self.budget is None or self.bytes + nbytes <= self.budget

    def _take(self, nbytes: int) -> None:
        self.held += 1
        self.bytes += nbytes

    async def acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        entry = (nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(nbytes)  # granted to a reader that is gone
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, nbytes: int) -> None:
        self.held -= 1
        self.bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, future = self._waiters.popleft()
            if not future.done():
                self._take(nbytes)
                future.set_result(None)


class SpillBudget(Staging):
    """Bytes of uploads staged on disk at once: any number of uploads, and beyond the
    first only while their sizes add up to at most ``budget``."""

    def __init__(self, budget: int | None) -> None:
        super().__init__(1 << 62, budget)

    def _take(self, nbytes: int) -> None:  # not a memory slot (tests count those)
        self.held += 1
        self.bytes += nbytes


class Uploads:
    """One connection's uploads in progress, each holding a staging slot.

    A complete upload hands its slot on with the reply: it is freed when the engine is
    done with the reply, or at once if the reply is refused.
    """

    def __init__(self, server: GrpcServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.assembler = Assembler(
            server.max_message_bytes,
            pool=server._buffers,
            spill_bytes=server.spill_bytes,
            spill_dir=server.spill_dir,
        )
        self.staged: dict[str, Free] = {}
        self.progress: dict[str, Progress] = {}  # of each upload holding room
        self.limit = server.max_message_bytes  # of the upload being opened

    async def add(self, frame: WireFrame) -> None:
        """Take one MESSAGE frame; a complete upload goes to the engine."""
        server, conn, mid = self.server, self.conn, frame.message_id
        if not self.assembler.is_open(mid):
            if self.assembler.open_count >= len(conn.pending):
                server._refuse(conn, "upload without a task waiting for it")
                return
            self.limit = upload_limit(server, conn)
            size = frame.total_size
            if mid and size <= self.limit:
                spills = self.assembler.spills(size)
                self.staged[mid] = await hold(server, self.conn, size, spills)  # backpressure
                self.progress[mid] = Progress(server)
        if mid in self.progress:
            self.progress[mid].got(len(frame.data))
        try:
            done = self.assembler.add(frame, self.limit)
        except SerdeError as exc:
            self._abandon(mid)
            server._refuse(conn, str(exc))
            server._fail_only_task(conn, f"its reply was refused: {exc}")
            return
        if done is not None:
            self.progress.pop(mid, None)
            await server._deliver(conn, done[1], self.staged.pop(mid, nothing))

    def _abandon(self, mid: str) -> None:
        if not self.assembler.is_open(mid) and mid in self.staged:
            self.progress.pop(mid, None)
            self.staged.pop(mid)()

    def too_slow(self, now: float) -> str | None:
        """Why one of the uploads holding room is too slow (:meth:`Progress.too_slow`)."""
        return next(filter(None, (p.too_slow(now) for p in self.progress.values())), None)

    def close(self) -> None:
        """Free the slots of uploads the client will never finish."""
        for free in self.staged.values():
            free()
        self.staged.clear()
        self.progress.clear()
        self.assembler.clear()


class TooSlow(TransportError):
    """A data-plane upload holding room moved too slowly while another waited for some."""


class Progress:
    """How fast one upload holding room moves, on the server's clock. The stream's are
    asked by the server's watch loop (:meth:`Uploads.too_slow`); a data-plane transfer
    thread asks its own at each receive and every :attr:`poll` seconds of silence."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.granted = self.last = server.clock.now()
        self.received = 0.0
        #: how long one receive may block before the data plane asks again
        self.poll = max(0.05, min(server.upload_grace_s, server.heartbeat_timeout) / 2)

    def got(self, nbytes: int) -> None:
        self.last = self.server.clock.now()
        self.received += nbytes

    def too_slow(self, now: float) -> str | None:
        """Why this upload is too slow, while another waits for room (else None): once
        it has held its room ``upload_grace_s`` seconds, nothing sent for that long, or
        under ``min_upload_rate`` bytes a second on average."""
        server = self.server
        if not server._room_wanted():
            return None
        held, grace, rate = now - self.granted, server.upload_grace_s, server.min_upload_rate
        if held < grace:
            return None
        if now - self.last >= grace:
            return f"nothing sent for {now - self.last:.0f} s"
        if self.received < rate * held:
            return f"{self.received / held:.0f} bytes/s over {held:.0f} s, below {rate:.0f}"
        return None

    def check(self, silent: bool = False) -> None:
        """:class:`TooSlow` when :meth:`too_slow`; after a receive that timed out
        (``silent``), ``TimeoutError`` past the heartbeat timeout."""
        now = self.server.clock.now()
        if silent and now - self.last >= self.server.heartbeat_timeout:
            raise TimeoutError(f"nothing received for {now - self.last:.0f} s")
        reason = self.too_slow(now)
        if reason is not None:
            raise TooSlow(f"upload too slow while others waited: {reason}")


def upload_limit(server: GrpcServer, conn: Connection) -> int:
    """The most bytes an upload of ``conn`` may declare: what a reply to its pending tasks
    can hold (their widest bound), and never more than ``max_message_bytes``."""
    bound = server._upload_bound(conn)
    limit = server.max_message_bytes
    return limit if bound is None else min(limit, bound.max_bytes)


async def hold(server: GrpcServer, conn: Connection, size: int, spills: bool) -> Free:
    """Wait until an upload of ``size`` bytes may start: a staging slot in memory, or
    room in the spill budget on disk (``spills``); returns what gives it back."""
    budget = server._spilling if spills else server._staging
    conn.waiting = True
    try:
        await budget.acquire(size)
    finally:
        conn.waiting = False
        conn.last_seen = server.clock.now()
    return Once(functools.partial(budget.release, size))


class Once:
    """Runs ``fn`` the first time it is called only (a slot is given back once)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Free) -> None:
        self.fn: Free | None = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()
