"""What every framework's local training for personalization shares: the SGD settings
read from a fit config, APFL's mixing of two models, and the :class:`Trainer` protocol
that :class:`fedhive.personalization.client.PersonalizedClient` trains through.

Implementations: :class:`fedhive.personalization.torch_methods.TorchTrainer` (torch
modules, every method) and :class:`fedhive.personalization.keras_client.KerasTrainer`
(Keras 3 models, every method but APFL).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedhive.common.errors import ConfigError
from fedhive.common.records import Config, NDArrays

__all__ = ["Info", "TrainSettings", "Trainer", "mix"]

#: What a local training loop reports: ``loss`` (mean over the samples seen) and
#: ``num_steps``.
Info = dict[str, float | int]


@dataclass(frozen=True)
class TrainSettings:
    """Local SGD settings, read from a fit config (``local_epochs``, ``batch_size``,
    ``lr``, ``momentum``; the defaults where a key is missing)."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> TrainSettings:
        try:
            return cls(
                epochs=int(config.get("local_epochs", cls.epochs)),
                batch_size=int(config.get("batch_size", cls.batch_size)),
                lr=float(config.get("lr", cls.lr)),
                momentum=float(config.get("momentum", cls.momentum)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad local training settings in the fit config: {exc}") from exc


def mix(alpha: float, personal: NDArrays, global_arrays: NDArrays) -> NDArrays:
    """APFL's personalised model ``alpha v + (1 - alpha) w``; non-float arrays (counters)
    are taken from ``w``."""
    out = []
    for v, w in zip(personal, global_arrays, strict=True):
        if np.asarray(w).dtype.kind != "f":
            out.append(np.array(w, copy=True))
            continue
        out.append((alpha * np.asarray(v) + (1.0 - alpha) * np.asarray(w)).astype(w.dtype))
    return out


class Trainer(Protocol):
    """Local training and evaluation of one framework's models, on plain arrays in the
    order of the model's weight list. ``methods`` are the personalization methods it
    can run; ``x``, ``y`` are array-likes of inputs and integer labels."""

    methods: frozenset[str]

    def weights(self, model: Any) -> NDArrays:
        """The model's current arrays."""
        ...

    def train(
        self,
        model: Any,
        arrays: NDArrays,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        epochs: int | None = None,
    ) -> tuple[NDArrays, Info]:
        """Load ``arrays`` and train every layer (``epochs``, default the settings')."""
        ...

    def train_fedrep(
        self,
        model: Any,
        arrays: NDArrays,
        head: Set[str],
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        head_epochs: int,
    ) -> tuple[NDArrays, Info]:
        """FedRep: ``head_epochs`` on the arrays named in ``head`` with the body frozen,
        then ``settings.epochs`` on the body with the head frozen."""
        ...

    def train_ditto(
        self,
        model: Any,
        personal: NDArrays,
        global_arrays: NDArrays,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        lam: float,
        epochs: int,
    ) -> NDArrays:
        """Ditto's personal solver; the new personal arrays."""
        ...

    def train_apfl(
        self,
        model: Any,
        local: NDArrays,
        personal: NDArrays,
        alpha: float,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        alpha_lr: float,
    ) -> tuple[NDArrays, NDArrays, float, Info]:
        """One APFL local update: ``(w, v, alpha, info)``."""
        ...

    def evaluate(self, model: Any, arrays: NDArrays, x: Any, y: Any) -> tuple[float, float]:
        """``(loss, accuracy)`` of the model with ``arrays`` on ``(x, y)``."""
        ...
