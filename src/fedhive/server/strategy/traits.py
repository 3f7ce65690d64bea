"""What a strategy can be combined with, declared once as a frozen value.

Every strategy has ``traits`` (a :class:`StrategyTraits`). Wrappers pass them on or
transform them (a DP wrapper's aggregate is still a weighted mean; a strategy that
requires a client mod says so). Differential privacy, secure aggregation, compression,
the CLI and the engine ask the traits, never class names or ``getattr`` flags.

The fields:

- ``weighted_mean``: the aggregate of a round is the weighted mean of the clients'
  model arrays (optionally followed by a server optimizer on ``mean - x``). Secure
  aggregation (which reveals only the mean), linear codecs (decode of a sum is the sum
  of decodes) and central DP (one client moves the mean by at most ``C / m``) need it.
- ``individual_updates``: the aggregate needs every update on its own (median, Krum,
  trimmed mean, a user's ``aggregate_fit`` over the full list: O(clients x model); a DP
  wrapper that clips each update on the server, which streams). A mean that arrives
  whole (secure aggregation) cannot feed it.
- ``required_mods``: client mods the strategy cannot work without (SCAFFOLD's
  ``scaffold_mod``). Simulations put them in the client stack; deployed clients must.
- ``layout``: the update record a fit reply must carry (:class:`UpdateLayout`): the
  model arrays (all of them, or only some layers) and named extra records.
- ``tolerates_staleness``: results trained on an older model version may be folded
  (asynchronous aggregation).
- ``weighting``: how a weighted mean weighs each update: by its ``"num_examples"``, or
  ``"uniform"`` (the DP wrappers: a client could otherwise claim a large count). Secure
  aggregation tells the clients which.

Who declares what: FedAvg and every composed strategy with the mean rule (FedProx,
FedAvgM, FedAdam, FedYogi, FedAdagrad) have :data:`MEAN_TRAITS`; a server optimizer
after the mean is post-processing and changes nothing. The robust rules (median, trimmed
mean, Krum, Bulyan) need individual updates; FedNova and q-FedAvg stream but reweight
each update, so their aggregate is not a weighted mean; SCAFFOLD streams, requires
``scaffold_mod`` and carries its control variates as the extra record ``"scaffold"``.
A composed strategy takes its rule's traits. The DP wrappers pass their inner
strategy's traits on, with ``weighting="uniform"``; those that clip on the server also
need individual updates.

Flags that predate traits are still honoured by :func:`traits_of` (kept for
compatibility, see :func:`legacy_traits`): ``secure_aggregation_compatible = True``
declares a weighted mean, ``dp_compatible = False`` takes it away.

Example::

    from fedhive.server.strategy import FedAvg, Krum

    FedAvg().traits.weighted_mean  # True: secure aggregation and central DP apply
    Krum().traits.individual_updates  # True: it needs each update on its own
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fedhive.common.errors import ConfigError

__all__ = [
    "MEAN_TRAITS",
    "ExtraRecord",
    "StrategyTraits",
    "UpdateLayout",
    "legacy_traits",
    "traits_of",
]


@dataclass(frozen=True)
class ExtraRecord:
    """A named record a fit reply carries beside the model arrays (``FitRes.extras``).

    ``kind`` says which group of the :class:`~fedhive.common.records.RecordDict` holds
    it. ``like_model``: an array record with exactly the model's layout (count, shapes;
    finite values), checked like the model itself (SCAFFOLD's control-variate delta).
    ``required``: a reply without it is refused.
    """

    name: str
    kind: Literal["arrays", "config", "metrics"] = "arrays"
    like_model: bool = False
    required: bool = True


@dataclass(frozen=True)
class UpdateLayout:
    """The layout of the update record a strategy expects in each fit reply.

    ``model``: ``"full"`` (every model array, the global model's shapes and a numeric
    dtype), ``"partial"`` (a subset of the layers, named in the reply; personal layers
    stay home) or ``"none"`` (everything travels in extras, e.g. an encoded payload).
    ``extras``: the named records it carries.
    """

    model: Literal["full", "partial", "none"] = "full"
    extras: tuple[ExtraRecord, ...] = ()

    def __post_init__(self) -> None:
        names = [extra.name for extra in self.extras]
        if len(set(names)) != len(names):
            raise ConfigError(f"extra record names must be unique, got {names}")

    def extra(self, name: str) -> ExtraRecord | None:
        """The declared extra record ``name``, or ``None``."""
        return next((extra for extra in self.extras if extra.name == name), None)


@dataclass(frozen=True)
class StrategyTraits:
    """What a strategy is, for everything that combines with it (see the module docstring).

    ``reason`` says in words why a combination is refused (shown in errors), e.g. "its
    aggregate is a coordinate-wise median".
    """

    weighted_mean: bool = False
    individual_updates: bool = True
    required_mods: tuple[Callable[..., Any], ...] = ()
    layout: UpdateLayout = field(default_factory=UpdateLayout)
    tolerates_staleness: bool = False
    reason: str = ""
    weighting: Literal["num_examples", "uniform"] = "num_examples"

    def __post_init__(self) -> None:
        if self.weighting not in ("num_examples", "uniform"):
            raise ConfigError(
                f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}"
            )

    def but(self, **changes: Any) -> StrategyTraits:
        """A copy with ``changes`` (what a wrapper uses to transform the traits it passes on)."""
        return replace(self, **changes)

    def why_not_mean(self) -> str:
        """What an error says when a weighted mean is needed: ``reason``, or a generic one."""
        return self.reason or "its traits do not declare its aggregate a weighted mean"


#: The traits of a plain weighted mean of the models (FedAvg and its composed relatives).
#: A mean folds results trained on older model versions like any other (the buffered
#: asynchronous policy runs it), so it tolerates staleness.
MEAN_TRAITS = StrategyTraits(weighted_mean=True, individual_updates=False, tolerates_staleness=True)


def legacy_traits(part: object, traits: StrategyTraits) -> StrategyTraits:
    """``traits`` with the flags that predate traits applied (kept for compatibility).

    ``secure_aggregation_compatible = True`` on ``part`` (a strategy or an aggregation
    rule) declares its aggregate a weighted mean; ``dp_compatible = False`` declares it
    not one (the flag said one client may move the aggregate by more than ``C / m``).
    New code declares ``traits`` instead.
    """
    if getattr(part, "secure_aggregation_compatible", None) is True:
        traits = traits.but(weighted_mean=True, individual_updates=False)
    if getattr(part, "dp_compatible", True) is False:
        traits = traits.but(
            weighted_mean=False, reason=f"{type(part).__name__} sets dp_compatible = False"
        )
    return traits


def traits_of(strategy: object) -> StrategyTraits:
    """The traits ``strategy`` declares (with :func:`legacy_traits` applied); a clear
    error if it is not a strategy. What combines with strategies asks this."""
    traits = getattr(type(strategy), "traits", None)
    value = getattr(strategy, "traits", None) if traits is not None else None
    if not isinstance(value, StrategyTraits):
        raise ConfigError(
            f"{type(strategy).__name__} declares no StrategyTraits; subclass "
            "fedhive.server.strategy.Strategy (its default traits are those of a buffering "
            "strategy)"
        )
    return legacy_traits(strategy, value)
