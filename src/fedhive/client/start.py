"""Flower-style entry points that connect a client to a server over gRPC."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedhive.client.app import ClientApp, ClientFn, Mod
from fedhive.client.client import Client
from fedhive.client.context import Context
from fedhive.client.numpy_client import NumPyClient
from fedhive.common.clock import Clock, SystemClock, sleep_async
from fedhive.common.errors import ConfigError, SerdeError, StateError, TransportError
from fedhive.common.message import Message
from fedhive.common.records import RecordDict

__all__ = ["start_client", "start_clients", "start_numpy_client"]

if TYPE_CHECKING:
    from fedhive.transport.grpc_client import ClientSecurity

log = logging.getLogger("fedhive.client")


def _security(
    insecure: bool | None,
    root_certificates: bytes | str | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    token: str,
) -> ClientSecurity:
    from fedhive.transport.grpc_client import ClientSecurity

    if isinstance(root_certificates, str):
        root_certificates = Path(root_certificates).read_bytes()
    if insecure is None:
        insecure = root_certificates is None
        if insecure:
            log.warning(
                "connecting WITHOUT TLS (no root_certificates given): updates travel in the "
                "clear; pass root_certificates=... to encrypt the connection"
            )
    elif insecure and root_certificates is not None:
        raise ConfigError("insecure=True contradicts root_certificates; give one or the other")
    return ClientSecurity(
        insecure=insecure,
        root_certificates=root_certificates,
        certificate_chain=certificate_chain,
        private_key=private_key,
        token=token,
    )


def start_client(
    *,
    server_address: str,
    client: Client | None = None,
    client_fn: ClientFn | None = None,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    transport: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    node_id: str | None = None,
    auth_token: str = "",
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    mods: Sequence[Mod] = (),
    persistent: bool = False,
    audit_log: str | Path | None = None,
    heartbeat_interval: float = 5.0,
    chunk_bytes: int | None = None,
    clock: Clock | None = None,
    state_dir: str | Path | None = None,
    grpc_max_message_length: int | None = None,
    data_plane: bool = True,
) -> None:
    """Connect to a fedhive server and answer its tasks until the run ends.

    ``grpc_max_message_length`` (Flower's) is accepted and has no effect: models travel
    in chunks, so no message limit applies to them.

    Flower 1.x's arguments keep their meaning: ``client`` (a ``Client``, e.g.
    ``MyNumPyClient().to_client()``) or ``client_fn``, ``root_certificates`` (PEM bytes or
    a file path; without them the connection is insecure, with a warning, as Flower's is),
    ``max_retries`` and ``max_wait_time`` for reconnecting with exponential backoff when
    the server is unreachable. fedhive adds ``node_id`` (default: random), ``auth_token``
    (the secret enrolled on the server), a client certificate for mutual TLS, client
    ``mods`` (e.g. a site policy), ``persistent`` (stay up and join the next run) and
    ``audit_log`` (a JSON-lines record of every message that leaves this site).
    The backoff waits, and ``max_wait_time``, are measured on ``clock`` (default:
    :class:`~fedhive.common.clock.SystemClock`; a virtual clock makes them pass at once).
    The SecAgg+ client mod is put first unless ``mods`` has one: it only answers secure
    aggregation stages, so the client joins secure rounds when the server runs them; the
    compression mod likewise answers the rounds whose tasks ask for an encoded update.
    ``state_dir`` keeps the client's persistent state (``context.state``: error-feedback
    residuals, SCAFFOLD's variate) on disk across restarts, and the node id with it when
    ``node_id`` is not given. ``data_plane`` lets large tasks and replies use the
    server's data port when it offers one and this client reaches it (the same TLS and
    checks; otherwise they go on the gRPC stream); ``False`` keeps everything on the
    stream.
    """
    if (client is None) == (client_fn is None):
        raise ConfigError("start_client needs exactly one of client= or client_fn=")
    if transport not in (None, "grpc-bidi", "grpc"):
        raise ConfigError(f"transport {transport!r} is not supported; use 'grpc'")
    from fedhive.transport.frames import DEFAULT_CHUNK_BYTES
    from fedhive.transport.grpc_client import AuditLog, ClientSession, Retryable

    security = _security(insecure, root_certificates, certificate_chain, private_key, auth_token)
    if node_id is None and state_dir is not None:
        node_id = node_id_in(state_dir)
    node = node_id or uuid.uuid4().hex
    handle = _node_handler(
        client_fn if client_fn is not None else _constant(client), mods, node, state_dir
    )
    session_args = dict(
        security=security,
        chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
        heartbeat_interval=heartbeat_interval,
        audit=AuditLog(audit_log) if audit_log is not None else None,
        data_plane=data_plane,
    )
    clock = clock or SystemClock()
    backoff = _Backoff(max_retries, max_wait_time, clock)
    while True:
        session = ClientSession(server_address, node, handle, **session_args)  # type: ignore[arg-type]
        try:
            end = session.run()
        except Retryable as exc:
            clock.sleep(backoff.after(exc))
            continue
        backoff.reset()
        log.info("run ended: %s", end.reason)
        if not persistent:
            return


def start_numpy_client(
    *,
    server_address: str,
    client: NumPyClient,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    **kwargs: object,
) -> None:
    """Flower 1.x's ``start_numpy_client``: ``start_client(client=client.to_client())``."""
    start_client(
        server_address=server_address,
        client=client.to_client(),
        root_certificates=root_certificates,
        insecure=insecure,
        **kwargs,  # type: ignore[arg-type]
    )


def start_clients(
    *,
    server_address: str,
    client_fn: ClientFn,
    node_ids: Sequence[str] | int,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    auth_tokens: Mapping[str, str] | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    mods: Sequence[Mod] = (),
    persistent: bool = False,
    audit_log: str | Path | None = None,
    heartbeat_interval: float = 5.0,
    chunk_bytes: int | None = None,
    max_workers: int | None = None,
    clock: Clock | None = None,
    data_plane: bool = True,
) -> None:
    """Run many clients in this process, each a node of its own with its own session,
    until the run ends.

    For load tests and for hosts that serve many nodes (one per data silo or device
    emulated): the sessions share one asyncio event loop (a few coroutines each, instead
    of the three or four threads of :func:`start_client`), and ``client_fn`` (called with
    each node's own :class:`Context`, as in simulation) does its fit and evaluate work in
    a pool of ``max_workers`` threads (default: the number of nodes, at most 32).

    ``node_ids`` names the nodes, or gives their number (random names then).
    ``auth_tokens`` maps node ids to their enrolled tokens. The other options mean what
    they mean for :func:`start_client` and apply to every node; ``audit_log`` is shared,
    one line per message with no node id; ``clock`` times every node's backoff. The first
    node that fails for good (refused, or out of retries) stops the others and its error
    is raised, naming the node.
    """
    from fedhive.transport.frames import DEFAULT_CHUNK_BYTES, BufferPool
    from fedhive.transport.grpc_client import AuditLog

    nodes = (
        [f"{uuid.uuid4().hex[:12]}-{i}" for i in range(node_ids)]
        if isinstance(node_ids, int)
        else list(node_ids)
    )
    if not nodes or len(set(nodes)) != len(nodes):
        raise ConfigError("start_clients needs at least one node id, and no id twice")
    base = _security(insecure, root_certificates, certificate_chain, private_key, "")
    tokens = dict(auth_tokens or {})
    workers = max_workers or min(32, len(nodes))
    session_args = dict(
        chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
        heartbeat_interval=heartbeat_interval,
        audit=AuditLog(audit_log) if audit_log is not None else None,
        buffers=BufferPool(max_free=workers),  # one idle buffer per worker, not per node
        data_plane=data_plane,
    )

    async def run_all() -> None:
        with ThreadPoolExecutor(workers, thread_name_prefix="fedhive-client") as executor:
            tasks = [
                asyncio.create_task(
                    _run_node(
                        server_address,
                        node,
                        _node_handler(client_fn, mods, node),
                        {**session_args, "security": replace(base, token=tokens.get(node, ""))},
                        executor,
                        _Backoff(max_retries, max_wait_time, clock or SystemClock()),
                        persistent,
                    )
                )
                for node in nodes
            ]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in tasks:
                if task in done and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]

    asyncio.run(run_all())


async def _run_node(
    address: str,
    node: str,
    handle: Callable[[Message], Message],
    session_args: dict[str, object],
    executor: Executor,
    backoff: _Backoff,
    persistent: bool,
) -> None:
    """One node's sessions on the running loop: :func:`start_client`'s loop, awaited."""
    from fedhive.transport.grpc_aio_client import AsyncClientSession
    from fedhive.transport.grpc_client import Retryable

    while True:
        session = AsyncClientSession(address, node, handle, **session_args)  # type: ignore[arg-type]
        session.executor = executor
        try:
            end = await session.run()
        except Retryable as exc:
            await sleep_async(backoff.clock, backoff.after(exc, f"node {node!r}: "))
            continue
        except TransportError as exc:
            raise type(exc)(f"node {node!r}: {exc}") from None
        backoff.reset()
        log.info("node %s: run ended: %s", node, end.reason)
        if not persistent:
            return


def _node_handler(
    client_fn: ClientFn, mods: Sequence[Mod], node: str, state_dir: str | Path | None = None
) -> Callable[[Message], Message]:
    """``handle(task) -> reply`` for one node: its app (the compression and SecAgg+ mods
    first unless ``mods`` has them) and its own context, kept across tasks (and in
    ``state_dir``, when given, across restarts)."""
    from fedhive.compression.mod import with_compression_mod
    from fedhive.secagg.client import with_secagg_mod

    app = ClientApp(client_fn, with_compression_mod(with_secagg_mod(mods)))
    context = Context(node_id=node)
    saved = _StateFile(state_dir, node) if state_dir is not None else None
    if saved is not None:
        context.state = saved.load()
    unimplemented: set[str] = set()

    def handle(task: Message) -> Message:
        context.seed = task.metadata.seed
        try:
            reply = app(task, context)
        except Exception as exc:  # reported to the server; the traceback stays here
            _log_failure(task, exc, unimplemented)
            return task.error_reply(f"{type(exc).__name__}: {exc}")
        if saved is not None:
            saved.save(context.state)
        if not isinstance(reply, Message):
            return task.error_reply(f"a mod returned {type(reply).__name__}, not a Message")
        return reply

    return handle


class _StateFile:
    """A deployed client's persistent state (``Context.state``) in ``state_dir``: read
    at start, written atomically after every task (fedhive's record format, no pickle),
    so error-feedback residuals and the like survive a restart."""

    def __init__(self, directory: str | Path, node: str) -> None:
        self.path = Path(directory) / f"state-{node}.fhv"
        self._digest: bytes | None = None  # of what the file holds

    def load(self) -> RecordDict:
        from fedhive.common.serde import decode_record_dict

        if not self.path.exists():
            return RecordDict()
        try:
            data = self.path.read_bytes()
            state = decode_record_dict(bytearray(data))
        except (OSError, SerdeError) as exc:
            raise StateError(f"cannot load the client state {self.path}: {exc}") from exc
        self._digest = _digest(data)
        return state

    def save(self, state: RecordDict) -> None:
        from fedhive.common.atomic import SECRET_MODE, atomic_write_bytes
        from fedhive.common.serde import encode_record_dict

        data = encode_record_dict(state)
        digest = _digest(data)
        if digest == self._digest:  # an evaluation that changed nothing writes nothing
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the state may hold secrets (SecAgg+ keys) and what was learnt from local data
        atomic_write_bytes(self.path, data, mode=SECRET_MODE)
        self._digest = digest


def _digest(data: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).digest()


def node_id_in(state_dir: str | Path) -> str:
    """The node id kept in ``state_dir`` (made and stored on first use), so a restarted
    client is the same node and finds its state."""
    path = Path(state_dir) / "node_id"
    if path.exists():
        return path.read_text().strip()
    from fedhive.common.atomic import atomic_write_bytes

    node = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, node.encode())
    return node


def _log_failure(task: Message, exc: Exception, unimplemented: set[str]) -> None:
    """Log a task that raised, with its traceback; a method the client does not
    implement (``NotImplementedError``) is said once, in one line."""
    meta = task.metadata
    told = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NotImplementedError):
        if meta.message_type not in unimplemented:
            unimplemented.add(meta.message_type)
            log.warning(
                "%s: %s; the server counts each %s task as a failure",
                meta.message_type,
                told,
                meta.message_type,
            )
        return
    log.error(
        "%s of round %d failed; the server is told: %s",
        meta.message_type,
        meta.server_round,
        told,
        exc_info=exc,
    )


def _constant(client: Client | None) -> ClientFn:
    def client_fn(context: Context) -> Client:
        if client is None:
            raise ConfigError("no client given")
        return client

    return client_fn


class _Backoff:
    """Exponential backoff with jitter, capped at 30 s between tries, on ``clock``."""

    def __init__(
        self, max_retries: int | None, max_wait_time: float | None, clock: Clock | None = None
    ) -> None:
        self.max_retries = max_retries
        self.max_wait_time = max_wait_time
        self.clock = clock or SystemClock()
        self.attempts = 0
        self.started = self.clock.now()
        self._random = random.Random()

    def reset(self) -> None:
        self.attempts = 0
        self.started = self.clock.now()

    def after(self, failure: Exception, prefix: str = "") -> float:
        """Seconds to wait before the next try after ``failure``; :class:`TransportError`
        (``prefix`` + why) once the tries or the time are used up."""
        delay = self.next_delay()
        if delay is None:
            raise TransportError(
                f"{prefix}{failure}; giving up after {self.attempts} attempts"
            ) from None
        log.info("%s%s; retrying in %.1f s", prefix, failure, delay)
        return delay

    def next_delay(self) -> float | None:
        self.attempts += 1
        if self.max_retries is not None and self.attempts > self.max_retries:
            return None
        delay = min(30.0, 0.25 * 2 ** (self.attempts - 1)) * self._random.uniform(0.5, 1.0)
        if self.max_wait_time is not None:
            left = self.max_wait_time - (self.clock.now() - self.started)
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay
