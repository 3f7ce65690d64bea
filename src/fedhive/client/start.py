"""Flower-style entry points that connect a client to a server over gRPC."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from fedhive.client.app import ClientApp, ClientFn, Mod
from fedhive.client.client import Client
from fedhive.client.context import Context
from fedhive.client.numpy_client import NumPyClient
from fedhive.common.errors import ConfigError, TransportError
from fedhive.common.message import Message

__all__ = ["start_client", "start_numpy_client"]

log = logging.getLogger("fedhive.client")


def _security(
    insecure: bool | None,
    root_certificates: bytes | str | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    token: str,
) -> object:
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
) -> None:
    """Connect to a fedhive server and answer its tasks until the run ends.

    Flower 1.x's arguments keep their meaning: ``client`` (a ``Client``, e.g.
    ``MyNumPyClient().to_client()``) or ``client_fn``, ``root_certificates`` (PEM bytes or
    a file path; without them the connection is insecure, with a warning, as Flower's is),
    ``max_retries`` and ``max_wait_time`` for reconnecting with exponential backoff when
    the server is unreachable. fedhive adds ``node_id`` (default: random), ``auth_token``
    (the secret enrolled on the server), a client certificate for mutual TLS, client
    ``mods`` (e.g. a site policy), ``persistent`` (stay up and join the next run) and
    ``audit_log`` (a JSON-lines record of every message that leaves this site).
    The SecAgg+ client mod is put first unless ``mods`` has one: it only answers secure
    aggregation stages, so the client joins secure rounds when the server runs them.
    """
    if (client is None) == (client_fn is None):
        raise ConfigError("start_client needs exactly one of client= or client_fn=")
    if transport not in (None, "grpc-bidi", "grpc"):
        raise ConfigError(f"transport {transport!r} is not supported; use 'grpc'")
    from fedhive.transport.frames import DEFAULT_CHUNK_BYTES
    from fedhive.transport.grpc_client import AuditLog, ClientSession, Retryable

    security = _security(insecure, root_certificates, certificate_chain, private_key, auth_token)
    node = node_id or uuid.uuid4().hex
    from fedhive.secagg.client import with_secagg_mod

    app = ClientApp(
        client_fn if client_fn is not None else _constant(client), with_secagg_mod(mods)
    )
    context = Context(node_id=node)

    def handle(task: Message) -> Message:
        context.seed = task.metadata.seed
        return app.handle(task, context)

    session_args = dict(
        security=security,
        chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
        heartbeat_interval=heartbeat_interval,
        audit=AuditLog(audit_log) if audit_log is not None else None,
    )
    backoff = _Backoff(max_retries, max_wait_time)
    while True:
        session = ClientSession(server_address, node, handle, **session_args)  # type: ignore[arg-type]
        try:
            end = session.run()
        except Retryable as exc:
            delay = backoff.next_delay()
            if delay is None:
                raise TransportError(
                    f"{exc}; giving up after {backoff.attempts} attempts"
                ) from None
            log.info("%s; retrying in %.1f s", exc, delay)
            time.sleep(delay)
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


def _constant(client: Client | None) -> ClientFn:
    def client_fn(context: Context) -> Client:
        if client is None:
            raise ConfigError("no client given")
        return client

    return client_fn


class _Backoff:
    """Exponential backoff with jitter, capped at 30 s between tries."""

    def __init__(self, max_retries: int | None, max_wait_time: float | None) -> None:
        self.max_retries = max_retries
        self.max_wait_time = max_wait_time
        self.attempts = 0
        self.started = time.monotonic()
        self._random = random.Random()

    def reset(self) -> None:
        self.attempts = 0
        self.started = time.monotonic()

    def next_delay(self) -> float | None:
        self.attempts += 1
        if self.max_retries is not None and self.attempts > self.max_retries:
            return None
        delay = min(30.0, 0.25 * 2 ** (self.attempts - 1)) * self._random.uniform(0.5, 1.0)
        if self.max_wait_time is not None:
            left = self.max_wait_time - (time.monotonic() - self.started)
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay
