"""The Ray backend (``backend="ray"``): virtual clients in a pool of long-lived Ray actors.

Each actor keeps the client app (``client_fn``, its mods and whatever they cache, such as
a model and its optimizer buffers) between tasks; it is sent once, when the actor starts.
Tasks are scheduled by the in-process transport's bounded loop (its window and pending
bounds apply unchanged); each actor's feeder thread hands it the started tasks in
batches sized to what clients cost (:mod:`fedhive.simulation.ray_feed`), so Ray's own
cost per call is shared by many cheap clients while slow ones go one per call and their
replies reach the engine as each client finishes. Every wait is in short ticks with a
deadline.

- The global model goes into Ray's object store once per model (once per round for a
  round's tasks, which share it) and tasks carry a reference to it: actors on this node
  read its arrays without a copy, and each client gets its own writable copy.
- ``client_resources`` (``num_cpus``, fractional ``num_gpus``, ``memory`` in bytes) are
  each actor's Ray resources, as in Flower; the pool is as large as the cluster fits
  (and at most ``num_workers``). Resources no actor can get are refused at start instead
  of waiting for ever.
- ``ray_init_args`` go to :func:`ray.init`; ``address`` joins a running cluster. A Ray
  session this backend did not start (joined, or already running in this process) is
  never shut down: only its own actors are stopped. When it starts Ray on a node whose
  cgroup allows fewer CPUs or less memory than the node has (Slurm, containers), Ray is
  given the cgroup's limits (:mod:`fedhive.simulation.limits`).
- A client whose actor dies (killed, out of memory, a segfault in native code) or that
  outlives ``task_timeout`` fails that task only, with a reason that says so; its actor
  is replaced and the round goes on. A task nobody waits for any more (the round timed
  out) is stopped the same way, so no actor stays busy holding a GPU for a lost cause.
- Client state (``context.state``) travels with each task and back, as with the process
  backend: the same seed gives the same history on every backend.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, final

from fedhive.client.app import ClientApp
from fedhive.client.context import Context
from fedhive.common.errors import ConfigError, MissingDependency, SerdeError
from fedhive.common.message import Message
from fedhive.common.records import EvaluateIns, FitIns, Parameters, RecordDict
from fedhive.simulation.backends import Backend, ClientSetup
from fedhive.simulation.limits import NodeLimits, cgroup_limits, node_limits, physical_memory
from fedhive.simulation.ray_feed import DEPTH, ActorFeed, FeedItem
from fedhive.simulation.runner import private_copy
from fedhive.transport.base import Replies, Transport, content_length
from fedhive.transport.inprocess import InProcessTransport

__all__ = ["RayBackend", "RayTransport"]

log = logging.getLogger("fedhive")

#: ``client_resources`` keys, as Flower names them (``memory`` in bytes).
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
_IGNORED = ("actor_type", "actor_kwargs")
_MAX_INFLIGHT = 1024  # tasks on the actors at once, whatever the pool's size


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingDependency("ray", "ray") from exc
    return ray


class _ClientActor:
    """Runs one task at a time with the client app it keeps (made a Ray actor on start)."""

    def __init__(self, app: ClientApp, threads: int) -> None:
        self.app = app
        self.threads = threads
        self.torch_ready = False
        self.frozen = False
        os.environ["OMP_NUM_THREADS"] = str(threads)

    def ready(self) -> int:
        return os.getpid()

    def run(self, task: Message, model: Any, context: Context) -> tuple[Message, RecordDict]:
        if not self.torch_ready and "torch" in sys.modules:  # a client has imported torch
            sys.modules["torch"].set_num_threads(self.threads)
            self.torch_ready = True
        try:
            if model is not None:
                parameters = model if isinstance(model, Parameters) else Parameters(arrays=model)
                task = Message(task.metadata, replace(task.content, parameters=parameters))
            # the object store's arrays are read-only and shared: each client gets a copy
            task = private_copy(task)
        except Exception as exc:  # a model a client cannot get fails that task only
            return task.error_reply(f"{type(exc).__name__}: {exc}"), context.state
        return self.app.handle(task, context), context.state

    def run_batch(
        self,
        specs: list[tuple[Message, int, dict[str, Any], RecordDict | None]],
        run_config: dict[str, Any],
        *models: Any,
    ) -> tuple[list[tuple[Message, RecordDict | None, int]], float]:
        """Run tasks in order; each spec is (task, its model's index into ``models`` or -1,
        the client's node_config, its state or ``None`` for an empty one). Returns the
        replies with the clients' states (``None``: empty before and after, nothing to
        store) and the lengths of the replies' encoded contents (:func:`content_length`,
        for the byte counts: measured here so that the driver, which every reply goes
        through, need not), and the seconds taken."""
        start = time.perf_counter()
        out: list[tuple[Message, RecordDict | None, int]] = []
        for task, index, node_config, state in specs:
            context = Context(
                node_id=task.metadata.node_id,
                node_config=node_config,
                state=RecordDict() if state is None else state,
                run_config=dict(run_config),
                seed=task.metadata.seed,
            )
            reply, after = self.run(task, None if index < 0 else models[index], context)
            kept = None if state is None and after.is_empty() else after
            out.append((reply, kept, content_length(reply)))
        if not self.frozen:  # what the app and its first tasks imported: see common.heap
            self.frozen = True
            gc.freeze()
        return out, time.perf_counter() - start


def _without_model(task: Message, stripped: dict[int, Any]) -> Message:
    """``task`` without its model. Tasks that share a content share its stripped copy
    (``stripped``, by the content's id), so a batch pickles it once."""
    content = stripped.get(id(task.content))
    if content is None:
        content = stripped[id(task.content)] = replace(
            task.content, parameters=Parameters(arrays=[])
        )
    return Message(task.metadata, content)


class _ModelRefs:
    """The object-store reference of each global model, put once (the last few kept)."""

    def __init__(self, ray: Any, keep: int = 2) -> None:
        self.ray = ray
        self.keep = keep
        self._refs: list[tuple[Parameters, Any]] = []  # the model kept alive with its ref

    def ref(self, content: Any) -> Any:
        if not isinstance(content, FitIns | EvaluateIns):
            return None
        parameters = content.parameters
        for known, ref in self._refs:
            if known is parameters:
                return ref
        try:
            payload: Any = list(parameters.arrays)  # arrays travel without a copy
        except SerdeError:  # tensors of a type only the strategy understands
            payload = parameters
        ref = self.ray.put(payload)
        self._refs = [*self._refs, (parameters, ref)][-self.keep :]
        return ref

    def clear(self) -> None:
        self._refs = []


class _Pool:
    """The actors, one per worker thread, and their replacement when one is lost."""

    def __init__(self, ray: Any, app: ClientApp, options: dict[str, Any], size: int) -> None:
        self.ray = ray
        self.options = options
        self.threads = max(1, int(options.get("num_cpus", 1)))
        try:
            self.app_ref = ray.put(app)
        except TypeError as exc:  # Ray says which part could not be pickled
            raise ConfigError(
                "backend='ray' sends client_fn and its mods to every actor, so they must be "
                f"serializable by cloudpickle (no locks, thread-locals or open files): {exc}"
            ) from exc
        self._lock = threading.Lock()
        self.free = [self._make() for _ in range(size)]
        self.live = list(self.free)
        self.replaced = 0

    def _make(self) -> Any:
        remote = self.ray.remote(_ClientActor).options(max_restarts=0, **self.options)
        return remote.remote(self.app_ref, self.threads)

    def wait_ready(self, timeout: float) -> None:
        refs = [actor.ready.remote() for actor in self.live]
        ready, missing = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            self.ray.get(ref)  # an actor that failed to start says why here
        if missing:
            raise ConfigError(
                f"backend='ray': {len(missing)} of {len(refs)} client actors did not start "
                f"within {timeout:g} s (each asks for {self.options}; the cluster has "
                f"{self.ray.available_resources()} free); lower client_resources or num_workers"
            )

    def checkout(self) -> Any:
        with self._lock:
            return self.free.pop()

    def replace(self, actor: Any) -> Any:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone is what we want
            log.debug("stopping a Ray actor: %s", exc)
        made = self._make()
        with self._lock:
            self.live = [made if a is actor else a for a in self.live]
            self.replaced += 1
        return made

    def close(self) -> None:
        with self._lock:
            actors, self.live, self.free = self.live, [], []
        for actor in actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception as exc:  # the session may be gone already
                log.debug("stopping a Ray actor: %s", exc)


@final
class RayTransport(Transport):
    """Sends each task to an actor of the pool; see the module docstring.

    ``task_timeout`` (seconds, ``None`` for none) bounds one client's task, from when its
    actor is up; ``start_timeout`` bounds the start of a replacement actor; ``tick`` is how
    often a waiting worker checks for a cancelled mailbox or a passed deadline.
    """

    def __init__(
        self,
        ray: Any,
        pool: _Pool,
        setup: ClientSetup,
        *,
        task_timeout: float | None = None,
        start_timeout: float = 120.0,
        tick: float = 0.25,
        max_batch: int = 128,
    ) -> None:
        self.ray = ray
        self.start_timeout = start_timeout
        self.pool = pool
        self.setup = setup
        self.task_timeout = task_timeout
        self.tick = tick
        self._models = _ModelRefs(ray)
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[Replies, Any]] = {}
        self.feed = ActorFeed(
            ray,
            pool,
            task_timeout=task_timeout,
            start_timeout=start_timeout,
            tick=tick,
            max_batch=max_batch,
        )
        # Tasks given to the feeders and not yet answered: what the actors may hold (a full
        # batch running, one queued behind), at most _MAX_INFLIGHT. No thread waits on
        # them: the feeders hand each reply to the mailbox.
        inflight = min(_MAX_INFLIGHT, len(pool.live) * DEPTH * max_batch)
        self._inner = InProcessTransport(
            None, num_workers=inflight, latency=setup.latency, start_tasks=self._start
        )

    def send(self, messages: Sequence[Message], replies: Replies) -> None:
        tasks = list(messages)
        with self._lock:
            # tasks of a cancelled mailbox never run: drop what they would have held
            self._tasks = {k: v for k, v in self._tasks.items() if not v[0].cancelled}
            for task in tasks:
                self._tasks[task.metadata.message_id] = (replies, self._models.ref(task.content))
        self._inner.send(tasks, replies)

    def _start(self, starts: list[tuple[Message, Callable[[Message], None]]]) -> None:
        """Queue tasks on the feeders without waiting; each reply goes to its callable."""
        items = []
        stripped: dict[int, Any] = {}  # the tasks (and so their contents) outlive it
        configs = self.setup.node_configs
        for task, answer in starts:
            node_id = task.metadata.node_id
            with self._lock:
                replies, model = self._tasks.pop(task.metadata.message_id, (None, None))
            if node_id not in configs:
                answer(task.error_reply(f"no virtual client with id {node_id!r}"))
                continue
            sent = task if model is None else _without_model(task, stripped)
            done = partial(self._finished, answer)
            load = partial(self._context, task)  # its state is read when it is sent
            items.append(FeedItem(task, sent, model, load, replies, on_done=done))
        self.feed.submit(items)

    def _context(self, task: Message) -> Context:
        node_id = task.metadata.node_id
        return Context(
            node_id=node_id,
            node_config=dict(self.setup.node_configs[node_id]),
            state=self.setup.store.get(node_id),
            run_config=dict(self.setup.run_config),
            seed=task.metadata.seed,
        )

    def _finished(self, answer: Callable[[Message], None], item: FeedItem) -> None:
        reply, state = item.reply, item.state
        if reply is None:  # cannot happen: a finished item has a reply
            reply = item.task.error_reply(f"client {item.task.metadata.node_id!r} got no reply")
        if isinstance(state, RecordDict):
            self.setup.store.put(item.task.metadata.node_id, state)
        if item.content_bytes is not None:  # measured by the actor
            self._inner.remember_content_length(reply, item.content_bytes)
        answer(reply)

    def wire_bytes(self, message: Message) -> int:
        return self._inner.wire_bytes(message)

    def close(self) -> None:
        self.feed.close()
        self._inner.close()
        with self._lock:
            self._tasks.clear()
        self._models.clear()


def _resources(client_resources: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(client_resources) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(
            f"client_resources has unknown keys {unknown}; allowed: {list(RESOURCE_KEYS)} "
            "(memory in bytes)"
        )
    out: dict[str, float] = {"num_cpus": 1.0}
    for key, value in client_resources.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"client_resources[{key!r}] must be a number >= 0, got {value!r}")
        out[key] = float(value)
    if out["num_cpus"] <= 0:
        raise ConfigError(f"client_resources['num_cpus'] must be > 0, got {out['num_cpus']!r}")
    if out.get("num_gpus", 0) > 1 and not float(out["num_gpus"]).is_integer():
        raise ConfigError(
            f"client_resources['num_gpus'] above 1 must be whole, got {out['num_gpus']!r}"
        )
    return out


def _fits(total: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many actors asking for ``need`` the resources ``total`` hold."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    counts = []
    for key, amount in need.items():
        if amount > 0:
            have = float(total.get(names[key], 0.0))
            counts.append(math.floor(have / amount + 1e-9))
    return min(counts) if counts else 1


@final
class RayBackend(Backend):
    """Virtual clients in Ray actors (``"ray"``); see the module docstring.

    ``task_timeout`` bounds each client's task in seconds (``None``: only the round
    timeout bounds it); ``start_timeout`` bounds the start of the actor pool;
    ``max_batch`` caps the tasks one Ray call carries (1: a call per task;
    :mod:`fedhive.simulation.ray_feed`).
    """

    name = "ray"

    def __init__(
        self,
        *,
        task_timeout: float | None = None,
        start_timeout: float = 120.0,
        max_batch: int = 128,
    ) -> None:
        if task_timeout is not None and not task_timeout > 0:
            raise ConfigError(f"task_timeout must be > 0 seconds or None, got {task_timeout!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.task_timeout = task_timeout
        self.start_timeout = start_timeout
        self.max_batch = max_batch
        self.started_ray = False
        self.keep_initialised = False
        self.pool: _Pool | None = None
        self._transport: RayTransport | None = None
        self._ray: Any = None

    def _init(self, ray: Any, init_args: Mapping[str, Any], limits: NodeLimits) -> None:
        if ray.is_initialized():
            if init_args:
                log.warning(
                    "Ray is already running in this process; backend 'ray' joins it and "
                    "ignores ray_init_args %s",
                    sorted(init_args),
                )
            return
        args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        args.update(init_args)
        if "address" not in args:
            # Ray sizes a node it starts from the whole machine; the cgroup may allow less.
            if "num_cpus" not in args and limits.cpus is not None:
                args["num_cpus"] = int(limits.cpus)
            memory = cgroup_limits().memory
            physical = physical_memory()
            if memory is not None and (physical is None or memory < physical):
                args.setdefault("object_store_memory", int(memory * 0.3))
                args.setdefault("_memory", int(memory * 0.6))
        with warnings.catch_warnings():
            # Ray announces a future change of its GPU environment defaults on every start
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**args)
        self.started_ray = True

    def start(self, setup: ClientSetup) -> Transport:
        ray = self._ray = _import_ray()
        need = _resources(setup.client_resources)
        ignored = [name for name in setup.ray.given() if name in _IGNORED]
        if ignored:
            log.warning(
                "backend 'ray' ignores %s: fedhive runs its own client actor (the client app "
                "is kept in each actor between tasks)",
                ", ".join(ignored),
            )
        self.keep_initialised = setup.ray.keep_initialised
        limits = node_limits()
        self._init(ray, dict(setup.ray.init_args or {}), limits)
        total = dict(ray.cluster_resources())
        if len(ray.nodes()) == 1 and limits.cpus is not None:
            total["CPU"] = min(float(total.get("CPU", 0.0)), limits.cpus)
        size = min(setup.num_workers, _fits(total, need))
        if size < 1:
            raise ConfigError(
                f"backend='ray': no client actor fits the cluster: each asks for {need}, the "
                f"cluster has {ray.cluster_resources()}; lower client_resources"
            )
        options: dict[str, Any] = {k: v for k, v in need.items() if v > 0 or k == "num_cpus"}
        if "memory" in options:
            options["memory"] = int(options["memory"])
        if setup.ray.actor_scheduling != "DEFAULT":
            options["scheduling_strategy"] = setup.ray.actor_scheduling
        self.pool = _Pool(ray, setup.app, options, size)
        self.pool.wait_ready(self.start_timeout)
        self._transport = RayTransport(
            ray,
            self.pool,
            setup,
            task_timeout=self.task_timeout,
            start_timeout=self.start_timeout,
            max_batch=self.max_batch,
        )
        return self._transport

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        if self.started_ray and not self.keep_initialised and self._ray is not None:
            self._ray.shutdown()  # only a session this backend started
        self.started_ray = False
