"""In-process transport: tasks run on a pool of worker threads in this process.

``run_task(message) -> reply`` does the client side of one task (for simulation, it
builds a virtual client, runs it and stores its state). Workers start tasks in the order
given but never more than ``window`` tasks ahead of the oldest unfinished one, which
bounds the engine's reorder buffer (and memory) to ``window`` results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedhive.common.message import Message
from fedhive.transport.base import Replies, Transport

__all__ = ["InProcessTransport", "TaskRunner"]

TaskRunner = Callable[[Message], Message]


@dataclass
class _Batch:
    tasks: list[Message]
    replies: Replies
    next_index: int = 0
    done: list[bool] = field(default_factory=list)
    first_unfinished: int = 0

    def mark_done(self, index: int) -> None:
        self.done[index] = True
        while self.first_unfinished < len(self.tasks) and self.done[self.first_unfinished]:
            self.first_unfinished += 1


class InProcessTransport(Transport):
    """Runs tasks with ``num_workers`` threads; see the module docstring."""

    def __init__(
        self, run_task: TaskRunner, num_workers: int = 1, window: int | None = None
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.run_task = run_task
        self.num_workers = num_workers
        self.window = window if window is not None else 4 * num_workers
        self._batches: list[_Batch] = []
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []

    def _start_workers(self) -> None:
        for i in range(self.num_workers):
            thread = threading.Thread(target=self._work, name=f"fedhive-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        batch = _Batch(list(messages), replies, done=[False] * len(messages))
        with self._cond:
            if self._closed:
                raise RuntimeError("the transport is closed")
            if not self._threads:
                self._start_workers()
            self._batches.append(batch)
            self._cond.notify_all()

    def _take(self) -> tuple[_Batch, int] | None:
        """The next task allowed to start (call with the lock held)."""
        for batch in list(self._batches):
            if batch.replies.cancelled or batch.next_index >= len(batch.tasks):
                self._batches.remove(batch)
                continue
            if batch.next_index < batch.first_unfinished + self.window:
                index = batch.next_index
                batch.next_index += 1
                return batch, index
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
                while taken is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    taken = self._take()
            batch, index = taken
            task = batch.tasks[index]
            try:
                reply = self.run_task(task)
            except Exception as exc:  # the runner's own failure becomes this task's error
                reply = task.error_reply(f"{type(exc).__name__}: {exc}")
            batch.replies.put(reply)
            with self._cond:
                batch.mark_done(index)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._batches.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=0.1)
