"""In-process transport: tasks run on a pool of worker threads in this process.

``run_task(message) -> reply`` does the client side of one task (for simulation, it
builds a virtual client, runs it and stores its state). Two bounds keep memory and the
engine's reorder buffer small, whatever the clients cost:

- workers start tasks in order but never more than ``window`` tasks ahead of the oldest
  unfinished one, which bounds the engine's reorder buffer to ``window`` results;
- a worker does not start a task while the replies of its mailbox hold too much: at most
  ``max_pending`` tasks running or answered and not yet released by the engine (it
  releases a reply when it asks for the next one), and, beyond the first, at most
  ``max_pending_bytes`` of arrays in replies the engine may still hold: not yet
  released, or released while an earlier task is unfinished (the reorder buffer keeps
  those). Cheap clients then wait for the engine instead of filling its mailbox;
  held-back workers start again in a burst once half the bound is free.

Small replies (at most ``max_pending_bytes / (4 x max_pending)`` bytes, without latency)
skip the per-reply release: the mailbox only counts the ones the engine is done with
(``Replies.consumed``) and wakes held-back workers once half the count bound is free.
They are bounded by count alone, so together they hold at most a quarter of
``max_pending_bytes`` on top of the bound above; the reorder buffer, up to ``window``
of them.

With ``latency`` (seconds of simulated time per task, e.g. drawn from the task's seed)
the engine must run on a :class:`~fedhive.common.clock.VirtualClock`: each task's reply
is announced at send time to arrive at ``now + latency(task)``, workers run tasks in
order of arrival, and the clock delivers them in that order, never sleeping for the
simulated delays. A latency with an ``upload_seconds(task, reply_bytes)`` method (a
:class:`~fedhive.simulation.system.SystemModel`'s) gives at send time only what is known
then (computing, downloading the task) and, once the reply is computed, the seconds its
upload takes for its real encoded size (:func:`~fedhive.transport.base.content_length`:
a compressed update uploads faster); the clock delivers it that much later, still in an
order fixed by the simulated times alone. Without latency every reply arrives at the
time its task was sent. The
window then counts in arrival order; the engine still folds in sampled order, so its
reorder buffer holds the replies that arrive before an earlier-sampled one.

``inline=True`` with one worker on a virtual clock starts no thread at all: the engine's
own thread runs the next task whenever it waits on the clock for a reply still to be
computed (:meth:`~fedhive.common.clock.VirtualClock.assist`). Tasks start in the same
order as on the one worker thread, so the history is the same, and a simulated
asynchronous run no longer hands every task to a thread and back, nor trains beside
the engine's folding and evaluation on the same interpreter lock. The thread backend
asks for it; on other clocks, or with more workers, it changes nothing.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from weakref import WeakKeyDictionary

from fedhive.common.clock import VirtualClock
from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.message import Message
from fedhive.common.records import FitRes, GetParametersRes, Parameters, RecordDict
from fedhive.transport.base import (
    DEFAULT_STAGED_BYTES,
    Replies,
    ReplySlot,
    Transport,
    content_length,
    wire_length,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "InProcessTransport",
    "Latency",
    "TaskRunner",
    "TaskStarter",
    "reply_nbytes",
]

TaskRunner = Callable[[Message], Message]
#: Starts tasks without waiting for them: each comes with the callable its reply goes to.
TaskStarter = Callable[[list[tuple[Message, Callable[[Message], None]]]], None]
#: Default count of replies of one mailbox running or unreleased at once (at least ``window``).
DEFAULT_MAX_PENDING = 64
#: Simulated seconds from sending a task to its reply's arrival; deterministic per task.
Latency = Callable[[Message], float]

#: Wire lengths of replies kept for the engine's byte count (see InProcessTransport).
_WIRE_MEMO = 1024

# (arrival time, batch number, position in the batch's arrival order): the order in which
# tasks start, and the order in which the virtual clock delivers their replies.
_Key = tuple[float, int, int]


def _parameters_nbytes(parameters: Parameters) -> int:
    try:
        arrays = parameters.arrays
    except SerdeError:  # tensors of a type only the strategy understands
        return sum(len(t) for t in parameters.tensors)
    total = 0
    for array in arrays:  # a plain loop: this runs once per reply
        total += array.nbytes
    return total


def reply_nbytes(reply: Message) -> int:
    """Bytes of the arrays ``reply`` holds: what ``max_pending_bytes`` counts."""
    content = reply.content
    if isinstance(content, FitRes):
        extras = content.extras
        size = _parameters_nbytes(content.parameters)
        return size + extras.nbytes() if extras.array_records else size
    if isinstance(content, GetParametersRes):
        return _parameters_nbytes(content.parameters)
    if isinstance(content, RecordDict):
        return content.nbytes()
    return 0


@dataclass
class _Account:
    """What the replies of one mailbox hold: the count of tasks running or answered and
    not yet released, and the bytes of replies not yet both released and foldable.

    Small replies (``plain``, see :class:`InProcessTransport`) carry no release
    callback: once answered they leave ``started`` and count in ``plain_put`` until
    the mailbox says the consumer is done with them (``Replies.consumed``)."""

    replies: Replies
    started: set[_Key] = field(default_factory=set)
    nbytes: int = 0
    plain_put: int = 0

    def held(self) -> int:
        return len(self.started) + self.plain_put - self.replies.consumed

    def admits(self, key: _Key, max_count: int, max_bytes: int) -> bool:
        held = self.held()
        if held < max_count and (self.nbytes < max_bytes or not self.started):
            return True
        if not self.started:
            return False  # only small replies not yet taken: the consumer takes them all
        # The consumer takes replies in key order: one that comes before every reply
        # held is the one it will wait for, so it may always start (no deadlock).
        return key < min(self.started)


@dataclass
class _Batch:
    number: int
    tasks: list[Message]
    slots: list[ReplySlot] | None  # announced arrivals (virtual clock), else None
    arrivals: list[float]  # per task; 0.0 for every task without latency
    order: list[int]  # task indices in arrival order (ties: the order given)
    replies: Replies
    account: _Account
    next_pos: int = 0
    done: list[bool] = field(default_factory=list)
    first_unfinished: int = 0
    # Bytes of finished replies the engine may still hold: a reply counts until it is
    # released and no earlier task is unfinished (until then the engine's reorder buffer
    # may keep it, waiting for the earlier one).
    sizes: dict[int, int] = field(default_factory=dict)
    released: set[int] = field(default_factory=set)

    def key(self, pos: int) -> _Key:
        return (self.arrivals[self.order[pos]], self.number, pos)

    def finish(self, pos: int, nbytes: int | None, delay: float = 0.0) -> None:
        """Task ``pos`` has answered with ``nbytes``, or with a small reply put without
        a release (``None``), ``delay`` seconds after its announced arrival (call with
        the lock held)."""
        if delay:
            # It arrives later: its key moves, so that the task the clock waits for
            # still comes before every reply held (see _Account.admits).
            started = self.account.started
            old = self.key(pos)
            held = old in started
            started.discard(old)
            self.arrivals[self.order[pos]] += delay
            if held:
                started.add(self.key(pos))
        self.done[pos] = True
        if nbytes is None:
            self.account.started.discard(self.key(pos))
            self.account.plain_put += 1
        else:
            self.sizes[pos] = nbytes
            self.account.nbytes += nbytes
        while self.first_unfinished < len(self.tasks) and self.done[self.first_unfinished]:
            self._settle(self.first_unfinished)
            self.first_unfinished += 1

    def release(self, pos: int) -> None:
        """The engine is done with the reply of ``pos`` (call with the lock held)."""
        self.account.started.discard(self.key(pos))
        self.released.add(pos)
        if pos < self.first_unfinished:
            self._settle(pos)

    def _settle(self, pos: int) -> None:
        if pos in self.released:
            self.released.discard(pos)
            self.account.nbytes -= self.sizes.pop(pos)


def _unused(task: Message) -> Message:
    raise RuntimeError("this transport starts its tasks with start_tasks")


class InProcessTransport(Transport):
    """Runs tasks with ``num_workers`` threads; see the module docstring.

    ``window`` defaults to 4 x ``num_workers``. ``max_pending_bytes`` is what bounds memory
    for models of any size (default 64 MiB, as the gRPC server's staging);
    ``max_pending`` (default :data:`DEFAULT_MAX_PENDING`, or ``window`` if larger) only
    caps the count of small replies: a lower one makes workers wait for the engine every
    few replies, which costs more than such replies weigh.

    Instead of ``run_task``, ``start_tasks`` may take the tasks: one thread gives it each
    list of tasks the bounds allow, with a callable per task that its reply goes to (once,
    from any thread); ``num_workers`` then caps the tasks given and not yet answered. The
    window, the pending bounds and the latency apply unchanged.
    """

    def __init__(
        self,
        run_task: TaskRunner | None,
        num_workers: int = 1,
        window: int | None = None,
        *,
        latency: Latency | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int = DEFAULT_STAGED_BYTES,
        start_tasks: TaskStarter | None = None,
        inline: bool = False,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if (run_task is None) == (start_tasks is None):
            raise ValueError("give exactly one of run_task and start_tasks")
        self.run_task: TaskRunner = run_task if run_task is not None else _unused
        self.start_tasks = start_tasks
        self._inflight = 0  # tasks given to start_tasks and not yet answered
        self.num_workers = num_workers
        self.window = window if window is not None else 4 * num_workers
        self.latency = latency
        self._upload: Callable[[Message, int], float] | None = getattr(
            latency, "upload_seconds", None
        )
        # reply message id -> its content's length (computed for its upload, or measured
        # where a starter's client ran) until the engine asks (wire_bytes); at most
        # _WIRE_MEMO entries (replies nobody counts)
        self._reply_wire: dict[str, int] = {}
        self.max_pending = (
            max_pending if max_pending is not None else max(DEFAULT_MAX_PENDING, self.window)
        )
        self.max_pending_bytes = max_pending_bytes
        for name, value in (("window", self.window), ("max_pending", self.max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int):
            raise ConfigError(f"max_pending_bytes must be an int, got {max_pending_bytes!r}")
        # Replies up to this size go without a release callback, bounded by count only:
        # together at most a quarter of max_pending_bytes.
        self._plain_limit = max_pending_bytes // (4 * self.max_pending)
        # each batch with tasks left to start, as (key of its next task, batch): a heap,
        # so taking the next task costs O(log batches), not a scan of every batch (an
        # asynchronous run sends a batch per freed slot: concurrency batches at once)
        self._batches: list[tuple[_Key, _Batch]] = []
        self._accounts: WeakKeyDictionary[Replies, _Account] = WeakKeyDictionary()
        self._sent = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        # One worker on a virtual clock: the engine's thread runs each task itself when
        # it waits for a reply still to be computed (no worker thread, no hand-over).
        self.inline = inline and run_task is not None and num_workers == 1
        self._assisted: VirtualClock | None = None

    def _start_workers(self) -> None:
        if self.start_tasks is not None:
            thread = threading.Thread(
                target=self._dispatch,
                args=(self.start_tasks,),
                name="fedhive-dispatch",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
            return
        for i in range(self.num_workers):
            thread = threading.Thread(target=self._work, name=f"fedhive-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _arrivals(self, messages: Sequence[Message], replies: Replies) -> list[float] | None:
        """Each task's simulated arrival time, or ``None`` without latency."""
        if self.latency is None:
            return None
        if not isinstance(replies.clock, VirtualClock):
            raise ConfigError(
                "latency= simulates arrival times, so the engine must run on a VirtualClock "
                f"(clock=fedhive.testing.VirtualClock()); it runs on {type(replies.clock).__name__}"
            )
        now = replies.clock.now()
        arrivals = []
        for task in messages:
            delay = self.latency(task)
            if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
                raise ConfigError(
                    f"latency must give a finite number of seconds >= 0; for the task to "
                    f"{task.metadata.node_id!r} it gave {delay!r}"
                )
            arrivals.append(now + float(delay))
        return arrivals

    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        tasks = list(messages)
        arrivals = self._arrivals(tasks, replies)
        if self._closed:
            raise RuntimeError("the transport is closed")
        # Announced before any worker can answer, in task order: ties keep that order.
        slots: list[ReplySlot] | None = None
        if arrivals is None:
            if isinstance(replies.clock, VirtualClock):
                slots = [replies.expect() for _ in tasks]
            times = [0.0] * len(tasks)
            order = list(range(len(tasks)))
        else:
            slots = [replies.expect(at) for at in arrivals]
            times = arrivals
            order = sorted(range(len(tasks)), key=lambda i: (times[i], i))
        with self._cond:
            if self._closed:
                raise RuntimeError("the transport is closed")
            account = self._accounts.get(replies)
            if account is None:
                account = self._accounts[replies] = _Account(replies)
            batch = _Batch(self._sent, tasks, slots, times, order, replies, account)
            batch.done = [False] * len(tasks)
            self._sent += 1
            clock = replies.clock
            if (
                self.inline
                and isinstance(clock, VirtualClock)
                and self._assisted in (None, clock)
                and not self._threads
            ):
                if self._assisted is None:
                    self._assisted = clock
                    clock.assist(self._run_inline)
            elif not self._threads:  # (mailboxes on another clock too: a worker thread)
                self._start_workers()
            if tasks:
                heapq.heappush(self._batches, (batch.key(0), batch))
            self._cond.notify_all()

    def _take(self) -> tuple[_Batch, int] | None:
        """The next task allowed to start: the earliest key among the batches whose next
        task the window and the pending bounds admit (call with the lock held)."""
        heap = self._batches
        max_count, max_bytes = self.max_pending, self.max_pending_bytes
        held_back: list[tuple[_Key, _Batch]] = []
        taken: tuple[_Batch, int] | None = None
        while heap:
            key, batch = heap[0]
            if batch.replies.cancelled:
                heapq.heappop(heap)
                continue
            pos = batch.next_pos
            if pos >= batch.first_unfinished + self.window:
                held_back.append(heapq.heappop(heap))
                continue
            account = batch.account
            started = account.started
            held = len(started) + account.plain_put - account.replies.consumed
            # the common case inline; the rest (and the no-deadlock rule) in admits
            if not (held < max_count and account.nbytes < max_bytes) and not account.admits(
                key, max_count, max_bytes
            ):
                self._wake_on_consumption(account)
                held_back.append(heapq.heappop(heap))
                continue
            batch.next_pos += 1
            started.add(key)
            if batch.next_pos < len(batch.tasks):
                heapq.heapreplace(heap, (batch.key(batch.next_pos), batch))
            else:
                heapq.heappop(heap)
            taken = batch, pos
            break
        for entry in held_back:
            heapq.heappush(heap, entry)
        return taken

    def _wake_on_consumption(self, account: _Account) -> None:
        """Held back by small replies: be woken once half the count bound is free again
        (call with the lock held). Releases and finished tasks wake workers anyway."""
        replies = account.replies
        wake_at = account.plain_put + len(account.started) - self.max_pending // 2
        if wake_at > replies.consumed:
            replies.wake_when_consumed(wake_at, partial(self._woken, replies))

    def _woken(self, replies: Replies) -> None:
        with self._cond:
            replies.wake_when_consumed(math.inf, None)
            self._cond.notify_all()

    def _release(self, batch: _Batch, pos: int) -> None:
        with self._cond:
            batch.release(pos)
            account = batch.account
            # Workers held back by the bound refill in a burst once half of it is free:
            # waking one per release would hand the GIL back and forth for every reply.
            # (Finishing or sending a task always wakes them, so none waits for good.)
            # With latency every release wakes them: it may be what lets the task the
            # clock waits for start before tasks that arrive later (see _Account.admits).
            if self.latency is not None or (
                account.held() <= self.max_pending // 2
                and account.nbytes <= self.max_pending_bytes // 2
            ):
                self._cond.notify_all()

    def _work(self) -> None:
        finished: tuple[_Batch, int, int | None, float] | None = None
        while True:
            with self._cond:  # one lock per task: finish the last one, take the next
                if finished is not None:
                    # counted after the put: a release may have come first
                    done, done_pos, size, delay = finished
                    done.finish(done_pos, size, delay)
                    self._cond.notify_all()
                    finished = None
                taken = self._take()
                while taken is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    taken = self._take()
            finished = self._run(*taken)

    def _run(self, batch: _Batch, pos: int) -> tuple[_Batch, int, int | None, float]:
        """Run task ``pos`` of ``batch`` and put its reply (without the lock); returns
        what :meth:`_Batch.finish` counts."""
        task = batch.tasks[batch.order[pos]]
        try:
            reply = self.run_task(task)
        except Exception as exc:  # the runner's own failure becomes this task's error
            reply = task.error_reply(f"{type(exc).__name__}: {exc}")
        del task
        return self._deliver(batch, pos, reply)  # the mailbox holds the reply now

    def _run_inline(self) -> bool:
        """Run the next task on the calling thread (the engine's, waiting on the
        virtual clock for a reply still to be computed); whether there was one."""
        with self._cond:
            taken = None if self._closed else self._take()
        if taken is None:
            return False
        batch, done_pos, size, delay = self._run(*taken)
        with self._cond:
            batch.finish(done_pos, size, delay)
            self._cond.notify_all()
        return True

    def _deliver(
        self, batch: _Batch, pos: int, reply: Message
    ) -> tuple[_Batch, int, int | None, float]:
        """Put the reply of task ``pos`` into its mailbox (without the lock); returns what
        :meth:`_Batch.finish` counts, to be called with the lock held."""
        index = batch.order[pos]
        delay = 0.0
        if self._upload is not None:
            try:
                delay = self._upload_delay(batch.tasks[index], reply)
            except Exception as exc:  # a bad latency fails the task, not the worker
                reply = batch.tasks[index].error_reply(f"{type(exc).__name__}: {exc}")
        nbytes = reply_nbytes(reply)
        if batch.slots is None:
            if nbytes <= self._plain_limit:
                batch.replies.put(reply)  # small: counted, not released one by one
                return (batch, pos, None, 0.0)
            batch.replies.put(reply, partial(self._release, batch, pos))
            return (batch, pos, nbytes, 0.0)
        batch.slots[index].put(reply, partial(self._release, batch, pos), delay)
        return (batch, pos, nbytes, delay)

    def _dispatch(self, starter: TaskStarter) -> None:
        """With ``start_tasks`` (``starter``): start every task the bounds allow (at most
        ``num_workers`` unanswered), as one list per wake-up; answers come back through
        :meth:`_answered`."""
        while True:
            with self._cond:
                taken: list[tuple[_Batch, int]] = []
                while True:
                    while self._inflight < self.num_workers:
                        one = self._take()
                        if one is None:
                            break
                        taken.append(one)
                        self._inflight += 1
                    if taken:
                        break
                    if self._closed:
                        return
                    self._cond.wait()
            starts: list[tuple[Message, Callable[[Message], None]]] = [
                (batch.tasks[batch.order[pos]], partial(self._answered, batch, pos))
                for batch, pos in taken
            ]
            del taken
            try:
                starter(starts)
            except Exception as exc:  # a starter must answer each task once, or raise first
                for task, answer in starts:
                    answer(task.error_reply(f"{type(exc).__name__}: {exc}"))
            del starts

    def _answered(self, batch: _Batch, pos: int, reply: Message) -> None:
        """The answer to a task given to ``start_tasks`` (called once, on any thread)."""
        finished: tuple[_Batch, int, int | None, float] | None = None
        try:
            finished = self._deliver(batch, pos, reply)
        finally:
            with self._cond:
                self._inflight -= 1
                if finished is not None:
                    _, done_pos, size, delay = finished
                    batch.finish(done_pos, size, delay)
                self._cond.notify_all()

    def _upload_delay(self, task: Message, reply: Message) -> float:
        """Simulated seconds ``reply`` takes to upload (its content's encoded length,
        memoized for :meth:`wire_bytes`)."""
        with self._cond:
            size = self._reply_wire.get(reply.metadata.message_id)
        if size is None:
            size = content_length(reply)
            self.remember_content_length(reply, size)
        upload = self._upload
        delay = upload(task, size) if upload is not None else 0.0
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ConfigError(
                f"upload_seconds must give a finite number of seconds >= 0; for the reply "
                f"of {task.metadata.node_id!r} it gave {delay!r}"
            )
        return float(delay)

    def remember_content_length(self, reply: Message, size: int) -> None:
        """Keep ``size``, the length of ``reply``'s encoded content, for :meth:`wire_bytes`
        (a starter whose clients measured it saves the engine computing it)."""
        with self._cond:
            memo = self._reply_wire
            while len(memo) >= _WIRE_MEMO:
                del memo[next(iter(memo))]
            memo[reply.metadata.message_id] = size

    def wire_bytes(self, message: Message) -> int:
        with self._cond:
            size = self._reply_wire.pop(message.metadata.message_id, None)
        return wire_length(message, size)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            dropped = [
                batch.slots[batch.order[pos]]
                for _, batch in self._batches
                if batch.slots is not None
                for pos in range(batch.next_pos, len(batch.tasks))
            ]
            self._batches.clear()
            self._cond.notify_all()
            assisted, self._assisted = self._assisted, None
        if assisted is not None:
            assisted.unassist(self._run_inline)
        for slot in dropped:  # nobody waits on the clock for tasks that will never run
            slot.cancel()
        for thread in self._threads:
            thread.join(timeout=0.1)
