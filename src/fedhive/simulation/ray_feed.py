"""Feeding Ray actors tasks in batches, each batch's failure narrowed to the task that failed.

One Ray call per task costs the driver about half a millisecond of Ray's own work (submit,
schedule, fetch), ten times what a trivial client costs on the thread backend. So each
actor has a feeder thread that hands it a *batch* of queued tasks per call, and keeps a
second call queued behind the running one so the actor never waits for the driver. The
batch size adapts to what clients cost: as many tasks as take about ``batch_seconds``
(one task while the cost is unknown), and at most ``batch_bytes`` of replies, so slow
or large clients go one per call and their replies stream as before.

Faults keep their per-task meaning:

- an actor that dies (killed, out of memory, a segfault) during a call is replaced and
  the call's tasks are queued again *alone* (also a call of one task not yet retried:
  a finished call's reply can be lost with its actor when the next call kills it); the
  task that kills its actor when alone fails with the reason, the others succeed;
- with ``task_timeout``, a batch of ``n`` tasks may run ``task_timeout`` plus ``n - 1``
  times a generous bound on a task's cost (ten times the running estimate plus a tenth
  of a second, at most ``task_timeout``); past that its actor is replaced and its tasks
  are queued again alone, each with its own ``task_timeout``. The slow one fails alone;
- a call whose tasks nobody waits for any more (their round is over) is stopped and its
  actor replaced; queued tasks of such a round are dropped before they are sent.

Every wait is in ticks of ``tick`` seconds, so a closed feed or a passed deadline is seen.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedhive.client.context import Context
from fedhive.common.message import Message
from fedhive.common.records import RecordDict
from fedhive.transport.base import Replies
from fedhive.transport.inprocess import reply_nbytes

__all__ = ["ActorFeed", "FeedItem"]

log = logging.getLogger("fedhive")

#: Calls queued on one actor at once: the running one and the next.
DEPTH = 2
_SMOOTHING = 0.3  # weight of the newest batch in the running estimates
_FINISHING = threading.Lock()  # makes an item's outcome final


@dataclass(eq=False)
class FeedItem:
    """One task for an actor, and (once :attr:`finished`) its outcome."""

    task: Message  # as the engine sent it (failures reply to it)
    sent: Message  # what travels: without the model, which goes by reference
    model: Any  # the model's object-store reference, or None
    #: makes the task's context (reads the client's state) when it goes into a call, so a
    #: queued task holds no state; it may raise, which fails that task only
    load: Callable[[], Context]
    replies: Replies | None
    solo: bool = False  # retried after a batch failed: runs in a call of its own
    reply: Message | None = None
    state: RecordDict | None = None
    content_bytes: int | None = None  # the reply's encoded content, as its actor measured
    finished: bool = False
    #: called once with the finished item, on the thread that finished it
    on_done: Callable[[FeedItem], None] | None = None
    # made only for a caller that waits (:attr:`done`): a round makes an item per task
    _event: threading.Event | None = field(default=None, repr=False)

    @property
    def done(self) -> threading.Event:
        """An event set once the item is finished."""
        with _FINISHING:
            if self._event is None:
                self._event = threading.Event()
                if self.finished:
                    self._event.set()
            return self._event

    def fail(self, reason: str) -> None:
        self.finish(self.task.error_reply(reason), None)

    def finish(
        self, reply: Message, state: RecordDict | None, content_bytes: int | None = None
    ) -> None:
        """Set the outcome; only the first one counts (a late failure changes nothing)."""
        with _FINISHING:
            if self.finished:
                return
            self.reply, self.state, self.content_bytes = reply, state, content_bytes
            self.finished = True
            if self._event is not None:
                self._event.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # a feeder must outlive what is done with a reply
                log.exception("handling the reply of a Ray task failed")

    @property
    def abandoned(self) -> bool:
        return self.replies is not None and self.replies.cancelled


@dataclass(eq=False)
class _Call:
    ref: Any
    items: list[FeedItem]
    started: float | None = None  # when the actor began it (the call before it ended)


class ActorFeed:
    """Queues tasks and feeds them to the actors of ``pool`` in batches (module docstring)."""

    def __init__(
        self,
        ray: Any,
        pool: Any,
        *,
        task_timeout: float | None,
        start_timeout: float,
        tick: float,
        max_batch: int = 128,
        batch_seconds: float = 0.05,
        batch_bytes: int = 8 << 20,
    ) -> None:
        self.ray = ray
        self.pool = pool
        self.task_timeout = task_timeout
        self.start_timeout = start_timeout
        self.tick = tick
        self.max_batch = max_batch
        self.batch_seconds = batch_seconds
        self.batch_bytes = batch_bytes
        self.task_seconds: float | None = None  # running estimate of one task's cost
        self.reply_bytes = 0.0  # running estimate of one reply's arrays
        self.calls = 0  # Ray calls made (a batch is one)
        self._queue: collections.deque[FeedItem] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stopped = 0
        self._feeders = [_Feeder(self) for _ in pool.live]
        self._threads = [
            threading.Thread(target=feeder.drive, name=f"fedhive-ray-feed-{i}", daemon=True)
            for i, feeder in enumerate(self._feeders)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, items: list[FeedItem]) -> None:
        """Queue ``items`` without waiting: each one's ``on_done`` gets its outcome."""
        with self._cond:
            if not self._closed:
                self._queue.extend(items)
                self._cond.notify_all()
                return
        for item in items:
            item.fail("the Ray backend is closed")

    def requeue(self, items: list[FeedItem], solo: bool) -> None:
        """Put ``items`` back at the front of the queue (alone in a call, if ``solo``)."""
        with self._cond:
            for item in reversed(items):
                item.solo = item.solo or solo
                self._queue.appendleft(item)
            self._cond.notify_all()

    def batch_size(self) -> int:
        if self.task_seconds is None:
            return 1
        by_time = int(self.batch_seconds / max(self.task_seconds, 1e-6))
        by_bytes = int(self.batch_bytes / max(self.reply_bytes, 1.0))
        return max(1, min(self.max_batch, by_time, by_bytes))

    def take(self, block: bool, full: bool = False) -> list[FeedItem] | None:
        """The next batch; ``[]`` if none is queued and ``block`` is false (or, with
        ``full``, fewer than a batch); ``None`` once closed. Tasks of a finished round are
        failed here, never sent. A task to run alone goes only to an idle actor
        (``block``): a call queued behind it, or one before it, could kill the actor and
        leave it to blame."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                batch: list[FeedItem] = []
                size = self.batch_size()
                if full and not block and len(self._queue) < size:
                    return batch
                while self._queue and len(batch) < size:
                    item = self._queue[0]
                    if item.abandoned:
                        self._queue.popleft()
                        item.fail(_stopped(item))
                        continue
                    if item.solo and (batch or not block):
                        break
                    batch.append(self._queue.popleft())
                    if item.solo:
                        break
                if batch or not block:
                    return batch
                self._cond.wait(self.tick)

    def learn(self, items: int, seconds: float, nbytes: int) -> None:
        """Fold one finished batch into the running cost estimates."""
        per_task, per_reply = seconds / items, nbytes / items
        if self.task_seconds is None:
            self.task_seconds, self.reply_bytes = per_task, per_reply
            return
        self.task_seconds += _SMOOTHING * (per_task - self.task_seconds)
        self.reply_bytes += _SMOOTHING * (per_reply - self.reply_bytes)

    def slack(self) -> float:
        """Time allowed for each task of a batch beyond the first one's task_timeout."""
        bound = 10 * (self.task_seconds or 0.0) + 0.1
        return bound if self.task_timeout is None else min(self.task_timeout, bound)

    @property
    def closed(self) -> bool:
        return self._closed

    def feeder_stopped(self) -> None:
        """A feeder thread ended on an unexpected error: once none is left, queued and
        later tasks fail at once instead of waiting for an actor nobody feeds."""
        with self._cond:
            self._stopped += 1
            if self._stopped < len(self._threads):
                return
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for item in left:
            item.fail("the Ray backend was closed before the task ran")
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2 * self.tick)
        for feeder in self._feeders:  # calls nobody settles any more
            for call in list(feeder.inflight):
                for item in call.items:
                    item.fail("the Ray backend was closed before the task ran")


def _stopped(item: FeedItem) -> str:
    return (
        f"client {item.task.metadata.node_id!r} was stopped: nobody waits for its reply any "
        "more (the round is over); its actor was replaced"
    )


class _Feeder:
    """One actor's feeder: keeps up to :data:`DEPTH` calls queued on it, settles them in
    order (an actor runs its calls one at a time, in order) and replaces it when lost."""

    def __init__(self, feed: ActorFeed) -> None:
        self.feed = feed
        self.ray = feed.ray
        self.actor: Any = None
        self.starting = False
        self.inflight: collections.deque[_Call] = collections.deque()

    def drive(self) -> None:
        feed = self.feed
        try:
            self.actor = feed.pool.checkout()
            while not feed.closed:
                if self.starting and not self._started():
                    continue
                if not self._fill():
                    return
                if self.inflight:
                    self._step()
        except Exception:  # never leave tasks waiting on a dead feeder
            log.exception("a Ray feeder stopped")
            self._requeue_inflight()
            feed.feeder_stopped()

    def _started(self) -> bool:
        """Wait for a replacement actor's start (not counted in any task's timeout)."""
        ready, _ = self.ray.wait([self.actor.ready.remote()], timeout=self.feed.start_timeout)
        if ready:
            self.starting = False
            return True
        batch = self.feed.take(block=True) or []
        for item in batch:
            item.fail(
                f"client {item.task.metadata.node_id!r} got no Ray actor: its replacement "
                f"did not start within {self.feed.start_timeout:g} s"
            )
        return False

    def _fill(self) -> bool:
        while len(self.inflight) < DEPTH and not any(c.items[0].solo for c in self.inflight):
            # behind a running call only a full batch goes: a partial one would split the
            # tasks that arrive meanwhile into many small calls
            batch = self.feed.take(block=not self.inflight, full=bool(self.inflight))
            if batch is None:
                return False
            if not batch:
                break
            call = self._submit(batch)
            if call is not None:
                self.inflight.append(call)
        return True

    def _submit(self, batch: list[FeedItem]) -> _Call | None:
        models: list[Any] = []
        specs = []
        sent: list[FeedItem] = []
        run_config: dict[str, Any] = {}
        for item in batch:
            try:
                context = item.load()
            except Exception as exc:  # a state that cannot be read fails that task only
                item.fail(f"{type(exc).__name__}: {exc}")
                continue
            if not sent:
                run_config = context.run_config  # one transport's tasks share it
            sent.append(item)
            index = -1
            if item.model is not None:
                index = next((i for i, m in enumerate(models) if m is item.model), -1)
                if index < 0:
                    models.append(item.model)
                    index = len(models) - 1
            # the node id and seed travel in the task; an empty state as None
            state = context.state
            specs.append(
                (item.sent, index, context.node_config, None if state.is_empty() else state)
            )
        if not sent:
            return None
        self.feed.calls += 1
        call = _Call(self.actor.run_batch.remote(specs, run_config, *models), sent)
        if not self.inflight:
            call.started = time.monotonic()
        return call

    def _step(self) -> None:
        call = self.inflight[0]
        ready, _ = self.ray.wait([call.ref], timeout=self.feed.tick)
        if ready:
            self.inflight.popleft()
            if self.inflight:
                self.inflight[0].started = time.monotonic()
            self._settle(call)
            return
        if all(item.abandoned for item in call.items):
            self.inflight.popleft()
            for item in call.items:
                item.fail(_stopped(item))
            self._lost()
            return
        timeout = self.feed.task_timeout
        started = call.started if call.started is not None else time.monotonic()
        if timeout is None:
            return
        allowed = timeout + (len(call.items) - 1) * self.feed.slack()
        if time.monotonic() - started < allowed:
            return
        self.inflight.popleft()
        if len(call.items) == 1:
            call.items[0].fail(
                f"client {call.items[0].task.metadata.node_id!r} did not answer within "
                f"task_timeout={timeout:g} s; its actor was stopped and replaced and the "
                "round goes on"
            )
        else:
            self.feed.requeue(call.items, solo=True)
        self._lost()

    def _settle(self, call: _Call) -> None:
        ray = self.ray
        items = call.items
        try:
            results, seconds = ray.get(call.ref, timeout=self.feed.tick)
        except (ray.exceptions.OutOfMemoryError, ray.exceptions.RayActorError) as exc:
            # Not yet alone in a call: it may not be the task that killed its actor (a
            # finished call's reply can be lost with the actor when a later call kills it)
            if len(items) > 1 or not items[0].solo:
                self.feed.requeue(items, solo=True)
            elif isinstance(exc, ray.exceptions.OutOfMemoryError):
                items[0].fail(
                    f"client {items[0].task.metadata.node_id!r} was stopped by Ray's memory "
                    f"monitor (out of memory); its actor was replaced and the round goes on: "
                    f"{_reason(exc)}"
                )
            else:
                items[0].fail(
                    f"the Ray actor running client {items[0].task.metadata.node_id!r} died "
                    "during the task (killed, out of memory, or a crash in native code); it "
                    f"was replaced and the round goes on: {_reason(exc)}"
                )
            self._lost()
            return
        except ray.exceptions.RayError as exc:  # the call itself could not run
            if len(items) > 1:
                self.feed.requeue(items, solo=True)
                return
            items[0].fail(
                f"client {items[0].task.metadata.node_id!r} failed on Ray: {_reason(exc)}"
            )
            return
        nbytes = 0
        for item, (reply, state, content_bytes) in zip(items, results, strict=True):
            nbytes += reply_nbytes(reply) + (state.nbytes() if state is not None else 0)
            item.finish(reply, state, content_bytes)
        self.feed.learn(len(items), float(seconds), nbytes)

    def _lost(self) -> None:
        """The actor is gone or must go: queued calls go back to the queue, a new actor."""
        self._requeue_inflight()
        self.actor = self.feed.pool.replace(self.actor)
        self.starting = True

    def _requeue_inflight(self) -> None:
        calls, self.inflight = list(self.inflight), collections.deque()
        self.feed.requeue([item for call in calls for item in call.items], solo=False)


def _reason(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return text if len(text) <= 400 else text[:397] + "..."
