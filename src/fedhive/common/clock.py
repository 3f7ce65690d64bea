"""The engine's clock: every deadline is measured on it.

:class:`SystemClock` is real time. :class:`ManualClock` only moves when told to, so
tests (and simulations of stragglers) decide when a deadline has passed.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol, TypeVar

__all__ = ["Clock", "ManualClock", "SystemClock"]

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float: ...

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        """The next item of ``mailbox``; :class:`queue.Empty` once ``deadline`` has passed."""
        ...


class SystemClock:
    """Monotonic wall-clock time."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        if deadline is None:
            return mailbox.get()
        return mailbox.get(timeout=max(0.0, deadline - self.now()))


class ManualClock:
    """A clock that stands still until :meth:`advance` moves it."""

    def __init__(self, start: float = 0.0, poll_interval: float = 0.002) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._poll = poll_interval

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        while True:
            try:
                return mailbox.get(timeout=self._poll)
            except queue.Empty:
                if deadline is not None and self.now() >= deadline:
                    raise
