"""A registry of config models by ``name``: the one behind ``[strategy]`` and ``[policy]``.

Each registered model is a pydantic model whose ``name`` is a ``Literal`` with itself as
default (the table's ``name``) and whose class attribute ``builds`` names what it builds
(``strategy_class``, ``policy_class``). :mod:`fedhive.cli.strategies` and
:mod:`fedhive.cli.policies` each keep one :class:`Registry` and name its methods
(``register_strategy``, ``register_policy``, ...).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from fedhive.common.errors import ConfigError

__all__ = ["Registry"]

M = TypeVar("M", bound=BaseModel)


class Registry(Mapping[str, type[M]], Generic[M]):
    """name -> model, in registration order, for the ``[kind]`` table.

    ``kind`` is the table's word (``"strategy"``), ``builds`` the class attribute that
    names the class a model builds (``"strategy_class"``), ``argument`` the word for the
    model's fields (``"parameter"``) and ``example`` a field with an example, as the
    refusal of a required field without one shows it.
    """

    def __init__(self, kind: str, builds: str, *, argument: str, example: str) -> None:
        self.kind = kind
        self.builds = builds
        self.argument = argument
        self.example = example
        self._models: dict[str, type[M]] = {}

    def __getitem__(self, name: str) -> type[M]:
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._models))

    def __len__(self) -> int:
        return len(self._models)

    def register(self, model: type[M]) -> None:
        """Register ``model`` under its ``name`` (ConfigError if it is not complete, or
        if another model has the name)."""
        field = model.model_fields["name"]
        name = field.default
        if (
            typing.get_args(field.annotation) != (name,)
            or typing.get_origin(field.annotation) is not Literal
        ):
            raise ConfigError(
                f"{model.__name__}.name must be a Literal with itself as default, e.g. "
                f'name: Literal["foo"] = "foo"; got {field.annotation!r} = {name!r}'
            )
        if getattr(model, self.builds) is None:
            raise ConfigError(f"{model.__name__} must set {self.builds} (the class it builds)")
        if name in self._models and self._models[name] is not model:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered by {self._models[name].__name__}; "
                f"unregister_{self.kind} it first"
            )
        missing = [k for k, f in model.model_fields.items() if f.is_required() and not f.examples]
        if missing:
            raise ConfigError(
                f"{model.__name__}: required {self.argument}s need an example, e.g. "
                f"{self.example}: {', '.join(missing)}"
            )
        self._models[name] = model

    def unregister(self, name: str) -> None:
        """Remove ``name`` (KeyError if it is not there)."""
        del self._models[name]

    def model(self, name: str) -> type[M]:
        """The model registered as ``name``; ConfigError naming the known ones otherwise."""
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(self._models)
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def model_of(self, base: type[BaseModel], table: Mapping[str, Any]) -> type[M]:
        """The model of ``table``'s ``name`` (``base``'s default without one), for ``base``
        to dispatch to; pydantic's literal error naming the registered ones otherwise."""
        name = table.get("name", base.model_fields["name"].default)
        model = self._models.get(name) if isinstance(name, str) else None
        if model is None:
            expected = ", ".join(repr(n) for n in self._models)
            raise ValidationError.from_exception_data(
                base.__name__,
                [
                    InitErrorDetails(
                        type="literal_error", loc=("name",), input=name, ctx={"expected": expected}
                    )
                ],
            )
        return model

    def missing(
        self, model: type[M], table: Mapping[str, Any], error_type: str
    ) -> list[InitErrorDetails]:
        """An error (of ``error_type``) for each required field of ``model`` that
        ``table`` lacks, with the field's example."""
        return [
            InitErrorDetails(
                type=PydanticCustomError(
                    error_type,
                    f"{self.kind} '{{name}}' needs {{key}} (e.g. {{key}} = {{example}} under "
                    f"[{self.kind}])",
                    {
                        "field": key,
                        "name": str(model.model_fields["name"].default),
                        "key": key,
                        "example": (field.examples or ["..."])[0],
                    },
                ),
                input=table,
            )
            for key, field in model.model_fields.items()
            if field.is_required() and key not in table
        ]
