"""The typed, frozen configuration of a personalization method.

One :class:`PersonalizationConfig` says which method runs and with which parameters; it
is built once (from Python, or from the ``[personalization]`` table of ``fedhive run``)
and checked at construction, so a bad value fails before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fedhive.common.errors import ConfigError

__all__ = ["METHODS", "PARTIAL_METHODS", "Method", "PersonalizationConfig"]

Method = Literal["none", "finetune", "fedper", "fedrep", "fedbn", "ditto", "apfl"]

#: Every method, by the name ``[personalization] method`` takes.
METHODS: tuple[str, ...] = ("none", "finetune", "fedper", "fedrep", "fedbn", "ditto", "apfl")
#: Methods whose personal part is a subset of the layers (the rest is shared).
PARTIAL_METHODS: frozenset[str] = frozenset({"fedper", "fedrep", "fedbn"})

#: Module types FedBN keeps local when ``personal_types`` is not given.
BATCH_NORM_TYPES: tuple[str, ...] = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "BatchNormalization",
)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"personalization.{name} must be an int >= {minimum}, got {value!r}")
    return value


def _real(name: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"personalization.{name} must be a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ConfigError(f"personalization.{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PersonalizationConfig:
    """Which personalization method runs, and its parameters.

    - ``method``: one of :data:`METHODS`. ``"none"`` is plain FedAvg, evaluated the same
      honest way (each client's model on its own test split).
    - ``personal_layers``: parameter name patterns of the layers that stay on the client
      (``"head"`` matches ``head.weight`` and ``head.bias``; shell wildcards such as
      ``"*.bn*"`` are allowed). ``personal_types``: module types whose parameters and
      buffers stay on the client (torch: ``"BatchNorm1d"``, ``"Linear"``; Keras:
      ``"BatchNormalization"``). FedPer and FedRep need one of them; FedBN defaults to
      the batch-norm types. Ditto, APFL and fine-tuning personalise the whole model and
      take neither.
    - ``lam``: Ditto's lambda (``inf`` makes the personal model the global one).
    - ``finetune_epochs``: local epochs of fine-tuning before evaluation (``finetune``).
    - ``finetune_head``, ``finetune_head_epochs``: fine-tuning in two stages (LP-FT,
      Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
      Out-of-Distribution"): first ``finetune_head_epochs`` on the layers matching the
      name patterns ``finetune_head`` (e.g. ``["head"]``) with the rest frozen, then
      ``finetune_epochs`` on every layer. Both or neither; ``finetune`` only.
    - ``head_epochs``: FedRep's epochs on the head (body frozen) before its body epochs.
    - ``personal_epochs``: Ditto's epochs on the personal model (default: the fit
      config's ``local_epochs``).
    - ``alpha``, ``alpha_lr``: APFL's initial mixing weight and its learning rate
      (``alpha_lr = 0`` keeps alpha fixed). The gradient of alpha is an inner product over
      every parameter, so its step must be small: at ``alpha_lr = 0.1`` alpha reached 0
      within one round on MNIST-1D, after which the personal model no longer learns.
    - ``eval_clients``: how many clients evaluate each round (``0``: all of them, also
      those never sampled for training).
    - ``test_fraction``: the share of each client's data held out as its test split.
    """

    method: Method = "none"
    personal_layers: tuple[str, ...] = ()
    personal_types: tuple[str, ...] = ()
    lam: float = 1.0
    finetune_epochs: int = 1
    finetune_head: tuple[str, ...] = ()
    finetune_head_epochs: int = 0
    head_epochs: int = 2
    personal_epochs: int | None = None
    alpha: float = 0.5
    alpha_lr: float = 0.001
    eval_clients: int = 0
    test_fraction: float = 0.2
    #: Where the chosen layers come from when not given: filled in by the method.
    _types: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"personalization.method = {self.method!r} is not known; use one of "
                + ", ".join(repr(m) for m in METHODS)
            )
        for name in ("personal_layers", "personal_types", "finetune_head"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(
                    f"personalization.{name} must be a list of non-empty strings, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        chosen = self.personal_layers or self.personal_types
        if self.method in ("fedper", "fedrep") and not chosen:
            raise ConfigError(
                f"personalization.method = {self.method!r} needs personal layers: set "
                'personal_layers (name patterns, e.g. ["head"]) or personal_types '
                "(module types); without them it would silently be FedAvg"
            )
        if self.method not in PARTIAL_METHODS and chosen:
            raise ConfigError(
                f"personalization.method = {self.method!r} personalises the whole model; "
                "personal_layers and personal_types apply to fedper, fedrep and fedbn only"
            )
        types = self.personal_types
        if self.method == "fedbn" and not chosen:
            types = BATCH_NORM_TYPES
        object.__setattr__(self, "_types", types)
        _real("lam", self.lam, low=0.0)
        _count("finetune_epochs", self.finetune_epochs, 0)
        _count("finetune_head_epochs", self.finetune_head_epochs, 0)
        if (self.finetune_head or self.finetune_head_epochs) and self.method != "finetune":
            raise ConfigError(
                "personalization.finetune_head and finetune_head_epochs apply to method "
                f"'finetune' only, not {self.method!r}"
            )
        if bool(self.finetune_head) != bool(self.finetune_head_epochs):
            raise ConfigError(
                "personalization.finetune_head (name patterns of the head) and "
                "finetune_head_epochs (> 0) go together: set both for a head-first "
                "fine-tuning, or neither"
            )
        _count("head_epochs", self.head_epochs, 0)
        if self.personal_epochs is not None:
            _count("personal_epochs", self.personal_epochs, 0)
        _real("alpha", self.alpha, low=0.0, high=1.0)
        _real("alpha_lr", self.alpha_lr, low=0.0)
        _count("eval_clients", self.eval_clients, 0)
        _real("test_fraction", self.test_fraction, low=0.0, high=0.9)
        if not self.test_fraction > 0:
            raise ConfigError(
                "personalization.test_fraction must be > 0: every client needs a test split"
            )

    @property
    def partial(self) -> bool:
        """Whether only some layers are personal (the others are shared)."""
        return self.method in PARTIAL_METHODS

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The module types selected (FedBN's batch-norm types unless others are given)."""
        return self._types
