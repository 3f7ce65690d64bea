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

__all__ = ["Replies", "Transport"]


class Replies:
    """A thread-safe mailbox for the replies to one or more ``send`` calls."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._mailbox: queue.SimpleQueue[tuple[Message, Callable[[], None] | None]] = (
            queue.SimpleQueue()
        )
        self._cancelled = threading.Event()

    def put(self, reply: Message, on_taken: Callable[[], None] | None = None) -> None:
        """Deliver a reply; ``on_taken`` runs when the engine takes it (to free staging).

        After :meth:`cancel` nobody will take it, so it is dropped at once.
        """
        if self.cancelled:
            if on_taken is not None:
                on_taken()
            return
        self._mailbox.put((reply, on_taken))

    def get(self, deadline: float | None = None) -> Message | None:
        """The next reply, or ``None`` once ``deadline`` (engine clock time) has passed."""
        try:
            reply, on_taken = self.clock.wait(self._mailbox, deadline)
        except queue.Empty:
            return None
        if on_taken is not None:
            on_taken()
        return reply

    def cancel(self) -> None:
        """Tell the transport that replies are no longer wanted (tasks not started are dropped).

        Replies already delivered but not taken are released.
        """
        self._cancelled.set()
        while True:
            try:
                _, on_taken = self._mailbox.get_nowait()
            except queue.Empty:
                return
            if on_taken is not None:
                on_taken()

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
