"""The one exception tree of fedhive.

::

    FedhiveError
    ├── ConfigError            bad configuration (names the field, the value and what is allowed)
    ├── SerdeError             malformed bytes, unsupported dtypes, inconsistent headers
    ├── TransportError         a transport failed to deliver a message
    │   └── AuthenticationError  the server refused this client (unknown, bad token)
    ├── ProtocolError          a message for another run or round, or of an unexpected type
    ├── ClientFailure          one client failed one task (carries client id, round and stage)
    │   └── InvalidUpdate      a reply with NaN/Inf, a wrong shape or a non-numeric dtype
    ├── CheckpointError        a checkpoint could not be written or read back
    ├── StateError             per-client persistent state could not be stored or loaded
    ├── PrivacyBudgetExceeded  a run would spend more privacy budget than allowed
    └── MissingDependency      an optional extra is not installed (says what to install)

Every error is a subclass of :class:`FedhiveError`, so ``except fedhive.FedhiveError``
catches all failures that fedhive raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CheckpointError",
    "ClientFailure",
    "ConfigError",
    "FedhiveError",
    "InvalidUpdate",
    "MissingDependency",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "SerdeError",
    "StateError",
    "TransportError",
]


class FedhiveError(Exception):
    """Base class of every error fedhive raises on purpose."""


class ConfigError(FedhiveError, ValueError):
    """A configuration value is unknown or out of range."""


class SerdeError(FedhiveError, ValueError):
    """Bytes could not be decoded, or values could not be encoded."""


class TransportError(FedhiveError):
    """A message could not be delivered or its reply not received."""


class AuthenticationError(TransportError):
    """The server refused this client: not enrolled, wrong token or certificate."""


class ProtocolError(FedhiveError):
    """A message does not belong here: another run, another round, an unknown type."""


class ClientFailure(FedhiveError):
    """One client failed one task.

    Attributes say where: ``client_id``, ``server_round``, ``stage`` (``"fit"``,
    ``"evaluate"``, ...) and ``reason`` (a short human-readable cause).
    """

    def __init__(self, client_id: str, server_round: int, stage: str, reason: str) -> None:
        super().__init__(
            f"client {client_id!r} failed in round {server_round} at stage {stage!r}: {reason}"
        )
        self.client_id = client_id
        self.server_round = server_round
        self.stage = stage
        self.reason = reason


class InvalidUpdate(ClientFailure):
    """A client's reply cannot be aggregated (NaN/Inf, wrong shape, wrong dtype, ...)."""


class CheckpointError(FedhiveError):
    """A checkpoint could not be written, or a stored one is incomplete or corrupt."""


class StateError(FedhiveError):
    """Per-client persistent state could not be stored or loaded."""


class PrivacyBudgetExceeded(FedhiveError):
    """Continuing would spend more privacy budget than the configured limit."""


class MissingDependency(FedhiveError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'fedhive[{extra}]'"
        )
        self.module = module
        self.extra = extra
