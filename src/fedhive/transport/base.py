"""The one interface between the engine and its clients.

A transport has one method, :meth:`Transport.send`: it takes tasks and, as each client
answers, puts exactly one reply per task into the :class:`Replies` mailbox it was given
(an error reply when the client failed). ``send`` returns at once; the engine reads
replies as they arrive, on its own clock, and may call ``send`` again on the same
mailbox (asynchronous aggregation keeps a pool of clients busy that way).

On a :class:`~fedhive.common.clock.VirtualClock` a transport announces each reply when it
sends the task (:meth:`Replies.expect`, with its simulated arrival time) and fills the
returned :class:`ReplySlot` once the reply is computed; the clock then delivers replies in
order of arrival time. On other clocks a slot is simply delivered when filled.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from fedhive.common.clock import Arrival, Clock, SystemClock, VirtualClock
from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.message import Message
from fedhive.transport.codec import content_size, meta_size

__all__ = [
    "DEFAULT_MIN_UPLOAD_RATE",
    "DEFAULT_STAGED_BYTES",
    "Release",
    "Replies",
    "ReplySlot",
    "Transport",
    "content_length",
    "wire_length",
]

#: Frees what a transport holds for one reply; runs once the consumer is done with it.
Release = Callable[[], None]
_Item = tuple[Message, Release | None]

#: Default of the server's ``max_staged_bytes`` and ``spill_bytes``: uploads in memory at
#: once (beyond the first), and the size from which an upload is staged on disk.
DEFAULT_STAGED_BYTES = 64 << 20
#: Bytes a second a gRPC upload holding a staging slot must average while another upload
#: waits for one (64 KiB/s: a 0.5 Mbit/s link); see ``GrpcServer(min_upload_rate=)``.
DEFAULT_MIN_UPLOAD_RATE = 64 * 1024.0
_LEN_PREFIX = 8  # the wire encoding's length prefix of its meta part
_CONTENT_CACHE = 4  # task contents whose encoded length is remembered
# id(content) -> (weak reference to it, its encoded length): the length of an encoding
# depends on the content alone, so every transport may share it.
_CONTENT_BYTES: dict[int, tuple[weakref.ref[Any], int]] = {}


class Replies:
    """A thread-safe mailbox for the replies to one or more ``send`` calls.

    One consumer (the engine) takes replies with :meth:`get`. A reply may come with a
    ``release`` callback, which frees what the transport holds for it (an upload slot);
    it runs once the consumer is done with that reply: when it asks for the next one, or
    cancels. A consumer that keeps no reference to the reply by then has freed its memory
    before the transport is told it may take in another.

    Replies put without a callback are only counted (:attr:`consumed`), which costs
    less: a transport bounding many small replies reads the count and asks, with
    :meth:`wake_when_consumed`, to be woken once the consumer has caught up.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self._mailbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._current: Callable[[], None] | None = None
        #: Replies put without a ``release`` that the consumer is done with.
        self.consumed = 0
        self._plain_held = False
        self._wake_at: float = math.inf
        self._wake: Callable[[], None] | None = None

    def put(self, reply: Message, release: Release | None = None) -> None:
        """Deliver a reply; ``release`` runs when the consumer is done with it.

        After :meth:`cancel` nobody will take it, so it is dropped at once. On a
        :class:`~fedhive.common.clock.VirtualClock` an unannounced reply arrives now.
        """
        if self.cancelled:
            if release is not None:
                release()
            return
        if isinstance(self.clock, VirtualClock):
            self.expect().put(reply, release)
            return
        self._mailbox.put((reply, release))

    def expect(self, at: float | None = None) -> ReplySlot:
        """Announce one reply that arrives at clock time ``at`` (default: now).

        Call it when the task is sent, before the reply is computed, and fill the slot
        with :meth:`ReplySlot.put`. Only a :class:`~fedhive.common.clock.VirtualClock`
        simulates arrival times; on other clocks ``at`` may not lie in the future.
        """
        clock = self.clock
        if isinstance(clock, VirtualClock):
            start = clock.now()
            if at is not None and at < start:
                raise ConfigError(
                    f"a reply cannot arrive at {at!r}, before the clock's time {start!r}; "
                    "pass a time >= clock.now()"
                )
            return ReplySlot(self, clock.schedule(self._mailbox, start if at is None else at))
        if at is not None and at > clock.now():
            raise ConfigError(
                f"a reply announced for {at!r}, after now ({clock.now()!r}), needs simulated "
                f"time; the engine runs on {type(clock).__name__}: use a VirtualClock"
            )
        return ReplySlot(self, None)

    def get(self, deadline: float | None = None) -> Message | None:
        """The next reply, or ``None`` once ``deadline`` (engine clock time) has passed.

        Releases the reply returned by the previous call first.
        """
        self._release_current()
        try:
            reply, release = self.clock.wait(self._mailbox, deadline)
        except queue.Empty:
            return None
        if release is None:
            self._plain_held = True
        else:
            with self._lock:
                self._current = release
        return reply

    def may_arrive_by(self, at: float) -> bool:
        """Whether a reply may arrive by clock time ``at``: on a
        :class:`~fedhive.common.clock.VirtualClock`, whether one is waiting or announced
        for ``at`` or earlier; on other clocks always ``True`` (only :meth:`get` knows)."""
        clock = self.clock
        if not isinstance(clock, VirtualClock):
            return True
        first = clock.next_at(self._mailbox)
        return first is not None and first <= at

    def done(self) -> None:
        """The consumer is done with the reply it took last: release it now (before it
        waits on another mailbox, say) rather than at the next :meth:`get`."""
        self._release_current()

    def wake_when_consumed(self, count: float, wake: Callable[[], None] | None) -> None:
        """Call ``wake`` each time the consumer is done with a reply put without a
        ``release`` while :attr:`consumed` >= ``count``, until called again (the
        transport calls it under its own lock and clears it from ``wake``)."""
        self._wake = wake
        self._wake_at = count

    def _release_current(self) -> None:
        if self._plain_held:
            self._plain_held = False
            self.consumed += 1
            if self.consumed >= self._wake_at:
                wake = self._wake
                if wake is not None:
                    wake()
            return
        if self._current is None:
            return
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
        if isinstance(self.clock, VirtualClock):
            for _, release in self.clock.cancel(self._mailbox):
                if release is not None:
                    release()
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


class ReplySlot:
    """Where the reply to one announced task goes (:meth:`Replies.expect`)."""

    __slots__ = ("_arrival", "_replies")

    def __init__(self, replies: Replies, arrival: Arrival[_Item] | None) -> None:
        self._replies = replies
        self._arrival = arrival

    def put(self, reply: Message, release: Release | None = None, delay: float = 0.0) -> None:
        """Deliver the reply at its announced time, or ``delay`` simulated seconds after it
        (its upload); as :meth:`Replies.put` otherwise (no simulated time: no delay)."""
        if self._arrival is None or self._replies.cancelled:
            self._replies.put(reply, release)
        elif not self._arrival.put((reply, release), delay) and release is not None:
            release()  # withdrawn: the consumer has gone

    def cancel(self) -> None:
        """This reply will not come (the task was dropped); nobody waits for it."""
        if self._arrival is not None:
            item = self._arrival.cancel()
            if item is not None and item[1] is not None:
                item[1]()


class Transport(ABC):
    """Delivers tasks to clients and their replies back."""

    @abstractmethod
    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        """Start delivering ``messages``; each reply goes into ``replies`` when it comes."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers and connections."""

    def wire_bytes(self, message: Message) -> int:
        """Bytes ``message`` takes on the wire: the length of its encoding
        (:func:`~fedhive.transport.codec.encode_wire`; a transport that sends bytes
        reports what it sent or received). In-process transports never encode, so this
        computes the encoding's length (:func:`wire_length`)."""
        return wire_length(message)


def wire_length(message: Message, content_bytes: int | None = None) -> int:
    """The length of ``message``'s wire encoding (:func:`~fedhive.transport.codec.encode_wire`):
    its header (:func:`~fedhive.transport.codec.encode_meta`) and its content
    (:func:`content_length`, or ``content_bytes`` when known). A message that has no
    encoding (arrays of strings: no wire would carry it, and its reply is refused later)
    counts 0."""
    try:
        body = _content_length(message) if content_bytes is None else content_bytes
        return _LEN_PREFIX + meta_size(message) + body
    except SerdeError:
        return 0


def content_length(message: Message) -> int:
    """The length of the encoding of ``message``'s content, its header left out (whose
    message ids differ from run to run); 0 for a content that has no encoding. Array
    buffers are only viewed, never copied."""
    try:
        return _content_length(message)
    except SerdeError:
        return 0


def _content_length(message: Message) -> int:
    # A round's tasks share one content object: its length is computed once.
    content = message.content
    cache = _CONTENT_BYTES
    hit = cache.get(id(content))
    if hit is not None and hit[0]() is content:
        return hit[1]
    body = content_size(content)
    if message.metadata.reply_to == "" and content is not None:  # a task
        if len(cache) >= _CONTENT_CACHE:
            cache.clear()
        with contextlib.suppress(TypeError):  # weakly: it keeps no model alive
            cache[id(content)] = (weakref.ref(content), body)
    return body
