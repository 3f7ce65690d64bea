"""Cutting messages into frames and putting them back together, within a size limit."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.common.spill import SpillFile
from fedhive.transport.proto.fleet_pb2 import Frame
from fedhive.transport.wire import WireFrame

__all__ = [
    "Assembler",
    "BufferPool",
    "MemorySink",
    "Sink",
    "DEFAULT_CHUNK_BYTES",
    "PROTOCOL_VERSION",
]

PROTOCOL_VERSION = 2  # 2: binary message headers and packed compressed replies
DEFAULT_CHUNK_BYTES = 1 << 20


class BufferPool:
    """Recycles the buffers of large messages once nothing views them any more.

    Writing a message into fresh memory costs a page fault per page, which can cost more
    than copying the bytes. A buffer comes back when the last array viewing it is freed
    and is reused for the next message of about its size (at most twice smaller). It is
    kept only while ``keep()`` says another message is coming, and only the ``max_free``
    most recent idle buffers are kept. Messages under ``min_bytes`` are not pooled. A
    recycled buffer is overwritten in full before its message is complete, so nothing of
    an earlier message can be read through it.
    """

    def __init__(
        self,
        max_free: int = 1,
        min_bytes: int = DEFAULT_CHUNK_BYTES,
        keep: Callable[[], bool] = lambda: True,
    ) -> None:
        self.max_free = max_free
        self.min_bytes = min_bytes
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.RLock()  # a collection inside take() may give one back

    def take(self, nbytes: int) -> np.ndarray:
        """An uninitialised ``uint8`` array of ``nbytes``, recycled when possible."""
        if nbytes < self.min_bytes or self.max_free == 0:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.size <= 2 * nbytes]
            best = min(fits, key=lambda i: self._free[i].size, default=None)
            buffer = self._free.pop(best) if best is not None else None
        if buffer is None:
            # room for messages a little longer than this one (ids and metadata vary);
            # pages that are never written cost no memory
            buffer = np.empty(-(-nbytes // self.min_bytes) * self.min_bytes, np.uint8)
        view = buffer[:nbytes]
        weakref.finalize(view, self._give_back, buffer).atexit = False
        return view

    def _give_back(self, buffer: np.ndarray) -> None:
        """Keep ``buffer`` (the most recent ones, when there are too many)."""
        if not self.keep():
            return
        with self._lock:
            self._free.append(buffer)
            del self._free[: max(0, len(self._free) - self.max_free)]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._free)


class MemorySink:
    """A message being written into a buffer in memory (what :class:`SpillFile` is on disk)."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.view = memoryview(buffer)  # type: ignore[arg-type]
        self.nbytes = len(self.view)
        self.filled = 0

    def write(self, data: bytes | memoryview) -> None:
        self.view[self.filled : self.filled + len(data)] = data
        self.filled += len(data)

    def finish(self) -> memoryview:
        return self.view

    def close(self) -> None:
        """Nothing to release: the buffer goes when nothing views it."""


Sink = MemorySink | SpillFile  # a message being written, in memory or on disk


class Assembler:
    """Collects MESSAGE frames into whole messages, refusing anything inconsistent.

    At most ``max_message_bytes`` per message and ``max_open`` messages in progress at
    once (so a peer cannot make the receiver hold more than their product). Message
    buffers come from ``pool`` when one is given. A message of ``spill_bytes`` or more
    is written to a temporary file in ``spill_dir`` as it arrives instead of memory
    (see :mod:`fedhive.common.spill`); ``None`` keeps every message in memory.
    """

    def __init__(
        self,
        max_message_bytes: int,
        max_open: int = 4,
        pool: BufferPool | None = None,
        *,
        spill_bytes: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_open = max_open
        self.pool = pool or BufferPool(max_free=0)
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir
        self._open: dict[str, MemorySink | SpillFile] = {}

    def is_open(self, message_id: str) -> bool:
        return message_id in self._open

    def spills(self, total_size: int) -> bool:
        """Whether a message of ``total_size`` bytes is staged on disk."""
        return self.spill_bytes is not None and 0 < self.spill_bytes <= total_size

    @property
    def open_count(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        for sink in self._open.values():
            sink.close()
        self._open.clear()

    def add(
        self, frame: Frame | WireFrame, max_bytes: int | None = None
    ) -> tuple[str, memoryview] | None:
        """Add one frame; ``(message_id, bytes)`` when a message is complete. A message
        it starts may hold at most ``max_bytes`` (default ``max_message_bytes``)."""
        mid = frame.message_id
        if mid not in self._open:
            self._start(mid, frame.total_size, max_bytes)
        sink = self._open[mid]
        data = frame.data  # read once: each access may copy the bytes
        if frame.total_size != sink.nbytes:
            raise self._fail(mid, "total_size changed between chunks")
        if frame.offset != sink.filled or sink.filled + len(data) > sink.nbytes:
            raise self._fail(
                mid, f"chunk at offset {frame.offset} does not follow byte {sink.filled}"
            )
        try:
            sink.write(data)
        except OSError as exc:
            raise self._fail(mid, f"could not stage it on disk: {exc}") from None
        if frame.last != (sink.filled == sink.nbytes):
            raise self._fail(mid, "last flag does not match the declared size")
        if not frame.last:
            return None
        del self._open[mid]
        try:
            return mid, sink.finish()
        except OSError as exc:
            raise SerdeError(f"message {mid!r}: could not map it from disk: {exc}") from None

    def _start(self, mid: str, total: int, max_bytes: int | None = None) -> None:
        if not mid:
            raise SerdeError("MESSAGE frame without a message id")
        limit = self.max_message_bytes if max_bytes is None else max_bytes
        if total > limit:
            raise SerdeError(f"message {mid!r} declares {total} bytes, over the limit of {limit}")
        if len(self._open) >= self.max_open:
            raise SerdeError(f"more than {self.max_open} messages in progress at once")
        self._open[mid] = self.sink(mid, total)

    def sink(self, mid: str, total: int) -> Sink:
        """Where a message of ``total`` bytes is written: a file or a buffer in memory."""
        if self.spills(total):
            try:
                return SpillFile(total, self.spill_dir)
            except OSError as exc:
                raise SerdeError(f"message {mid!r}: cannot stage it on disk: {exc}") from None
        try:  # uninitialised: every byte is written before the message is complete
            return MemorySink(self.pool.take(total))
        except MemoryError:
            raise SerdeError(f"message {mid!r}: no memory for {total} bytes") from None

    def _fail(self, mid: str, reason: str) -> SerdeError:
        sink = self._open.pop(mid, None)
        if sink is not None:
            sink.close()
        return SerdeError(f"message {mid!r}: {reason}")
