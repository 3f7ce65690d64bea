"""Simulation backends: where the virtual clients of ``start_simulation`` run.

A backend builds the :class:`~fedhive.transport.base.Transport` the engine sends its tasks
through, for a given client app, state store and set of virtual clients
(:class:`ClientSetup`), and releases what it holds in :meth:`Backend.close`. Backends are
found by name in one registry::

    from fedhive.simulation import Backend, register_backend

    class Inline(Backend):
        name = "inline"

        def start(self, setup):
            return InProcessTransport(setup.runner(), num_workers=1)

    register_backend("inline", Inline)
    start_simulation(client_fn=..., num_clients=10, backend="inline")

``start_simulation(backend=...)`` also takes a :class:`Backend` instance directly.

Registered here: ``"thread"`` (the default), ``"process"`` and ``"ray"``
(:mod:`fedhive.simulation.ray_backend`; without Ray installed, asking for it says what to
install). Flower's Ray arguments (``ray_init_args``, ``actor_type``, ``actor_kwargs``, ...) reach
every backend in :attr:`ClientSetup.ray`; the local backends have no Ray actors, so they
log a warning naming the arguments they ignore instead of dropping them silently.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, final

from fedhive.client.app import ClientApp
from fedhive.client.state import StateStore
from fedhive.common.clock import Clock
from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.common.records import Scalar
from fedhive.simulation.population import NodeConfigs
from fedhive.simulation.runner import VirtualClientRunner, init_worker_process
from fedhive.simulation.sharing import shared_models
from fedhive.transport.base import Transport
from fedhive.transport.inprocess import InProcessTransport, Latency

__all__ = [
    "Backend",
    "BackendFactory",
    "ClientSetup",
    "ProcessBackend",
    "RayOptions",
    "ThreadBackend",
    "backend_names",
    "make_backend",
    "register_backend",
    "unregister_backend",
]

log = logging.getLogger("fedhive")


@dataclass(frozen=True)
class RayOptions:
    """Flower's Ray arguments of ``start_simulation``, handed to the backend as given.

    ``actor_scheduling`` and ``keep_initialised`` count as given when they differ from
    Flower's defaults (``"DEFAULT"``, ``False``).
    """

    init_args: Mapping[str, Any] | None = None
    actor_type: Any = None
    actor_kwargs: Mapping[str, Any] | None = None
    actor_scheduling: str = "DEFAULT"
    keep_initialised: bool = False

    def given(self) -> list[str]:
        """The ``start_simulation`` argument names that were set, in signature order."""
        names = []
        if self.init_args is not None:
            names.append("ray_init_args")
        if self.actor_type is not None:
            names.append("actor_type")
        if self.actor_kwargs is not None:
            names.append("actor_kwargs")
        if self.actor_scheduling != "DEFAULT":
            names.append("actor_scheduling")
        if self.keep_initialised:
            names.append("keep_initialised")
        return names


@dataclass(frozen=True)
class ClientSetup:
    """Everything a backend needs to run the client side of one simulation.

    ``node_configs`` maps each virtual client id to its ``context.node_config``
    (``partition-id``, ``num-partitions``); ``num_workers`` is how many tasks may run at
    once (``start_simulation``'s ``num_workers``, or cores / ``client_resources["num_cpus"]``);
    ``clock`` is the engine's clock, for backends that simulate time; ``latency`` gives each
    task's simulated seconds until its reply arrives (on a
    :class:`~fedhive.common.clock.VirtualClock`; see :mod:`fedhive.transport.inprocess`).
    """

    app: ClientApp
    store: StateStore
    node_configs: Mapping[str, Mapping[str, Scalar]]
    run_config: Mapping[str, Scalar]
    num_workers: int
    client_resources: Mapping[str, float] = field(default_factory=dict)
    ray: RayOptions = field(default_factory=RayOptions)
    clock: Clock | None = None
    latency: Latency | None = None

    def runner(self, executor: Executor | None = None) -> VirtualClientRunner:
        """Runs one task for one virtual client (in ``executor`` when one is given)."""
        node_configs: Mapping[str, Mapping[str, Scalar]] = self.node_configs
        if not isinstance(node_configs, NodeConfigs):  # NodeConfigs makes fresh ones on use
            node_configs = {cid: dict(config) for cid, config in node_configs.items()}
        return VirtualClientRunner(
            self.app, self.store, node_configs, dict(self.run_config), executor
        )


class Backend(ABC):
    """Builds the transport of one simulation and releases it.

    ``start_simulation`` calls :meth:`start` once, runs the engine over the transport it
    returns and calls :meth:`close` at the end, also after a failure (so ``close`` must
    work after a partial or no ``start``). ``name`` is recorded in the history's config.
    """

    name: str = "custom"

    @abstractmethod
    def start(self, setup: ClientSetup) -> Transport:
        """The transport whose ``send`` runs ``setup``'s virtual clients."""

    @abstractmethod
    def close(self) -> None:
        """Release the transport, workers and anything else :meth:`start` acquired."""


def _warn_ray_options(backend: str, ray: RayOptions) -> None:
    given = ray.given()
    if given:
        log.warning(
            "backend %r ignores Flower's Ray arguments %s: they configure Ray actors, and "
            "this backend runs clients in %s; the simulation goes on without them "
            "(use backend='ray' to apply them)",
            backend,
            ", ".join(given),
            "worker threads" if backend == "thread" else "worker processes",
        )


class _TorchThreads:
    """One torch thread per worker while a threaded simulation runs (then restored)."""

    def __init__(self) -> None:
        self.previous: int | None = None

    def enter(self) -> None:
        torch: Any = sys.modules.get("torch")  # only clients that use torch pay for it
        if torch is not None and self.previous is None:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def exit(self) -> None:
        torch: Any = sys.modules.get("torch")
        if self.previous is not None and torch is not None:
            torch.set_num_threads(self.previous)
        self.previous = None


@final
class ThreadBackend(Backend):
    """Worker threads in this process (``"thread"``, the default).

    No start cost and no pickling rules (closures work as ``client_fn``, as in Flower),
    one copy of the data. For small models the Python around each torch/numpy call holds
    the GIL, so more threads rarely help; for large models whose kernels dominate, they
    overlap. While it runs, torch uses one intra-op thread per worker. With one worker on
    a virtual clock (simulated devices) the engine's own thread runs the clients, with no
    worker thread (the transport's ``inline`` mode): the same history, less overhead.
    """

    name = "thread"

    def __init__(self) -> None:
        self._transport: Transport | None = None
        self._torch = _TorchThreads()

    def start(self, setup: ClientSetup) -> Transport:
        _warn_ray_options(self.name, setup.ray)
        workers = isolate_shared_models(setup)
        self._transport = InProcessTransport(
            setup.runner(), num_workers=workers, latency=setup.latency, inline=True
        )
        self._torch.enter()
        return self._transport

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._torch.exit()


def isolate_shared_models(setup: ClientSetup) -> int:
    """The thread backend's worker count: 1 when the clients share a module-level model
    (:func:`~fedhive.simulation.sharing.shared_models`), which two threads must not train
    at once; ``setup.num_workers`` otherwise."""
    if setup.num_workers <= 1:
        return setup.num_workers
    names = shared_models(setup.app.client_fn)
    if not names:
        return setup.num_workers
    log.warning(
        "the virtual clients share the model object(s) %s (module-level or captured by "
        "client_fn), so the thread backend runs them one at a time; build the model "
        "inside client_fn, or use backend='process' (each worker has its own copy), to "
        "run %d at once",
        ", ".join(names),
        setup.num_workers,
    )
    return 1


def _check_picklable(app: ClientApp) -> None:
    try:
        ForkingPickler.dumps(app)
    except Exception as exc:  # pickling raises many types; each means "not picklable"
        raise ConfigError(
            "backend='process' sends client_fn and mods to worker processes, so they must "
            f"be picklable (define them at module level): {type(exc).__name__}: {exc}"
        ) from exc


@final
class ProcessBackend(Backend):
    """Spawned worker processes (``"process"``), each with one torch thread.

    They use every core after a one-off start of 1-3 s; pick it for long runs of torch
    or pure-Python clients. ``client_fn`` and its mods must be picklable: they are sent
    to each worker once, and each task's client state travels with the task and back.
    """

    name = "process"

    def __init__(self) -> None:
        self._transport: Transport | None = None
        self._executor: ProcessPoolExecutor | None = None

    def start(self, setup: ClientSetup) -> Transport:
        _warn_ray_options(self.name, setup.ray)
        _check_picklable(setup.app)
        self._executor = ProcessPoolExecutor(
            max_workers=setup.num_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker_process,
            initargs=(setup.app,),
        )
        runner = setup.runner(self._executor)
        self._transport = InProcessTransport(
            runner, num_workers=setup.num_workers, latency=setup.latency
        )
        return self._transport

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def _ray_backend() -> Backend:
    if not _ray_installed():
        raise MissingDependency("ray", "ray")
    from fedhive.simulation.ray_backend import RayBackend

    return RayBackend()


BackendFactory = Callable[[], Backend]
"""Makes a fresh :class:`Backend` for one simulation (a class with no arguments works)."""

_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_registry: dict[str, BackendFactory] = {}
_lock = threading.Lock()


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``start_simulation(backend=name)`` (and ``[simulation] backend``) use ``factory``.

    ``name`` is lower-case letters, digits, ``-`` and ``_``, starting with a letter. A
    registered name is refused unless ``replace=True``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"a backend name must be lower-case letters, digits, '-' or '_' and start "
            f"with a letter; got {name!r}"
        )
    if not callable(factory):
        raise ConfigError(
            f"the factory of backend {name!r} must be callable (a Backend class or a "
            f"function returning a Backend); got {type(factory).__name__}"
        )
    with _lock:
        if name in _registry and not replace:
            raise ConfigError(
                f"backend {name!r} is already registered; pass replace=True to replace it"
            )
        _registry[name] = factory


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name`` (unknown names are ignored)."""
    with _lock:
        _registry.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order (built-ins first)."""
    with _lock:
        return tuple(_registry)


def _known() -> str:
    return ", ".join(repr(name) for name in backend_names())


def make_backend(backend: str | Backend) -> Backend:
    """The backend that ``backend`` names (a fresh one from its factory), or the instance given.

    Raises :class:`ConfigError` for an unknown name, listing the registered ones, and
    whatever the factory raises (:class:`MissingDependency` for a missing extra).
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise ConfigError(
            f"backend must be a registered name ({_known()}) or a Backend instance; "
            f"got {type(backend).__name__}"
        )
    with _lock:
        factory = _registry.get(backend)
    if factory is None:
        raise ConfigError(
            f"backend must be one of {_known()} (or a Backend instance); got {backend!r}. "
            "Register your own with fedhive.simulation.register_backend(name, factory)"
        )
    made = factory()
    if not isinstance(made, Backend):
        raise ConfigError(
            f"the factory of backend {backend!r} returned {type(made).__name__}, "
            "not a fedhive.simulation.Backend"
        )
    return made


register_backend("thread", ThreadBackend)
register_backend("process", ProcessBackend)
register_backend("ray", _ray_backend)
