"""The ``[policy]`` table: how the engine turns replies into model versions.

A run policy (:mod:`fedhive.server.policy`) is known to the CLI by one class: a
:class:`PolicyConfig` subclass whose ``name`` is a ``Literal`` (the table's ``name``),
whose fields are the policy's arguments, and whose ``policy_class`` is the
:class:`~fedhive.server.policy.RunPolicy` it builds. :func:`register_policy` puts it in
the registry, which ``fedhive run`` and ``fedhive server`` both read::

    [policy]
    name = "buffered-async"   # or "sync", the default (no other keys)
    buffer_size = 10          # results per model version
    concurrency = 20          # clients training at once
    max_staleness = 5         # optional: refuse results older than 5 versions
    checkpoint_every = 2      # optional: also checkpoint every 2 results inside a buffer

Under every policy ``rounds`` counts model versions. Adding a policy::

    @register_policy
    class FooConfig(PolicyConfig):
        name: Literal["foo"] = "foo"
        policy_class = Foo
        synchronous = False
        bar: int = Field(ge=1, strict=True, examples=[4], description="the bar")

A required argument is a field without a default and with an example, which the error
for a table without it shows.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fedhive.cli.registry import Registry
from fedhive.common.errors import ConfigError
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.policy import RunPolicy, SyncRounds

__all__ = [
    "BufferedAsyncConfig",
    "PolicyConfig",
    "SyncConfig",
    "policy_model",
    "register_policy",
    "registered_policies",
    "unregister_policy",
]

#: name -> the model of its ``[policy]`` table.
_REGISTRY: Registry[PolicyConfig] = Registry(
    "policy", "policy_class", argument="argument", example="Field(ge=1, examples=[10])"
)


class PolicyConfig(BaseModel):
    """``[policy]``: which run policy, and its arguments.

    The base of every registered policy's model. Validating it (``model_validate``, or
    as the type of a config field) gives the model that ``name`` registers (default
    ``"sync"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: What :meth:`build` constructs; ``None`` on the base, which dispatches by ``name``.
    policy_class: ClassVar[type[RunPolicy] | None] = None
    #: Whether the policy runs synchronous rounds, which secure aggregation needs.
    synchronous: ClassVar[bool] = True

    name: str = "sync"

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Callable[[Any], Self]) -> Self:
        # The base picks the registered model of the table's name (a union by ``name``
        # that stays open to policies registered later).
        if cls.policy_class is not None or isinstance(data, cls):
            return handler(data)
        if not isinstance(data, dict):
            return handler(data)  # pydantic's "a valid dictionary" error
        return typing.cast(Self, _REGISTRY.model_of(cls, data).model_validate(data))

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        # Unknown keys name the keys this policy takes (and which policy takes the key);
        # a missing required one shows an example. Pydantic's own errors say neither.
        if cls.policy_class is None or not isinstance(data, dict):
            return data
        errors: list[InitErrorDetails] = []
        allowed = ", ".join(cls.model_fields)
        for key, value in data.items():
            if key in cls.model_fields:
                continue
            owners = [repr(n) for n, m in _REGISTRY.items() if key in m.model_fields]
            hint = f"; {key} belongs to policy {', '.join(owners)}" if owners else ""
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "unknown_key",
                        "allowed keys of policy '{name}': {allowed}{hint}",
                        {"name": cls.registered_name(), "allowed": allowed, "hint": hint},
                    ),
                    loc=(key,),
                    input=value,
                )
            )
        errors += _REGISTRY.missing(cls, data, "config_parameter")
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @classmethod
    def registered_name(cls) -> str:
        """The ``name`` this model is registered under (its ``Literal`` default)."""
        return str(cls.model_fields["name"].default)

    def parameters(self) -> dict[str, Any]:
        """The policy's arguments that are set, as keyword arguments."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}

    def build(self) -> RunPolicy:
        """A new policy (policies keep run state: one per run)."""
        if self.policy_class is None:  # pragma: no cover - the base is never constructed
            raise ConfigError(f"{type(self).__name__} builds no policy")
        return self.policy_class(**self.parameters())

    def results_per_version(self) -> int | None:
        """The results each model version aggregates, where the policy fixes it
        (``None``: the strategy's sampling decides, as in synchronous rounds)."""
        return None

    def clients_training(self) -> int | None:
        """The clients the policy keeps training at once, where it fixes that (its
        ``concurrency``); ``None``: the strategy's sampling decides."""
        return None

    def describe(self) -> str:
        """``"buffered-async (buffer_size = 10, concurrency = 20)"``."""
        params = self.parameters()
        if not params:
            return self.name
        return f"{self.name} (" + ", ".join(f"{k} = {v!r}" for k, v in params.items()) + ")"


M = TypeVar("M", bound=PolicyConfig)


def register_policy(model: type[M]) -> type[M]:
    """Register ``model`` under its ``name``; usable as a class decorator.

    ``model`` names its ``policy_class``, has a ``Literal`` name of its own, and gives an
    example for each required argument (shown when one is missing).
    """
    _REGISTRY.register(model)
    return model


def unregister_policy(name: str) -> None:
    """Remove the policy ``name`` from the registry (KeyError if it is not there)."""
    _REGISTRY.unregister(name)


def registered_policies() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def policy_model(name: str) -> type[PolicyConfig]:
    """The model registered as ``name``; ConfigError naming the known ones otherwise."""
    return _REGISTRY.model(name)


# -- the registry ----------------------------------------------------------------------


@register_policy
class SyncConfig(PolicyConfig):
    """Flower's synchronous rounds (the default): no arguments."""

    name: Literal["sync"] = "sync"
    policy_class = SyncRounds


@register_policy
class BufferedAsyncConfig(PolicyConfig):
    """Buffered asynchronous aggregation, FedBuff's shape (Nguyen et al. 2022): a model
    version every ``buffer_size`` results, ``concurrency`` clients training at once."""

    name: Literal["buffered-async"] = "buffered-async"
    policy_class = BufferedAsync
    synchronous = False

    # strict: TOML and --set give typed values, and true must not count as 1
    buffer_size: int = Field(
        ge=1, strict=True, examples=[10], description="results per model version (K)"
    )
    concurrency: int = Field(ge=1, strict=True, examples=[20], description="clients training")
    max_staleness: int | None = Field(
        None, ge=0, strict=True, description="refuse results older than this many versions"
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="also checkpoint every this many results inside a buffer (a strategy "
        "that keeps its open buffer in its state)",
    )

    def results_per_version(self) -> int | None:
        return self.buffer_size

    def clients_training(self) -> int | None:
        return self.concurrency
