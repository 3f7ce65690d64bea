"""Which model arrays are personal: chosen by parameter name patterns or module type.

The arrays of a model are those of its weight list: a torch module's ``state_dict``
(parameters and buffers, as :func:`fedhive.models.torch_models.get_weights` returns
them) or a Keras model's ``weights`` (``get_weights()``). A selection names some of
them personal; the others are shared and are the only ones that leave the client.

A selection that matches no array, one that matches every array, or a pattern that
matches nothing is an error: asking for ``"bn"`` in a model whose batch-norm layers are
called ``features.1`` would otherwise silently give FedAvg.

Example::

    from fedhive.models.torch_models import CNN1D
    from fedhive.personalization import select_personal

    split = select_personal(CNN1D(seed=0), names=["head"])
    split.personal  # the indices of head.weight and head.bias
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArray, NDArrays

__all__ = ["SharedSplit", "keras_weight_names", "select_personal", "torch_weight_names"]


@dataclass(frozen=True)
class SharedSplit:
    """A model of ``num_arrays`` arrays cut into personal ones and shared ones.

    ``names`` are the arrays' names, in order; ``personal`` the indices that stay on
    the client (sorted). :meth:`shared` is what is uploaded, :meth:`merge` puts the
    model back together.
    """

    names: tuple[str, ...]
    personal: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if any(not 0 <= i < n for i in self.personal) or list(self.personal) != sorted(
            set(self.personal)
        ):
            raise ConfigError(
                f"personal indices must be distinct and in [0, {n}), got {self.personal}"
            )

    @classmethod
    def whole(cls, names: Sequence[str]) -> SharedSplit:
        """Nothing personal: every array is shared."""
        return cls(tuple(names), ())

    @property
    def num_arrays(self) -> int:
        return len(self.names)

    @property
    def shared_indices(self) -> tuple[int, ...]:
        mine = set(self.personal)
        return tuple(i for i in range(self.num_arrays) if i not in mine)

    @property
    def personal_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.personal)

    def shared(self, arrays: Sequence[NDArray]) -> NDArrays:
        """The shared arrays of a full model (what leaves the client)."""
        self._check_full(arrays)
        return [arrays[i] for i in self.shared_indices]

    def personal_part(self, arrays: Sequence[NDArray]) -> NDArrays:
        """The personal arrays of a full model (what stays on the client)."""
        self._check_full(arrays)
        return [arrays[i] for i in self.personal]

    def merge(self, shared: Sequence[NDArray], personal: Sequence[NDArray]) -> NDArrays:
        """The full model from its shared and personal arrays."""
        if len(shared) != len(self.shared_indices) or len(personal) != len(self.personal):
            raise ConfigError(
                f"this model shares {len(self.shared_indices)} arrays and keeps "
                f"{len(self.personal)} personal ones; got {len(shared)} shared and "
                f"{len(personal)} personal arrays (do server and client select the same "
                "personal layers?)"
            )
        out: list[NDArray | None] = [None] * self.num_arrays
        for i, arr in zip(self.shared_indices, shared, strict=True):
            out[i] = arr
        for i, arr in zip(self.personal, personal, strict=True):
            out[i] = arr
        return [np.asarray(a) for a in out]

    def _check_full(self, arrays: Sequence[NDArray]) -> None:
        if len(arrays) != self.num_arrays:
            raise ConfigError(
                f"expected the full model of {self.num_arrays} arrays, got {len(arrays)}"
            )


def torch_weight_names(model: Any) -> list[tuple[str, str]]:
    """``(state_dict key, owning module type)`` of each array of a torch module."""
    owners: dict[str, str] = {}
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        for name, _ in module.named_parameters(prefix=prefix, recurse=False):
            owners[name] = kind
        for name, _ in module.named_buffers(prefix=prefix, recurse=False):
            owners[name] = kind
    return [(key, owners.get(key, "")) for key in model.state_dict()]


def keras_weight_names(model: Any) -> list[tuple[str, str]]:
    """``(weight path, owning layer type)`` of each array of a Keras model, in the
    order of ``model.get_weights()``."""
    owners: dict[int, str] = {}
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        for weight in layer.weights:
            owners.setdefault(id(weight), type(layer).__name__)
    return [(str(getattr(w, "path", None) or w.name), owners.get(id(w), "")) for w in model.weights]


def _weight_names(model: Any) -> list[tuple[str, str]]:
    # Keras first: with its torch backend a Keras model is a torch module too.
    if hasattr(model, "get_weights") and hasattr(model, "weights") and hasattr(model, "layers"):
        return keras_weight_names(model)
    if hasattr(model, "state_dict") and hasattr(model, "named_modules"):
        return torch_weight_names(model)
    raise ConfigError(
        f"cannot select layers of a {type(model).__name__}: expected a torch module "
        "or a Keras model"
    )


def _matches(key: str, pattern: str) -> bool:
    return (
        key == pattern
        or key.startswith(pattern + ".")
        or key.startswith(pattern + "/")
        or (fnmatch.fnmatchcase(key, pattern))
    )


def select_personal(
    model: Any,
    *,
    names: Iterable[str] = (),
    types: Iterable[str] = (),
    every_type: bool = True,
) -> SharedSplit:
    """The :class:`SharedSplit` of ``model`` (a torch module or a Keras model) whose
    personal arrays match a name pattern in ``names`` or belong to a module (layer) whose
    type is in ``types``.

    A pattern matches an array name exactly, as a prefix up to a ``.`` or ``/`` (``"head"``
    matches ``head.weight``), or as a shell wildcard (``"*.bias"``). Each pattern and each
    type must match something; with ``every_type=False`` it is enough that one of the
    types does (FedBN's default list of batch-norm types).

    Raises:
        ConfigError: no selector given, a pattern or type that matches nothing, or a
            selection of no array or of every array.
    """
    patterns, kinds = list(names), list(types)
    weights = _weight_names(model)
    keys = [k for k, _ in weights]
    if not patterns and not kinds:
        raise ConfigError("no personal layers selected: give name patterns or module types")
    chosen: set[int] = set()
    for pattern in patterns:
        hit = {i for i, key in enumerate(keys) if _matches(key, pattern)}
        if not hit:
            raise ConfigError(
                f"personal layer pattern {pattern!r} matches no parameter of the model; "
                f"its parameters are {_preview(keys)}"
            )
        chosen |= hit
    present = sorted({owner for _, owner in weights if owner})
    by_type: set[int] = set()
    for kind in kinds:
        hit = {i for i, (_, owner) in enumerate(weights) if owner == kind}
        if not hit and every_type:
            raise ConfigError(
                f"personal layer type {kind!r} matches no layer of the model; its layers "
                f"with weights are of types {present}"
            )
        by_type |= hit
    if kinds and not by_type:
        raise ConfigError(
            f"none of the personal layer types {kinds} matches a layer of the model; its "
            f"layers with weights are of types {present}"
        )
    chosen |= by_type
    if len(chosen) == len(keys):
        raise ConfigError(
            f"the personal layer selection (names {patterns}, types {kinds}) matches every "
            "parameter of the model, so nothing would be shared; select fewer layers, or "
            "use a method that personalises the whole model (ditto, apfl, finetune)"
        )
    return SharedSplit(tuple(keys), tuple(sorted(chosen)))


def _preview(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
