"""Test doubles for code built on fedhive: a scripted transport and the clocks.

:class:`FakeTransport` stands in for clients: a function of each task says what comes
back (a reply's content, a whole :class:`~fedhive.common.message.Message`, or a
:class:`FakeReply` that delays, drops or duplicates it). Run the engine on a
:class:`VirtualClock` and delays are simulated time, so a test of stragglers and
deadlines takes no real time and always ends the same way::

    from fedhive.testing import FakeReply, FakeTransport, VirtualClock

    def answer(task):  # each client sends back the model; "slow" takes ten minutes
        res = FitRes(Status(Code.OK, ""), task.content.parameters, 1, {})
        return FakeReply(res, delay=600.0 if task.metadata.node_id == "slow" else 1.0)

    engine = Engine(strategy=FedAvg(...), transport=FakeTransport(answer),
                    client_manager=SimpleClientManager(["a", "b", "slow"]),
                    config=ServerConfig(round_timeout=60.0), clock=VirtualClock())
    engine.run()  # at once: "slow" times out after 60 simulated seconds

:class:`ManualClock` (moved only by the test) and :class:`VirtualClock` are re-exported
from :mod:`fedhive.common.clock`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, final

from fedhive.common.clock import ManualClock, VirtualClock
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message
from fedhive.transport.base import Replies, Transport

__all__ = ["DROP", "FakeReply", "FakeTransport", "ManualClock", "VirtualClock"]


@final
@dataclass(frozen=True)
class FakeReply:
    """What a :class:`FakeTransport` does with one task.

    ``reply`` is a :class:`~fedhive.common.message.Message` sent as it is (forged metadata
    included), or the content of ``task.reply(content)``; with ``error`` the reply is
    ``task.error_reply(error)`` instead. It arrives ``delay`` seconds after the task was
    sent: simulated seconds on a :class:`VirtualClock`, real ones on other clocks.
    ``copies`` is how many times it arrives (0: dropped, the task never answered; 2: a
    duplicate, which the engine must refuse).
    """

    reply: Any = None
    error: str | None = None
    delay: float = 0.0
    copies: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.delay, int | float) and self.delay >= 0):
            raise ConfigError(f"FakeReply.delay must be seconds >= 0, got {self.delay!r}")
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise ConfigError(f"FakeReply.copies must be an int >= 0, got {self.copies!r}")


#: The task is never answered.
DROP = FakeReply(copies=0)

Answer = Callable[[Message], Any]


@final
class FakeTransport(Transport):
    """A transport whose clients are one function: ``answer(task)``.

    ``answer`` returns a :class:`FakeReply`, a reply :class:`Message`, a list of those
    (several replies for one task, e.g. forgeries before the real one), or anything else
    as the content of the reply. If it raises, the task gets an error reply naming the
    exception, as a failing client would. Answers are computed in ``send``, in task
    order, so a fake run is deterministic; :attr:`sent` keeps every task sent.
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[Message] = []
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._closed = False

    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        if self._closed:
            raise RuntimeError("the transport is closed")
        for task in messages:
            self.sent.append(task)
            for message, delay in self._script(task):
                self._deliver(message, delay, replies)

    def _script(self, task: Message) -> list[tuple[Message, float]]:
        try:
            answer = self.answer(task)
        except Exception as exc:  # the fake client's failure becomes this task's error
            return [(task.error_reply(f"{type(exc).__name__}: {exc}"), 0.0)]
        plans = answer if isinstance(answer, list | tuple) else [answer]
        out = []
        for plan in plans:
            if not isinstance(plan, FakeReply):
                plan = FakeReply(plan)
            if plan.error is not None:
                message = task.error_reply(plan.error)
            elif isinstance(plan.reply, Message):
                message = plan.reply
            else:
                message = task.reply(plan.reply)
            out.extend([(message, float(plan.delay))] * plan.copies)
        return out

    def _deliver(self, message: Message, delay: float, replies: Replies) -> None:
        clock = replies.clock
        if isinstance(clock, VirtualClock):
            replies.expect(clock.now() + delay).put(message)
        elif delay == 0:
            replies.put(message)
        else:
            timer = threading.Timer(delay, replies.put, (message,))
            timer.daemon = True
            with self._lock:
                self._timers.append(timer)
            timer.start()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
