"""A site's own rules for what a federation may ask of it, enforced on the client.

A hospital (or any data holder) sets a :class:`SitePolicy`; :func:`policy_mod` turns it
into a client mod that every task passes through before the client sees it:

- a task whose config has a key outside ``allowed_config_keys`` is refused;
- a task that asks for more than ``max_local_epochs`` epochs (config key ``epochs_key``)
  is refused;
- metrics whose names are not in ``allowed_metrics`` are removed from fit and evaluate
  replies before they leave the site.

A refused task is answered with an error reply that says why, so the server's history
names the site and the reason; the client is never built for it. ``None`` for a limit
means "no limit". Custom stages (replies carrying a ``RecordDict``) pass through as they
are. Put the policy mod first in ``mods`` so that it sees each task first and each reply
last::

    policy = SitePolicy(
        allowed_config_keys=frozenset({"local_epochs", "batch_size", "lr"}),
        max_local_epochs=5,
        allowed_metrics=frozenset({"loss", "accuracy"}),
    )
    fl.client.start_client(..., mods=[policy_mod(policy), ...])

``fedhive client --policy policy.toml`` reads the same four fields from a TOML file
(:meth:`SitePolicy.from_file`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhive.client.app import Handler, Mod
from fedhive.client.context import Context
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message
from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetPropertiesIns,
    Scalar,
)

__all__ = ["SitePolicy", "policy_mod"]

log = logging.getLogger("fedhive.client")

_FIELDS = ("allowed_config_keys", "max_local_epochs", "epochs_key", "allowed_metrics")


def _names(value: Iterable[str] | None, what: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{what} must be a collection of names (or None), got {value!r}")
    names = frozenset(value)
    bad = sorted(repr(n) for n in names if not isinstance(n, str))
    if bad:
        raise ConfigError(f"{what} must hold str names, got {', '.join(bad)}")
    return names


@dataclass(frozen=True)
class SitePolicy:
    """What this site allows: config keys, local epochs, and metrics that may leave.

    ``allowed_config_keys``: the config keys a task may carry (``None``: any).
    ``max_local_epochs``: the most epochs a task may ask for under ``epochs_key``
    (``None``: no limit; a task without that key is not limited by the policy).
    ``allowed_metrics``: the metric names that fit/evaluate replies may carry (``None``:
    all); the others are removed before the reply leaves.
    """

    allowed_config_keys: frozenset[str] | None = None
    max_local_epochs: int | None = None
    epochs_key: str = "local_epochs"
    allowed_metrics: frozenset[str] | None = None

    def __post_init__(self) -> None:
        keys = _names(self.allowed_config_keys, "allowed_config_keys")
        object.__setattr__(self, "allowed_config_keys", keys)
        metrics = _names(self.allowed_metrics, "allowed_metrics")
        object.__setattr__(self, "allowed_metrics", metrics)
        epochs = self.max_local_epochs
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0
        ):
            raise ConfigError(f"max_local_epochs must be an int >= 0 or None, got {epochs!r}")
        if not isinstance(self.epochs_key, str) or not self.epochs_key:
            raise ConfigError(f"epochs_key must be a non-empty str, got {self.epochs_key!r}")

    # -- reading a policy file -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "policy") -> SitePolicy:
        """A policy from a plain mapping with (a subset of) the four field names."""
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"{source}: unknown key {key!r} (value {data[key]!r}); "
                f"allowed keys: {', '.join(_FIELDS)}"
            )
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> SitePolicy:
        """A policy from a TOML file, e.g.::

        allowed_config_keys = ["local_epochs", "batch_size", "lr", "momentum"]
        max_local_epochs = 5
        allowed_metrics = ["loss", "accuracy"]
        """
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy file {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, str(path))

    # -- the checks ----------------------------------------------------------------------------

    def refusal(self, config: Mapping[str, Scalar]) -> str | None:
        """Why a task with this config is refused, or ``None`` if it is allowed."""
        if self.allowed_config_keys is not None:
            extra = sorted(set(config) - self.allowed_config_keys)
            if extra:
                allowed = ", ".join(sorted(self.allowed_config_keys)) or "(none)"
                listed = ", ".join(repr(k) for k in extra)
                return f"config key(s) {listed} not allowed by this site (allowed: {allowed})"
        if self.max_local_epochs is not None and self.epochs_key in config:
            value = config[self.epochs_key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{self.epochs_key} = {value!r} is not a number of epochs"
            if math.isnan(value) or value > self.max_local_epochs:
                return (
                    f"{self.epochs_key} = {value!r} exceeds this site's maximum of "
                    f"{self.max_local_epochs}"
                )
        return None

    def allowed(self, metrics: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """The metrics that may leave this site."""
        if self.allowed_metrics is None:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in self.allowed_metrics}


def _task_config(message: Message) -> Mapping[str, Scalar] | None:
    content = message.content
    if isinstance(content, FitIns | EvaluateIns | GetParametersIns | GetPropertiesIns):
        return content.config
    return None


class PolicyMod:
    """The client mod of a :class:`SitePolicy` (picklable, so simulation workers take it)."""

    def __init__(self, policy: SitePolicy) -> None:
        if not isinstance(policy, SitePolicy):
            raise TypeError(f"policy_mod needs a SitePolicy, got {type(policy).__name__}")
        self.policy = policy

    def __call__(self, message: Message, context: Context, call_next: Handler) -> Message:
        config = _task_config(message)
        if config is not None:
            reason = self.policy.refusal(config)
            if reason is not None:
                log.warning(
                    "refused a %s task of round %d: %s",
                    message.metadata.message_type,
                    message.metadata.server_round,
                    reason,
                )
                return message.error_reply(f"refused by the site policy: {reason}")
        reply = call_next(message, context)
        return self._strip(reply)

    def _strip(self, reply: Message) -> Message:
        content = reply.content
        if reply.error is not None or not isinstance(content, FitRes | EvaluateRes):
            return reply
        kept = self.policy.allowed(content.metrics)
        if len(kept) == len(content.metrics):
            return reply
        dropped = sorted(set(content.metrics) - set(kept))
        log.info("site policy removed metric(s) %s from a reply", ", ".join(dropped))
        return Message(reply.metadata, dataclasses.replace(content, metrics=kept), reply.error)


def policy_mod(policy: SitePolicy) -> Mod:
    """A client mod that enforces ``policy`` on every task and reply (see the module doc)."""
    return PolicyMod(policy)
