"""The engine's clock: every deadline, delay and backoff is measured on it.

:class:`SystemClock` is real time. :class:`ManualClock` only moves when told to, so
tests decide when a deadline has passed. :class:`VirtualClock` is a discrete-event clock
for simulation: a transport announces when each reply arrives in simulated time
(:meth:`VirtualClock.schedule`), and waiting jumps from one arrival to the next, in
``(time, announcement order)`` order, whatever order the replies were computed in. Hours
of simulated stragglers then take the seconds the clients need to compute, and a seeded
run gives the same history, timings on the clock included, on any number of workers.
"""

from __future__ import annotations

import heapq
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, final

from fedhive.common.errors import ConfigError

__all__ = ["Arrival", "Clock", "ManualClock", "SystemClock", "VirtualClock", "sleep_async"]

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float: ...

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        """The next item of ``mailbox``; :class:`queue.Empty` once ``deadline`` has passed."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass on this clock (really, or by moving a simulated clock)."""
        ...


def _check_seconds(seconds: float) -> float:
    if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"a duration must be a finite number of seconds >= 0, got {seconds!r}")
    return float(seconds)


class SystemClock:
    """Monotonic wall-clock time."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        if deadline is None:
            return mailbox.get()
        return mailbox.get(timeout=max(0.0, deadline - self.now()))

    def sleep(self, seconds: float) -> None:
        time.sleep(_check_seconds(seconds))


class ManualClock:
    """A clock that stands still until :meth:`advance` (or :meth:`sleep`) moves it.

    :meth:`wait` polls its mailbox in real time and gives up once someone has moved the
    clock past the deadline.
    """

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

    def sleep(self, seconds: float) -> None:
        """Move the clock by ``seconds`` at once (a sleeper never waits for itself)."""
        self.advance(_check_seconds(seconds))

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        while True:
            try:
                return mailbox.get(timeout=self._poll)
            except queue.Empty:
                if deadline is not None and self.now() >= deadline:
                    raise


async def sleep_async(clock: Clock, seconds: float) -> None:
    """:meth:`Clock.sleep` for coroutines: an asyncio sleep on the :class:`SystemClock`;
    on any other clock its own ``sleep`` (a simulated clock moves at once), then one turn
    of the event loop."""
    import asyncio  # only coroutine callers pay for it

    if isinstance(clock, SystemClock):
        await asyncio.sleep(_check_seconds(seconds))
        return
    clock.sleep(seconds)
    await asyncio.sleep(0)


_WAITING, _READY, _DONE = "waiting", "ready", "done"
# (arrival time, announcement number, arrival): the heap order is the delivery order
_Entry = tuple[float, int, "Arrival[Any]"]


@final
class Arrival(Generic[T]):
    """One item announced to enter a mailbox at a simulated time (:meth:`VirtualClock.schedule`).

    :meth:`put` hands over the item once it exists (a computed reply); the clock gives it
    to the mailbox's consumer when simulated time reaches :attr:`at` and every arrival
    announced before it for the same time has been given.
    """

    __slots__ = ("_clock", "_item", "_key", "_state", "at")

    def __init__(self, clock: VirtualClock, key: int, at: float) -> None:
        self._clock = clock
        self._key = key
        self._item: T | None = None
        self._state = _WAITING
        self.at = at

    def put(self, item: T, delay: float = 0.0) -> bool:
        """The item is ready; it arrives ``delay`` simulated seconds after the announced
        time (what only the item tells: the upload of a computed reply). ``False`` (and
        the item is not taken) if the arrival was withdrawn (:meth:`cancel`,
        :meth:`VirtualClock.cancel`)."""
        delay = _check_seconds(delay)
        with self._clock._cond:
            if self._state != _WAITING:
                return False
            self._item, self._state = item, _READY
            self.at += delay
            self._clock._cond.notify_all()
        return True

    def cancel(self) -> T | None:
        """Withdraw the arrival: it will not be waited for. Returns the item if it had
        been put but not yet taken, so the caller can free it."""
        with self._clock._cond:
            return self._clock._withdraw(self)

    def _take(self) -> T | None:
        item, self._item, self._state = self._item, None, _DONE
        return item


@final
class VirtualClock:
    """A discrete-event clock: simulated time jumps from one arrival to the next.

    A transport announces each reply with :meth:`schedule` when it sends the task (the
    arrival time is simulated: now plus the client's latency), and puts the reply into the
    returned :class:`Arrival` once it is computed. :meth:`wait` never sleeps for simulated
    time: it takes the mailbox's earliest announced arrival, waits (really) only until
    that one reply has been computed, moves :meth:`now` to its time and returns it; if the
    earliest arrival is after the deadline (or nothing is announced), it moves :meth:`now`
    to the deadline and raises :class:`queue.Empty`. Arrivals at the same time come in the
    order they were announced. An item may be put with a delay (:meth:`Arrival.put`): its
    announced time was a lower bound (a reply's upload takes what its size needs, known
    once it is computed), and it is delivered at the later time; the clock delivers an
    arrival only when it is the earliest of those put and no arrival still being computed
    was announced before its time. So the order of delivery, and the time of each, depend
    only on the announced times and delays, never on which worker thread finished first.

    Items put straight into a mailbox, unannounced, are taken first, at the current time.
    Time never goes back: an arrival announced for a time already passed is taken at once.

    ::

        clock = VirtualClock()
        mailbox = queue.SimpleQueue()
        late, early = clock.schedule(mailbox, 3600.0), clock.schedule(mailbox, 5.0)
        late.put("late"); early.put("early")
        clock.wait(mailbox, None), clock.now()   # ('early', 5.0)
        clock.wait(mailbox, deadline=60.0)       # raises queue.Empty; now() == 60.0
    """

    def __init__(self, start: float = 0.0, poll_interval: float = 0.01) -> None:
        self._now = float(start)
        self._cond = threading.Condition()
        self._sequence = 0
        # mailbox id -> (mailbox, heap of (time, sequence, arrival)); the mailbox is kept
        # so that its id is not reused while arrivals for it are pending
        self._pending: dict[int, tuple[queue.SimpleQueue[Any], list[_Entry]]] = {}
        self._poll = poll_interval
        # work the waiting thread may do itself (assist): each returns whether it did some
        self._helpers: list[Callable[[], bool]] = []

    def now(self) -> float:
        with self._cond:
            return self._now

    def assist(self, helper: Callable[[], bool]) -> None:
        """Let a thread that waits for an arrival still being computed call ``helper``
        (outside the clock's lock) instead of waiting: a transport without worker
        threads computes its next reply there. ``helper`` returns whether it did any
        work; when none does, the thread waits as usual."""
        with self._cond:
            self._helpers.append(helper)

    def unassist(self, helper: Callable[[], bool]) -> None:
        """Stop calling ``helper`` (see :meth:`assist`); unknown helpers are ignored."""
        with self._cond:
            if helper in self._helpers:
                self._helpers.remove(helper)

    def _help(self) -> bool:
        """Run the helpers once, without the lock (held once by the caller)."""
        helpers = list(self._helpers)
        self._cond.release()
        try:
            return any([helper() for helper in helpers])
        finally:
            self._cond.acquire()

    def advance(self, seconds: float) -> None:
        """Move simulated time forward by ``seconds``."""
        seconds = _check_seconds(seconds)
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass, at once (client backoff in simulation)."""
        self.advance(seconds)

    def schedule(self, mailbox: queue.SimpleQueue[T], at: float) -> Arrival[T]:
        """Announce an item that enters ``mailbox`` at simulated time ``at``."""
        if not (isinstance(at, int | float) and math.isfinite(at)):
            raise ConfigError(f"an arrival time must be a finite number, got {at!r}")
        with self._cond:
            key = id(mailbox)
            arrival: Arrival[T] = Arrival(self, key, float(at))
            entry = self._pending.setdefault(key, (mailbox, []))
            heapq.heappush(entry[1], (arrival.at, self._sequence, arrival))
            self._sequence += 1
            self._cond.notify_all()
            return arrival

    def cancel(self, mailbox: queue.SimpleQueue[T]) -> list[T]:
        """Withdraw every arrival announced for ``mailbox`` and not yet taken (its consumer
        has gone); returns the items already put, so the caller can free them."""
        with self._cond:
            entry = self._pending.pop(id(mailbox), None)
            if entry is None:
                return []
            items: list[T] = []
            for _, _, arrival in entry[1]:
                ready = arrival._state == _READY
                item = arrival._take()
                if ready:
                    items.append(item)  # type: ignore[arg-type]
            return items

    def pending(self, mailbox: queue.SimpleQueue[T]) -> int:
        """How many arrivals are announced for ``mailbox`` and not yet taken."""
        with self._cond:
            entry = self._pending.get(id(mailbox))
            return 0 if entry is None else len(entry[1])

    def next_at(self, mailbox: queue.SimpleQueue[T]) -> float | None:
        """The earliest time anything can enter ``mailbox``: now if an unannounced item
        waits in it, else the earliest time announced for it (a lower bound: an item put
        with a delay comes later), ``None`` if nothing is announced."""
        with self._cond:
            if not mailbox.empty():
                return self._now
            entry = self._pending.get(id(mailbox))
            return None if entry is None else entry[1][0][0]

    def wait(self, mailbox: queue.SimpleQueue[T], deadline: float | None) -> T:
        with self._cond:
            while True:
                try:
                    return mailbox.get_nowait()
                except queue.Empty:
                    pass
                entry = self._pending.get(id(mailbox))
                if entry is None:
                    if deadline is not None:
                        self._now = max(self._now, deadline)
                        raise queue.Empty
                    self._cond.wait(self._poll)  # only an unannounced put can end this
                    continue
                at, seq, first = entry[1][0]
                if deadline is not None and at > deadline:
                    self._now = max(self._now, deadline)
                    raise queue.Empty
                if first._state == _WAITING:
                    # The earliest arrival's reply is still being computed: compute
                    # something here if a helper can, else wait for it really (the poll
                    # only notices unannounced puts).
                    if not (self._helpers and self._help()):
                        self._cond.wait(self._poll)
                    continue
                if first.at > at:
                    # Put with a delay: it arrives later than announced. Every other
                    # arrival comes at or after its announced time, so the earliest is
                    # known once the heap's first is put without one; ties keep the
                    # order of announcement.
                    heapq.heapreplace(entry[1], (first.at, seq, first))
                    continue
                heapq.heappop(entry[1])
                if not entry[1]:
                    del self._pending[id(mailbox)]
                self._now = max(self._now, at)
                return first._take()  # type: ignore[return-value]

    def _withdraw(self, arrival: Arrival[T]) -> T | None:
        """Remove ``arrival`` from its mailbox's heap (call with the lock held)."""
        if arrival._state == _DONE:
            return None
        entry = self._pending.get(arrival._key)
        if entry is not None:
            heap = entry[1]
            heap[:] = [e for e in heap if e[2] is not arrival]
            heapq.heapify(heap)
            if not heap:
                del self._pending[arrival._key]
        self._cond.notify_all()
        ready = arrival._state == _READY
        item = arrival._take()
        return item if ready else None
