"""Pieces shared by ``fedhive server`` and ``fedhive client``: the stderr console, file
reading with a clear error, the log level flag, and the data/model config they share
with ``fedhive run``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from fedhive.cli.config import ExperimentConfig, validate
from fedhive.common.errors import ConfigError

# gRPC's core logs (TLS handshake failures, ...) only when asked: GRPC_VERBOSITY=info.
# fedhive says what failed in its own words. Set before any channel or server exists.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

console = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message, for log files
log = logging.getLogger("fedhive")


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path``; a ConfigError naming ``what`` if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def set_log_level(level: str) -> None:
    """Set the ``fedhive`` logger from ``--log-level`` (ConfigError if unknown)."""
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {level!r}: choose debug, info, warning or error")
    log.setLevel(name)


def experiment_config(
    seed: int, data: dict[str, Any], model: dict[str, Any], num_clients: int, source: str
) -> ExperimentConfig:
    """The simulation's config for the data and model pieces shared with ``fedhive run``."""
    raw = {"seed": seed, "num_clients": num_clients, "data": data, "model": model}
    return validate(raw, source)
