"""``start_simulation``: many virtual clients on one machine, Flower's signature.

Where the clients run is the backend (:mod:`fedhive.simulation.backends`; measured in
``benchmarks/backends.py``, 2 cores, 20 clients per round):

- ``"thread"`` (default): worker threads in this process. No start cost, no pickling
  rules (closures and lambdas work as ``client_fn``, as in Flower), one copy of the data.
  For small models the Python overhead around each torch/numpy call holds the GIL, so a
  second thread gave no speed-up (torch MLP: 0.87x; numpy: 0.61x); for large models
  whose kernels dominate, threads do overlap.
- ``"process"``: spawned worker processes, each with one torch thread. They use every
  core (torch MLP: 1.97x with 2 workers, pure Python: 1.52x) after a one-off start of
  1-3 s; pick it for long runs of torch or pure-Python clients. ``client_fn`` and its
  mods must be picklable; they are sent to each worker once.
- any name given to :func:`~fedhive.simulation.backends.register_backend`, or a
  :class:`~fedhive.simulation.backends.Backend` instance.

Both built-in backends give the same history for the same seed.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhive.client.app import ClientApp, ClientFn, Mod
from fedhive.client.state import StateStore
from fedhive.common.clock import Clock
from fedhive.common.errors import ConfigError
from fedhive.common.records import Scalar
from fedhive.server.checkpoint import Checkpointer
from fedhive.server.client_manager import ClientManager, SimpleClientManager
from fedhive.server.config import ServerConfig
from fedhive.server.engine import Engine, FitWorkflow, RoundCallback
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy
from fedhive.server.server import unpack_server
from fedhive.server.stages import RoundStage, build_pipeline
from fedhive.server.strategy import FedAvg, Strategy
from fedhive.simulation.backends import (
    Backend,
    ClientSetup,
    RayOptions,
    backend_names,
    make_backend,
)
from fedhive.simulation.population import NodeConfigs, PopulationClientManager, PopulationIds
from fedhive.simulation.system import AvailableClients, SystemModel
from fedhive.transport.inprocess import Latency

__all__ = ["start_simulation", "BACKENDS"]  # noqa: F822 - BACKENDS comes from __getattr__

log = logging.getLogger("fedhive")

_FLOWER_ONLY = ("server", "ray_init_args", "actor_type", "actor_kwargs")


def __getattr__(name: str) -> Any:
    # ``BACKENDS`` (kept for compatibility): the registered backend names, read from the
    # registry each time so that backends registered later are listed too.
    if name == "BACKENDS":
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _client_ids(num_clients: int | None, clients_ids: Sequence[str] | None) -> Sequence[str]:
    if clients_ids is not None:
        ids = [str(c) for c in clients_ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("clients_ids must be unique")
        if num_clients is not None and num_clients != len(ids):
            raise ConfigError(f"num_clients={num_clients} but {len(ids)} clients_ids were given")
        return ids
    if num_clients is None or isinstance(num_clients, bool) or num_clients < 1:
        raise ConfigError(f"num_clients must be an int >= 1, got {num_clients!r}")
    return PopulationIds(num_clients)  # never listed: a million clients cost nothing


def _num_workers(num_workers: int | None, client_resources: dict[str, float] | None) -> int:
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"num_workers must be an int >= 1, got {num_workers!r}")
        return num_workers
    cpus = float((client_resources or {}).get("num_cpus", 1) or 1)
    if cpus <= 0:
        raise ConfigError(f"client_resources['num_cpus'] must be > 0, got {cpus!r}")
    return max(1, int((os.cpu_count() or 1) // cpus))


def start_simulation(
    *,
    client_fn: ClientFn,
    num_clients: int | None = None,
    clients_ids: Sequence[str] | None = None,
    client_resources: dict[str, float] | None = None,
    config: ServerConfig | None = None,
    strategy: Strategy | None = None,
    client_manager: ClientManager | None = None,
    keep_initialised: bool = False,
    actor_scheduling: str = "DEFAULT",
    backend: str | Backend = "thread",
    num_workers: int | None = None,
    seed: int | None = None,
    mods: Sequence[Mod] = (),
    callbacks: Sequence[RoundCallback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    model_dir: str | Path | None = None,
    run_config: dict[str, Scalar] | None = None,
    state_dir: str | Path | None = None,
    state_memory_limit: int = 1 << 20,
    state_memory_budget: int | None = None,
    clock: Clock | None = None,
    latency: Latency | None = None,
    fit_workflow: FitWorkflow | None = None,
    secure_aggregation: Any = None,
    policy: RunPolicy | None = None,
    stages: Sequence[RoundStage] = (),
    system: SystemModel | None = None,
    compression: Any = None,
    **flower_only: Any,
) -> History:
    """Simulate ``num_clients`` virtual clients and return the run's :class:`History`.

    ``client_fn`` takes ``context: Context`` (``context.node_config["partition-id"]``,
    ``context.node_config["num-partitions"]``, ``context.state``) or, as in old Flower,
    ``cid: str``, and returns a :class:`~fedhive.client.NumPyClient` or
    :class:`~fedhive.client.Client`. Clients are built only when sampled.

    fedhive's additions: ``backend`` (``"thread"``, ``"process"``, another registered
    name or a :class:`~fedhive.simulation.backends.Backend` instance), ``num_workers``
    (default: cores / ``client_resources["num_cpus"]``), ``seed`` (drawn at random and
    recorded in the history when ``None``), client ``mods``, round ``callbacks``,
    ``checkpoint_dir`` (a checkpoint after every round) with ``resume``, ``model_dir``
    (where ``final_model.npz`` and ``best_model.npz`` go; default ``checkpoint_dir``),
    and where large client state goes (``state_dir``; a state larger than
    ``state_memory_limit`` goes there, and so does any state beyond a total of
    ``state_memory_budget`` bytes in memory). ``secure_aggregation`` (a
    :class:`~fedhive.secagg.SecAggPlusWorkflow`, a :class:`~fedhive.secagg.SecAggConfig` or
    a dict such as ``{"threshold": 7, "bits": 12, "clip": 1.0}``) runs every fit round
    with SecAgg+ (the first of the round's ``stages``, :mod:`fedhive.server.stages`) and
    puts :data:`~fedhive.secagg.secaggplus_mod` first in the client mods. ``policy`` runs
    the loop: synchronous rounds by default, or
    :class:`~fedhive.server.asynchronous.BufferedAsync` (``config.num_rounds`` model
    versions, no round barrier).
    ``latency`` (``task -> seconds``, deterministic, e.g. drawn from ``task.metadata.seed``)
    simulates each client's time to answer on ``clock=VirtualClock()``: stragglers and
    round deadlines play out in simulated time, and the history, timings included, is
    the same for the same seed. ``system`` (a :class:`~fedhive.simulation.system.SystemModel`)
    simulates device heterogeneity instead: per-client compute speed and bandwidth,
    availability windows and dropout, on a ``VirtualClock``; rounds then record
    ``virtual_time_s``. ``compression`` (a codec such as ``fedhive.compression.TopK(ratio=0.01,
    error_feedback=True)``, a :class:`~fedhive.compression.Compression` or a
    ``[compression]`` mapping) encodes each client's update (and, optionally, the
    broadcast model); the client mod goes in front of ``mods``. With ``secure_aggregation``
    the codec must be shared-scale QSGD or shared-seed random-k, encoded inside the SecAgg+
    round (docs/compression.md).

    Flower's Ray arguments (``ray_init_args``, ``actor_type``, ``actor_kwargs``,
    ``actor_scheduling``, ``keep_initialised``) are handed to the backend; the local
    backends log a warning that they ignore them.
    """
    unknown = set(flower_only) - set(_FLOWER_ONLY)
    if unknown:
        raise TypeError(f"start_simulation() got unexpected arguments: {sorted(unknown)}")
    strategy, client_manager = unpack_server(flower_only.get("server"), strategy, client_manager)
    ids = _client_ids(num_clients, clients_ids)
    workers = _num_workers(num_workers, client_resources)
    if seed is None:
        seed = secrets.randbits(31)
    if system is not None:  # simulated devices: the virtual clock, their latency and mod
        clock, latency, mods = system.attach(clock, latency, mods)
    if secure_aggregation is not None:
        from fedhive.secagg.client import with_secagg_mod
        from fedhive.secagg.server import as_workflow

        stages = [as_workflow(secure_aggregation, strategy, fit_workflow), *stages]
        mods = with_secagg_mod(mods)
    if compression is not None:
        from fedhive.compression.config import compression_setup

        stages, mods, _ = compression_setup(
            compression,
            list(stages),
            list(mods),
            secure=secure_aggregation is not None,
            policy=policy,
        )
    strategy = strategy or FedAvg()
    build_pipeline(strategy, stages, fit_workflow)  # before any worker starts
    app = ClientApp(client_fn, mods)
    chosen = make_backend(backend)  # unknown names and missing extras fail before any work
    ray = RayOptions(
        init_args=flower_only.get("ray_init_args"),
        actor_type=flower_only.get("actor_type"),
        actor_kwargs=flower_only.get("actor_kwargs"),
        actor_scheduling=actor_scheduling,
        keep_initialised=keep_initialised,
    )
    store = StateStore(
        state_dir, memory_limit_bytes=state_memory_limit, total_memory_bytes=state_memory_budget
    )
    setup = ClientSetup(
        app=app,
        store=store,
        node_configs=(
            NodeConfigs(len(ids))
            if isinstance(ids, PopulationIds)
            else {cid: {"partition-id": i, "num-partitions": len(ids)} for i, cid in enumerate(ids)}
        ),
        run_config=dict(run_config or {}),
        num_workers=workers,
        client_resources=dict(client_resources or {}),
        ray=ray,
        clock=clock,
        latency=latency,
    )
    try:
        transport = chosen.start(setup)
        if isinstance(client_manager, SimpleClientManager) and client_manager.num_available() == 0:
            # an empty manager (a Flower Server's): the virtual clients register with it
            for cid in ids:
                client_manager.register(cid)
        manager = client_manager or (
            PopulationClientManager(len(ids), seed=seed)
            if isinstance(ids, PopulationIds)
            else SimpleClientManager(ids, seed=seed)
        )
        if system is not None and clock is not None:
            manager = AvailableClients(manager, system, clock)
        checkpointer = (
            Checkpointer(checkpoint_dir, store, model_dir=model_dir)
            if checkpoint_dir is not None
            else None
        )
        engine = Engine(
            strategy=strategy,
            transport=transport,
            client_manager=manager,
            config=config or ServerConfig(),
            seed=seed,
            clock=clock,
            callbacks=callbacks,
            fit_workflow=fit_workflow,
            checkpointer=checkpointer,
            policy=policy,
            stages=stages,
        )
        engine.history.config = {"seed": seed, "num_clients": len(ids), "backend": chosen.name}
        if resume and checkpointer is not None and checkpointer.restore(engine):
            log.info("resumed from round %d", engine.current_round)
        history = engine.run()
        if checkpointer is not None:
            checkpointer.save_final(engine)
        return history
    finally:
        chosen.close()
        store.close()
