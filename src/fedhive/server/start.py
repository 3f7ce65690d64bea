"""``start_server``: Flower's entry point for a real federation over gRPC."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedhive.common.errors import ConfigError
from fedhive.server.checkpoint import Checkpointer
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.config import ServerConfig
from fedhive.server.engine import Engine, FitWorkflow, RoundCallback
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy
from fedhive.server.server import Server, unpack_server
from fedhive.server.stages import RoundStage, build_pipeline
from fedhive.server.strategy import FedAvg, Strategy
from fedhive.server.strategy.traits import traits_of
from fedhive.transport.base import DEFAULT_MIN_UPLOAD_RATE, DEFAULT_STAGED_BYTES

__all__ = ["DEFAULT_ROUND_TIMEOUT", "start_server"]

#: The round timeout of a deployment whose config sets none (seconds): a client that
#: takes a task and never answers (it only heartbeats) cannot stall a round for longer.
DEFAULT_ROUND_TIMEOUT = 600.0

log = logging.getLogger("fedhive.server")


def start_server(
    *,
    server_address: str = "[::]:8080",
    config: ServerConfig | None = None,
    strategy: Strategy | None = None,
    client_manager: SimpleClientManager | None = None,
    certificates: tuple[bytes, bytes, bytes] | None = None,
    grpc_max_message_length: int | None = None,
    require_client_auth: bool = False,
    auth_tokens: Mapping[str, str] | None = None,
    wait_timeout: float = 24 * 3600.0,
    seed: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[RoundCallback] = (),
    heartbeat_timeout: float = 30.0,
    max_staged_uploads: int = 2,
    max_staged_bytes: int | None = DEFAULT_STAGED_BYTES,
    upload_window_bytes: int | None = None,
    spill_bytes: int | None = DEFAULT_STAGED_BYTES,
    spill_dir: str | Path | None = None,
    chunk_bytes: int | None = None,
    on_started: object = None,
    fit_workflow: FitWorkflow | None = None,
    secure_aggregation: Any = None,
    policy: RunPolicy | None = None,
    stages: Sequence[RoundStage] = (),
    compression: Any = None,
    server: Server | None = None,
    data_plane: bool = True,
    data_port: int = 0,
    min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE,
    upload_grace_s: float = 10.0,
) -> History:
    """Serve a federation and run ``config.num_rounds`` rounds of ``strategy``.

    As in Flower: ``certificates=(ca_cert, server_cert, server_key)`` (PEM bytes) turns on
    TLS; without it the server is insecure and says so in the log. Rounds wait for
    ``min_available_clients`` to connect (up to ``wait_timeout`` seconds).
    ``grpc_max_message_length`` caps the size of one message from a client (arrays are
    streamed in chunks, so the model itself may be of any size).

    fedhive adds ``require_client_auth`` (mutual TLS), ``auth_tokens`` (``node_id ->
    token`` of enrolled clients; others are refused before they receive anything),
    ``checkpoint_dir``/``resume`` (a server killed at any moment loses no finished round),
    ``seed`` and ``callbacks``, and options on where uploads wait until they are folded:
    an upload of ``spill_bytes`` or more (64 MiB by default; ``None``: never) is written
    to an anonymous temporary file in ``spill_dir`` as it arrives and read back a part at
    a time, so the server holds about the global model and the aggregate however many
    large uploads arrive at once. Smaller uploads are held in memory:
    ``max_staged_uploads``/``max_staged_bytes`` bound how many at once, from their first
    chunk until they are folded, and (beyond the first) their total size; more wait in
    flow control. ``upload_window_bytes`` fixes the gRPC
    flow-control window of each client's stream (default: gRPC's, sized to the link),
    which bounds what a client waiting for a slot can send ahead. While an upload waits for
    a slot, one holding a slot that has sent nothing for ``upload_grace_s`` seconds or
    averages under ``min_upload_rate`` bytes a second is refused and its client
    disconnected (docs/hostile_inputs.md). Uploads are folded as
    they arrive (deployment does not promise bit-reproducible sums).
    ``on_started(server)`` runs once listening. A ``config`` without ``round_timeout``
    gets :data:`DEFAULT_ROUND_TIMEOUT` (600 s): in a deployment a client that takes a
    task and only heartbeats must not stall the round forever.
    ``fit_workflow`` replaces the fit round; ``secure_aggregation`` (a
    :class:`~fedhive.secagg.SecAggPlusWorkflow`, :class:`~fedhive.secagg.SecAggConfig` or
    dict of options) runs every fit round with SecAgg+ (clients started with
    ``start_client`` answer it) as the first of the round's ``stages``
    (:mod:`fedhive.server.stages`). ``policy`` runs the loop: synchronous rounds by default,
    or :class:`~fedhive.server.asynchronous.BufferedAsync` (``config.num_rounds`` model
    versions, no round barrier). ``compression`` (a codec, a
    :class:`~fedhive.compression.Compression` or a ``[compression]`` mapping) asks every
    fit task for an encoded update; clients started with ``start_client`` answer it. With
    ``secure_aggregation`` the codec must be shared-scale QSGD or shared-seed random-k:
    the SecAgg+ round encodes to ring integers before masking (docs/compression.md).
    ``server`` (Flower's :class:`~fedhive.server.Server`) gives the strategy and client
    manager when those are not passed. ``data_plane`` moves tasks and replies of 8 MiB
    or more on a side socket beside the gRPC stream, with the same TLS and one-use tickets
    handed out on each client's authenticated stream (about 1.6x faster than gRPC for a
    100 MB model, ``benchmarks/grpc_round.py``); clients that cannot reach it use the
    stream. ``data_port`` is its TCP port on the host of ``server_address`` (0: a free
    one, announced to clients when they join); open it in the firewall beside the gRPC
    port, or pass ``data_plane=False``.
    """
    from fedhive.transport.frames import DEFAULT_CHUNK_BYTES
    from fedhive.transport.grpc_server import GrpcServer, ServerSecurity

    strategy, given = unpack_server(server, strategy, client_manager)
    if given is not None and not isinstance(given, SimpleClientManager):
        raise ConfigError(
            f"start_server needs a SimpleClientManager (clients register with it), got "
            f"{type(given).__name__}"
        )
    client_manager = given
    if certificates is None:
        log.warning("serving WITHOUT TLS: pass certificates=(ca, cert, key) to encrypt")
    if not require_client_auth and not auth_tokens:
        log.warning(
            "NO CLIENT AUTHENTICATION: any process that reaches this port can join under any "
            "node id, as many times as it likes (and count as that many secure aggregation "
            "peers); enroll clients with auth_tokens or require_client_auth (mutual TLS)"
        )
    if require_client_auth and certificates is None:
        raise ConfigError("require_client_auth needs certificates=(ca, cert, key)")
    if secure_aggregation is not None:
        from fedhive.secagg.server import as_workflow

        stages = [as_workflow(secure_aggregation, strategy, fit_workflow), *stages]
    if compression is not None:
        from fedhive.compression.config import compression_setup

        stages, _, _ = compression_setup(
            compression, list(stages), [], secure=secure_aggregation is not None, policy=policy
        )
    strategy = strategy or FedAvg()
    build_pipeline(strategy, stages, fit_workflow)  # before anything listens
    manager = client_manager or SimpleClientManager(seed=seed, wait_timeout=wait_timeout)
    no_amplification = getattr(strategy, "assume_no_amplification", None)
    if callable(no_amplification):  # DP wrappers: who shows up is not the server's choice
        no_amplification()
    security = ServerSecurity(certificates, require_client_auth, auth_tokens)
    limit = grpc_max_message_length or (1 << 40)
    grpc_server = GrpcServer(
        server_address,
        client_manager=manager,
        security=security,
        max_message_bytes=limit,
        heartbeat_timeout=heartbeat_timeout,
        max_staged_uploads=max_staged_uploads,
        max_staged_bytes=max_staged_bytes,
        upload_window_bytes=upload_window_bytes,
        spill_bytes=spill_bytes,
        spill_dir=spill_dir,
        chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
        # a reply holds the model and each extra the strategy declares, at most
        reply_records=max(2, 1 + len(traits_of(strategy).layout.extras)),
        data_plane=data_plane,
        data_port=data_port,
        min_upload_rate=min_upload_rate,
        upload_grace_s=upload_grace_s,
    ).start()
    log.info("fedhive server listening on port %s", grpc_server.port)
    if callable(on_started):
        on_started(grpc_server)
    config = config or ServerConfig()
    if config.round_timeout is None:
        log.info("round_timeout not set: rounds end after %g s", DEFAULT_ROUND_TIMEOUT)
        config = dataclasses.replace(config, round_timeout=DEFAULT_ROUND_TIMEOUT)
    checkpointer = Checkpointer(checkpoint_dir) if checkpoint_dir is not None else None
    try:
        engine = Engine(
            strategy=strategy,
            transport=grpc_server,
            client_manager=manager,
            config=config or ServerConfig(),
            seed=seed if seed is not None else secrets.randbits(31),
            run_id=secrets.randbits(62),
            callbacks=callbacks,
            checkpointer=checkpointer,
            fit_workflow=fit_workflow,
            policy=policy,
            stages=stages,
            ordered=False,  # fold uploads as they arrive: no reorder buffer of client models
        )
        if resume and checkpointer is not None and checkpointer.restore(engine):
            engine.run_id = secrets.randbits(62)  # results sent before the restart are stale
            log.info("resumed after round %d", engine.current_round)
        # Round 1 is sized from the clients connected when it starts (as every round
        # is, by Flower's num_fit_clients), so it starts once min_available_clients are
        wanted = _min_available_clients(strategy)
        rounds_left = config.num_rounds > engine.current_round
        if wanted and rounds_left and isinstance(manager, SimpleClientManager):
            manager.wait_for(wanted, wait_timeout)
        history = engine.run()
        if checkpointer is not None:
            checkpointer.save_final(engine)
        return history
    finally:
        grpc_server.finish_run()


def _min_available_clients(strategy: Any) -> int:
    """The ``min_available_clients`` of ``strategy`` or of the strategy it wraps (a DP
    or composed wrapper's ``strategy``, an asynchronous strategy's ``sampling``); 0 when
    none says."""
    seen = 0
    while strategy is not None and seen < 8:
        wanted = getattr(strategy, "min_available_clients", None)
        if isinstance(wanted, int) and not isinstance(wanted, bool):
            return wanted
        inner = getattr(strategy, "strategy", None)
        strategy = inner if inner is not None else getattr(strategy, "sampling", None)
        seen += 1
    return 0
