"""The one interface between the engine and its clients.

A transport has one method, :meth:`Transport.send`: it takes tasks and, as each client
answers, puts exactly one reply per task into the :class:`Replies` mailbox it was given
(an error reply when the client failed). ``send`` returns at once; the engine reads
replies as they arrive, on its own clock, and may call ``send`` again on the same
mailbox (asynchronous aggregation keeps a pool of clients busy that way).
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from fedhive.common.clock import Clock, SystemClock
from fedhive.common.message import Message

__all__ = ["DEFAULT_STAGED_BYTES", "Replies", "Transport"]

#: Default of the server's ``max_staged_bytes`` and ``spill_bytes``: uploads in memory at
#: once (beyond the first), and the size from which an upload is staged on disk.
DEFAULT_STAGED_BYTES = 64 << 20


class Replies:
    """A thread-safe mailbox for the replies to one or more ``send`` calls.

    One consumer (the engine) takes replies with :meth:`get`. A reply may come with a
    ``release`` callback, which frees what the transport holds for it (an upload slot);
    it runs once the consumer is done with that reply: when it asks for the next one, or
    cancels. A consumer that keeps no reference to the reply by then has freed its memory
    before the transport is told it may take in another.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._mailbox: queue.SimpleQueue[tuple[Message, Callable[[], None] | None]] = (
            queue.SimpleQueue()
        )
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._current: Callable[[], None] | None = None

    def put(self, reply: Message, release: Callable[[], None] | None = None) -> None:
        """Deliver a reply; ``release`` runs when the consumer is done with it.

        After :meth:`cancel` nobody will take it, so it is dropped at once.
        """
        if self.cancelled:
            if release is not None:
                release()
            return
        self._mailbox.put((reply, release))

    def get(self, deadline: float | None = None) -> Message | None:
        """The next reply, or ``None`` once ``deadline`` (engine clock time) has passed.

        Releases the reply returned by the previous call first.
        """
        self._release_current()
        try:
            reply, release = self.clock.wait(self._mailbox, deadline)
        except queue.Empty:
            return None
        with self._lock:
            self._current = release
        return reply

    def _release_current(self) -> None:
        with self._lock:
            release, self._current = self._current, None
        if release is not None:
            release()

    def cancel(self) -> None:
        """Tell the transport that replies are no longer wanted (tasks not started are dropped).

        The last reply taken and replies delivered but not taken are released.
        """
        self._cancelled.set()
        self._release_current()
        while True:
            try:
                _, release = self._mailbox.get_nowait()
            except queue.Empty:
                return
            if release is not None:
                release()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Transport(ABC):
    """Delivers tasks to clients and their replies back."""

    @abstractmethod
    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        """Start delivering ``messages``; each reply goes into ``replies`` when it comes."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers and connections."""
