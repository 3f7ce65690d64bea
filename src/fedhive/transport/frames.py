"""Cutting messages into frames and putting them back together, within a size limit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fedhive.common.errors import SerdeError
from fedhive.transport.proto.fleet_pb2 import Frame

__all__ = [
    "Assembler",
    "DEFAULT_CHUNK_BYTES",
    "PROTOCOL_VERSION",
    "message_frames",
]

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 1 << 20


def message_frames(
    message_id: str, pieces: list[bytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Frame]:
    """MESSAGE frames carrying ``pieces`` (concatenated) in chunks of ``chunk_bytes``."""
    total = sum(len(p) for p in pieces)
    if total == 0:
        yield Frame(kind=Frame.MESSAGE, message_id=message_id, total_size=0, last=True)
        return
    offset = 0
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), chunk_bytes):
            chunk = view[start : start + chunk_bytes]
            yield Frame(
                kind=Frame.MESSAGE,
                message_id=message_id,
                total_size=total,
                offset=offset,
                data=bytes(chunk),
                last=offset + len(chunk) == total,
            )
            offset += len(chunk)


class Assembler:
    """Collects MESSAGE frames into whole messages, refusing anything inconsistent.

    At most ``max_message_bytes`` per message and ``max_open`` messages in progress at
    once (so a peer cannot make the receiver hold more than their product).
    """

    def __init__(self, max_message_bytes: int, max_open: int = 4) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_open = max_open
        self._open: dict[str, tuple[memoryview, int]] = {}

    def is_open(self, message_id: str) -> bool:
        return message_id in self._open

    @property
    def open_count(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        self._open.clear()

    def add(self, frame: Frame) -> tuple[str, memoryview] | None:
        """Add one frame; ``(message_id, bytes)`` when a message is complete."""
        mid = frame.message_id
        if mid not in self._open:
            self._start(mid, frame.total_size)
        buffer, filled = self._open[mid]
        data = frame.data  # read once: each access may copy the bytes
        if frame.total_size != len(buffer):
            raise self._fail(mid, "total_size changed between chunks")
        if frame.offset != filled or filled + len(data) > len(buffer):
            raise self._fail(mid, f"chunk at offset {frame.offset} does not follow byte {filled}")
        buffer[filled : filled + len(data)] = data
        filled += len(data)
        if frame.last != (filled == len(buffer)):
            raise self._fail(mid, "last flag does not match the declared size")
        if not frame.last:
            self._open[mid] = (buffer, filled)
            return None
        del self._open[mid]
        return mid, buffer

    def _start(self, mid: str, total: int) -> None:
        if not mid:
            raise SerdeError("MESSAGE frame without a message id")
        if total > self.max_message_bytes:
            raise SerdeError(
                f"message {mid!r} declares {total} bytes, over the limit of "
                f"{self.max_message_bytes}"
            )
        if len(self._open) >= self.max_open:
            raise SerdeError(f"more than {self.max_open} messages in progress at once")
        # uninitialised: every byte is written before the message is complete
        self._open[mid] = (memoryview(np.empty(total, np.uint8)), 0)  # type: ignore[arg-type]

    def _fail(self, mid: str, reason: str) -> SerdeError:
        self._open.pop(mid, None)
        return SerdeError(f"message {mid!r}: {reason}")
