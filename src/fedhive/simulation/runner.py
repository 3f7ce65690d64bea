"""Virtual clients: built when a task arrives, with their state restored from the store."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from fedhive.client.app import ClientApp
from fedhive.client.context import Context
from fedhive.client.state import StateStore
from fedhive.common.message import Message
from fedhive.common.records import EvaluateIns, FitIns, Parameters, RecordDict, Scalar

__all__ = ["VirtualClientRunner", "private_copy"]


def private_copy(message: Message) -> Message:
    """The task with its own copy of the model and extras, so a client cannot change the
    global ones (the model, a strategy's state sent in extras)."""
    content = message.content
    if isinstance(content, FitIns | EvaluateIns):
        arrays = Parameters(arrays=[a.copy() for a in content.parameters.arrays])
        config, extras = dict(content.config), content.extras.copy()
        if type(content) in (FitIns, EvaluateIns):  # built directly: replace() costs more
            content = type(content)(arrays, config, extras)
        else:
            content = replace(content, parameters=arrays, config=config, extras=extras)
        return Message(message.metadata, content, message.error)
    return message


_WORKER_APP: ClientApp | None = None


def _handle_in_worker(task: Message, context: Context) -> tuple[Message, RecordDict]:
    if _WORKER_APP is None:
        return task.error_reply("the worker process was not initialised"), context.state
    reply = _WORKER_APP.handle(task, context)
    return reply, context.state


def init_worker_process(app: ClientApp | None = None) -> None:
    """Keep the client app in the worker (sent once, not with every task); one torch
    thread per worker process, since the workers share the cores."""
    global _WORKER_APP
    _WORKER_APP = app
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" not in sys.modules:  # only clients that use torch pay for importing it
        return
    import torch

    torch.set_num_threads(1)


@dataclass
class VirtualClientRunner:
    """Runs one task for one virtual client.

    The client is built from ``app.client_fn`` for this task only; its
    :class:`~fedhive.client.context.Context` carries the partition (``node_config``), the
    task's derived seed and the persistent state, which is stored back after the task.
    With an ``executor`` (a process pool) the task runs there instead of in this thread.
    """

    app: ClientApp
    store: StateStore
    node_configs: Mapping[str, Mapping[str, Scalar]]
    run_config: dict[str, Scalar]
    executor: Executor | None = None

    def __call__(self, task: Message) -> Message:
        node_id = task.metadata.node_id
        try:
            node_config = self.node_configs[node_id]
        except KeyError:
            return task.error_reply(f"no virtual client with id {node_id!r}")
        context = Context(
            node_id=node_id,
            node_config=dict(node_config),
            state=self.store.get(node_id),
            run_config=dict(self.run_config),
            seed=task.metadata.seed,
        )
        state: Any
        if self.executor is None:
            reply = self.app.handle(private_copy(task), context)
            state = context.state
        else:
            reply, state = self.executor.submit(_handle_in_worker, task, context).result()
        if isinstance(state, RecordDict):
            self.store.put(node_id, state)
        return reply
