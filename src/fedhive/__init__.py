"""fedhive: federated learning for Python.

``import fedhive as fl`` gives the Flower 1.x layout: ``fl.client.NumPyClient``,
``fl.server.strategy.FedAvg``, ``fl.server.ServerConfig``,
``fl.simulation.start_simulation``, ``fl.common.ndarrays_to_parameters``. Subpackages are
imported on first use, and nothing heavy (torch, matplotlib) is imported here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedhive.common.errors import (
    AuthenticationError,
    CheckpointError,
    ClientFailure,
    ConfigError,
    FedhiveError,
    InvalidUpdate,
    MissingDependency,
    PrivacyBudgetExceeded,
    ProtocolError,
    SerdeError,
    StateError,
    TransportError,
)

__version__ = "0.1.0"

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
    "__version__",
    "client",
    "common",
    "compression",
    "data",
    "models",
    "privacy",
    "secagg",
    "server",
    "simulation",
    "testing",
    "transport",
]

_SUBPACKAGES = frozenset(
    {
        "client",
        "common",
        "compression",
        "data",
        "models",
        "privacy",
        "secagg",
        "server",
        "simulation",
        "testing",
        "transport",
    }
)

if TYPE_CHECKING:
    from fedhive import (
        client,
        common,
        compression,
        data,
        models,
        privacy,
        secagg,
        server,
        simulation,
        testing,
        transport,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fedhive.{name}")
    raise AttributeError(f"module 'fedhive' has no attribute {name!r}")
