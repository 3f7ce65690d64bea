"""The ``[strategy]`` table: one typed model per strategy, all in one registry.

A strategy is known to the CLI by one class: a :class:`StrategyConfig` subclass whose
``name`` is a ``Literal`` (the table's ``name``), whose fields are the strategy's own
parameters under the argument names of its ``fedhive.server.strategy`` class (Flower's),
and whose :meth:`~StrategyConfig.build` returns the strategy. :func:`register_strategy`
puts it in the registry; everything else is read from there: the names ``fedhive run``
and ``fedhive server`` accept, :data:`~fedhive.cli.config.STRATEGY_PARAMETERS`, the
minimum results per round (:meth:`~StrategyConfig.min_results`), which strategies can run
with secure aggregation and which client mods they need (from the built strategy's
``traits``).

The table is a union discriminated by ``name``: validating ``StrategyConfig`` (or a base
such as the server's ``DeployStrategyConfig``) picks the registered model of that name,
so a strategy registered later, by a plugin or a test, is accepted without rebuilding
anything. Adding a strategy::

    @register_strategy
    class FedFooConfig(StrategyConfig):
        name: Literal["fedfoo"] = "fedfoo"
        strategy_class = FedFoo
        foo: float | None = Field(None, gt=0, description="FedFoo: the foo")

Unset (``None``) parameters keep the class defaults. A parameter the class requires is a
field without a default and with an example (``Field(ge=0, examples=[0.01])``), which
the error for a table without it shows.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fedhive.cli.registry import Registry
from fedhive.common.errors import ConfigError
from fedhive.common.records import Config, ndarrays_to_parameters
from fedhive.server.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAsync,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Scaffold,
    Strategy,
)
from fedhive.server.strategy.traits import StrategyTraits, traits_of

__all__ = [
    "BulyanConfig",
    "FedAdagradConfig",
    "FedAdamConfig",
    "FedAsyncConfig",
    "FedAvgConfig",
    "FedBuffConfig",
    "FedAvgMConfig",
    "FedMedianConfig",
    "FedNovaConfig",
    "FedProxConfig",
    "FedTrimmedAvgConfig",
    "FedYogiConfig",
    "KrumConfig",
    "MultiKrumConfig",
    "QFedAvgConfig",
    "RegistryView",
    "RoundNeed",
    "ScaffoldConfig",
    "StrategyConfig",
    "register_strategy",
    "registered_strategies",
    "required_client_mods",
    "strategy_model",
    "unregister_strategy",
    "weighted_mean_strategies",
]

#: name -> the model of its ``[strategy]`` table.
_REGISTRY: Registry[StrategyConfig] = Registry(
    "strategy", "strategy_class", argument="parameter", example="Field(..., examples=[0.01])"
)

#: Flower arguments the CLI refuses, with the reason.
_REFUSED: dict[str, str] = {
    "eta_l": "the clients' learning rate is train.lr (Flower's eta_l is only recorded)",
}


@dataclass(frozen=True)
class RoundNeed:
    """How many results per round a rule needs: ``need``, the ``rule`` in words (shown
    in errors) and the ``key`` whose value sets it."""

    need: int
    rule: str
    key: str


class StrategyConfig(BaseModel):
    """``[strategy]``: which strategy, FedAvg's sampling keys, and the strategy's parameters.

    The base of every registered strategy's model. Validating it (``model_validate``, or
    as the type of a config field) gives the model that ``name`` registers (default
    ``"fedavg"``); it is not constructed itself. Two defaults differ from the classes' so
    that the server and the CLI's clients agree: q-FedAvg's ``qffl_learning_rate``
    defaults to ``train.lr`` and FedNova's ``local_momentum`` to ``train.momentum``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The keys every strategy's table takes beside its own parameters.
    sampling_keys: ClassVar[tuple[str, ...]] = (
        "name",
        "fraction_fit",
        "fraction_evaluate",
        "min_fit_clients",
        "min_evaluate_clients",
        "centralized_eval",
        "deadline_s",
        "over_selection",
        "partial_work",
    )
    #: What :meth:`build` constructs; ``None`` on the bases that dispatch by ``name``.
    strategy_class: ClassVar[type[Strategy] | None] = None

    name: str = "fedavg"
    fraction_fit: float = Field(0.1, ge=0, le=1)
    fraction_evaluate: float = Field(0.05, ge=0, le=1)
    min_fit_clients: int = Field(2, ge=0)
    min_evaluate_clients: int = Field(2, ge=0)
    centralized_eval: bool = True
    # synchronous rounds for stragglers (fedhive.server.deadline.DeadlineRounds)
    deadline_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="round deadline")
    over_selection: float = Field(
        0.0, ge=0, le=10, allow_inf_nan=False, description="sample this much more (0.3: 130%)"
    )
    partial_work: bool = Field(False, description="stragglers train what fits the deadline")

    def __init__(self, **data: Any) -> None:
        if type(self).strategy_class is None:
            raise ConfigError(
                f"{type(self).__name__} is the base of the [strategy] models: validate a "
                f"table with {type(self).__name__}.model_validate({{'name': ...}}) or "
                "construct a registered model (e.g. FedProxConfig(proximal_mu=0.1))"
            )
        super().__init__(**data)

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Callable[[Any], Self]) -> Self:
        # A base picks the registered model of the table's name (the union's discriminator).
        if cls.strategy_class is not None or isinstance(data, cls):
            return handler(data)
        if isinstance(data, StrategyConfig):
            data = data.model_dump(exclude_unset=True) | {"name": data.name}
        if not isinstance(data, dict):
            return handler(data)  # pydantic's "a valid dictionary" error
        model = _REGISTRY.model_of(cls, data)
        return typing.cast(Self, _variant(model, cls).model_validate(data))

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if cls.strategy_class is None or not isinstance(data, dict):
            return data
        errors = [
            error
            for key, value in data.items()
            if (error := cls._key_error(key, value)) is not None
        ]
        errors += _REGISTRY.missing(cls, data, "strategy_parameter")
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @classmethod
    def _key_error(cls, key: str, value: Any) -> InitErrorDetails | None:
        """Why ``key`` does not belong in this strategy's table (``None`` if it does)."""
        if key in _REFUSED:
            return InitErrorDetails(
                type=PydanticCustomError(
                    "strategy_parameter",
                    "{reason}",
                    {"field": key, "value": value, "reason": _REFUSED[key]},
                ),
                input=value,
            )
        if key in cls.model_fields:
            return None
        owners = [n for n, model in _REGISTRY.items() if key in model.parameter_names()]
        if not owners:
            allowed = ", ".join(cls.model_fields)
            return InitErrorDetails(
                type=PydanticCustomError(
                    "unknown_key", "allowed keys here: {allowed}", {"allowed": allowed}
                ),
                loc=(key,),
                input=value,
            )
        takes = ", ".join(cls.parameter_names()) or "none (only FedAvg's sampling keys)"
        return InitErrorDetails(
            type=PydanticCustomError(
                "strategy_parameter",
                "not a parameter of strategy '{name}'; its parameters: {takes}; "
                "{key} belongs to {owners}",
                {
                    "field": key,
                    "value": value,
                    "name": cls.registered_name(),
                    "takes": takes,
                    "key": key,
                    "owners": ", ".join(owners),
                },
            ),
            input=value,
        )

    @classmethod
    def registered_name(cls) -> str:
        """The ``name`` this model is registered under (its ``Literal`` default)."""
        return str(cls.model_fields["name"].default)

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The strategy's own parameters: the fields beside the sampling keys."""
        return tuple(k for k in cls.model_fields if k not in cls.sampling_keys)

    @classmethod
    def example(cls) -> Self:
        """The table with only ``name`` and the required parameters (at their examples)."""
        required = {
            k: f.examples[0] for k, f in cls.model_fields.items() if f.is_required() and f.examples
        }
        return cls.model_validate({"name": cls.registered_name(), **required})

    def parameters(self) -> dict[str, Any]:
        """The strategy's own parameters that are set, as keyword arguments."""
        return {
            key: getattr(self, key)
            for key in self.parameter_names()
            if getattr(self, key) is not None
        }

    def sample_size(self, num_clients: int) -> int:
        """Clients sampled per fit round out of ``num_clients`` (FedAvg's rule)."""
        return max(int(num_clients * self.fraction_fit), self.min_fit_clients)

    def build(self, fedavg_args: Mapping[str, Any], train: Config | None = None) -> Strategy:
        """The strategy, with FedAvg's keyword arguments ``fedavg_args`` (sampling,
        evaluation, configs) and the set parameters; ``train`` holds the clients'
        ``lr`` and ``momentum`` for the parameters that follow them."""
        if self.strategy_class is None:  # pragma: no cover - bases are never constructed
            raise ConfigError(f"{type(self).__name__} builds no strategy")
        return self.strategy_class(**fedavg_args, **self.parameters())

    def traits(self) -> StrategyTraits:
        """The traits of the strategy this table builds (its parameters do not change them)."""
        # The server optimizers refuse to start without a model; any model will do here.
        stand_in = ndarrays_to_parameters([np.zeros(1, np.float32)])
        return traits_of(self.build({"initial_parameters": stand_in}))

    def min_results(self) -> RoundNeed | None:
        """The results per round the rule needs (``None``: no more than FedAvg's)."""
        return None


M = TypeVar("M", bound=StrategyConfig)
T = TypeVar("T")


def register_strategy(model: type[M]) -> type[M]:
    """Register ``model`` under its ``name``; usable as a class decorator.

    ``model`` names its ``strategy_class``, has a ``Literal`` name of its own, and gives
    an example for each required parameter (shown when one is missing).
    """
    _REGISTRY.register(model)
    return model


def unregister_strategy(name: str) -> None:
    """Remove the strategy ``name`` from the registry (KeyError if it is not there)."""
    _REGISTRY.unregister(name)


def registered_strategies() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def strategy_model(name: str) -> type[StrategyConfig]:
    """The model registered as ``name``; ConfigError naming the known ones otherwise."""
    return _REGISTRY.model(name)


class RegistryView(Mapping[str, T]):
    """A read-only mapping name -> ``read(model)`` over the registry, always current."""

    def __init__(self, read: Callable[[type[StrategyConfig]], T]) -> None:
        self._read = read

    def __getitem__(self, name: str) -> T:
        return self._read(_REGISTRY[name])

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


def weighted_mean_strategies() -> tuple[str, ...]:
    """The registered strategies whose aggregate is a weighted mean (their ``traits``):
    those that can run with secure aggregation."""
    return tuple(n for n, model in _REGISTRY.items() if model.example().traits().weighted_mean)


def required_client_mods() -> tuple[Callable[..., Any], ...]:
    """Every client mod a registered strategy requires (``traits.required_mods``), once
    each, in registration order: what a client that does not know the server's strategy
    installs. A required mod acts on its strategy's rounds only (SCAFFOLD's
    ``scaffold_mod`` passes other rounds through)."""
    mods: list[Callable[..., Any]] = []
    for model in _REGISTRY.values():
        mods.extend(m for m in model.example().traits().required_mods if m not in mods)
    return tuple(mods)


_VARIANTS: dict[tuple[type[StrategyConfig], type[StrategyConfig]], type[StrategyConfig]] = {}


def _variant(model: type[StrategyConfig], base: type[StrategyConfig]) -> type[StrategyConfig]:
    """``model`` with the defaults and fields of ``base`` (the server's sampling defaults
    and ``min_available_clients``); ``model`` itself when ``base`` is the plain table."""
    if base is StrategyConfig or issubclass(model, base):
        return model
    key = (model, base)
    if key not in _VARIANTS:
        prefix = base.__name__.removesuffix("StrategyConfig")
        name = model.model_fields["name"]  # the model's own, not the base's "fedavg"
        _VARIANTS[key] = create_model(
            f"{prefix}{model.__name__}",
            __base__=(base, model),
            __module__=__name__,
            name=(typing.cast(Any, name.annotation), name.default),
        )
    return _VARIANTS[key]


# -- field types shared by several strategies (Flower's argument names) -------------------

_Rate = Annotated[float | None, Field(gt=0, allow_inf_nan=False)]
_Decay = Annotated[float | None, Field(ge=0, lt=1, allow_inf_nan=False)]
_Count = Annotated[int | None, Field(ge=0)]


# -- the registry ----------------------------------------------------------------------


@register_strategy
class FedAvgConfig(StrategyConfig):
    """FedAvg (McMahan et al. 2017): FedAvg's sampling keys only."""

    name: Literal["fedavg"] = "fedavg"
    strategy_class = FedAvg


@register_strategy
class FedProxConfig(StrategyConfig):
    """FedProx (Li et al. 2020)."""

    name: Literal["fedprox"] = "fedprox"
    strategy_class = FedProx
    proximal_mu: float = Field(
        ge=0, allow_inf_nan=False, examples=[0.01], description="weight of the proximal term"
    )


@register_strategy
class FedAvgMConfig(StrategyConfig):
    """FedAvgM (Hsu et al. 2019): server momentum."""

    name: Literal["fedavgm"] = "fedavgm"
    strategy_class = FedAvgM
    server_learning_rate: _Rate = Field(None, description="server step size")
    server_momentum: _Decay = Field(None, description="server momentum")


class _FedOptConfig(StrategyConfig):
    """The parameters of every adaptive server optimizer (Reddi et al. 2021's FedOpt);
    not registered itself."""

    eta: _Rate = Field(None, description="server learning rate")
    beta_1: _Decay = Field(None, description="first moment decay")


class _MomentsConfig(_FedOptConfig):
    """FedOpt with a second moment (FedAdam's and FedYogi's); not registered itself."""

    beta_2: _Decay = Field(None, description="second moment decay")
    tau: _Rate = Field(None, description="adaptivity degree")


@register_strategy
class FedAdamConfig(_MomentsConfig):
    """FedAdam (Reddi et al. 2021)."""

    name: Literal["fedadam"] = "fedadam"
    strategy_class = FedAdam
    bias_correction: bool | None = Field(None, description="Adam's bias correction")


@register_strategy
class FedYogiConfig(_MomentsConfig):
    """FedYogi (Reddi et al. 2021)."""

    name: Literal["fedyogi"] = "fedyogi"
    strategy_class = FedYogi


@register_strategy
class FedAdagradConfig(_FedOptConfig):
    """FedAdagrad (Reddi et al. 2021)."""

    name: Literal["fedadagrad"] = "fedadagrad"
    strategy_class = FedAdagrad
    tau: _Rate = Field(None, description="adaptivity degree")


@register_strategy
class QFedAvgConfig(StrategyConfig):
    """q-FedAvg (Li et al. 2020, q-FFL); ``qffl_learning_rate`` follows ``train.lr``."""

    name: Literal["qfedavg"] = "qfedavg"
    strategy_class = QFedAvg
    q_param: float | None = Field(None, ge=0, allow_inf_nan=False, description="fairness q")
    qffl_learning_rate: _Rate = Field(None, description="the clients' learning rate (1/L)")

    def build(self, fedavg_args: Mapping[str, Any], train: Config | None = None) -> Strategy:
        params = self.parameters()
        if train and "lr" in train:  # the server's 1/L is the rate the clients train with
            params.setdefault("qffl_learning_rate", float(train["lr"]))
        return QFedAvg(**fedavg_args, **params)


@register_strategy
class FedMedianConfig(StrategyConfig):
    """FedMedian (Yin et al. 2018): coordinate-wise median."""

    name: Literal["fedmedian"] = "fedmedian"
    strategy_class = FedMedian


@register_strategy
class FedTrimmedAvgConfig(StrategyConfig):
    """FedTrimmedAvg (Yin et al. 2018): coordinate-wise trimmed mean."""

    name: Literal["fedtrimmedavg"] = "fedtrimmedavg"
    strategy_class = FedTrimmedAvg
    beta: float | None = Field(
        None, ge=0, lt=0.5, allow_inf_nan=False, description="fraction trimmed at each end"
    )


class _KrumFamilyConfig(StrategyConfig):
    """Krum's and Multi-Krum's ``f`` and ``num_clients_to_keep``, which together set the
    results a round needs, ``max(2f + 3, num_clients_to_keep)``; not registered itself."""

    num_malicious_clients: _Count = Field(None, description="f, the Byzantine clients tolerated")
    num_clients_to_keep: _Count = Field(None, description="models averaged")

    def min_results(self) -> RoundNeed | None:
        f, keep = self.num_malicious_clients or 0, self.num_clients_to_keep or 0
        key = "num_clients_to_keep" if keep > 2 * f + 3 else "num_malicious_clients"
        return RoundNeed(max(2 * f + 3, keep), "max(2f + 3, num_clients_to_keep)", key)


@register_strategy
class KrumConfig(_KrumFamilyConfig):
    """Krum (Blanchard et al. 2017); needs ``max(2f + 3, num_clients_to_keep)`` results."""

    name: Literal["krum"] = "krum"
    strategy_class = Krum
    num_clients_to_keep: _Count = Field(
        None, description="models averaged (0: Krum's single model)"
    )


@register_strategy
class MultiKrumConfig(_KrumFamilyConfig):
    """Multi-Krum (Blanchard et al. 2017); needs ``max(2f + 3, num_clients_to_keep)``."""

    name: Literal["multikrum"] = "multikrum"
    strategy_class = MultiKrum
    num_clients_to_keep: _Count = Field(None, description="models averaged (0: n - f)")


@register_strategy
class BulyanConfig(StrategyConfig):
    """Bulyan (El Mhamdi et al. 2018); needs ``4f + 3`` results per round."""

    name: Literal["bulyan"] = "bulyan"
    strategy_class = Bulyan
    num_malicious_clients: _Count = Field(None, description="f, the Byzantine clients tolerated")
    to_keep: _Count = Field(None, description="Multi-Krum width per step")

    def min_results(self) -> RoundNeed | None:
        return RoundNeed(
            4 * (self.num_malicious_clients or 0) + 3, "4f + 3", "num_malicious_clients"
        )


@register_strategy
class ScaffoldConfig(StrategyConfig):
    """SCAFFOLD (Karimireddy et al. 2020); its clients run ``scaffold_mod`` (its traits)."""

    name: Literal["scaffold"] = "scaffold"
    strategy_class = Scaffold
    server_learning_rate: _Rate = Field(None, description="server step size")


@register_strategy
class FedNovaConfig(StrategyConfig):
    """FedNova (Wang et al. 2020); ``local_momentum`` follows ``train.momentum``."""

    name: Literal["fednova"] = "fednova"
    strategy_class = FedNova
    server_learning_rate: _Rate = Field(None, description="server step size")
    local_momentum: _Decay = Field(None, description="the clients' heavy-ball momentum")

    def build(self, fedavg_args: Mapping[str, Any], train: Config | None = None) -> Strategy:
        params = self.parameters()
        if train and "momentum" in train:  # normalizes by the momentum the clients use
            params.setdefault("local_momentum", float(train["momentum"]))
        return FedNova(**fedavg_args, **params)


class _AsynchronousConfig(StrategyConfig):
    """What FedBuff's and FedAsync's tables share (Nguyen et al. 2022; Xie et al. 2019):
    they run without a round barrier, so the synchronous stragglers' keys do not apply;
    not registered itself."""

    concurrency: int = Field(20, ge=1, strict=True, description="clients training at once")
    staleness: Literal["constant", "poly", "hinge"] = Field(
        "poly", description="staleness function s(tau)"
    )
    staleness_exponent: float = Field(0.5, ge=0, allow_inf_nan=False, description="a of s(tau)")
    staleness_hinge: int = Field(4, ge=0, strict=True, description="b of the hinge function")
    max_staleness: int | None = Field(
        None, ge=0, strict=True, description="refuse results older than this many versions"
    )

    @model_validator(mode="after")
    def _no_round_keys(self) -> Self:
        given = [k for k in ("deadline_s", "over_selection", "partial_work") if getattr(self, k)]
        if given:
            raise PydanticCustomError(
                "strategy_parameter",
                "{name} is asynchronous (no rounds), so {keys} does not apply; the policy "
                "keeps concurrency clients training and refuses results older than "
                "max_staleness instead",
                {"field": given[0], "value": getattr(self, given[0]), "name": self.name,
                 "keys": ", ".join(given)},
            )  # fmt: skip
        return self

    def results_per_version(self) -> int:
        """Results each model version folds."""
        return 1


@register_strategy
class FedBuffConfig(_AsynchronousConfig):
    """FedBuff (Nguyen et al. 2022): a version every ``buffer_size`` staleness-weighted deltas."""

    name: Literal["fedbuff"] = "fedbuff"
    strategy_class = FedBuff
    buffer_size: int = Field(10, ge=1, strict=True, description="results per model version (K)")
    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="server step size")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="server momentum")
    server_optimizer: Literal["sgd", "adam"] = Field("sgd", description="server optimizer")
    # the policy's, not the strategy's: run_policy passes it to BufferedAsync
    checkpoint_every: int | None = Field(
        None, ge=1, strict=True, description="also checkpoint every this many buffered results"
    )

    def parameters(self) -> dict[str, Any]:
        params = super().parameters()
        params.pop("checkpoint_every", None)
        return params

    def results_per_version(self) -> int:
        return self.buffer_size


@register_strategy
class FedAsyncConfig(_AsynchronousConfig):
    """FedAsync (Xie et al. 2019): each result mixed in with ``alpha * s(tau)``."""

    name: Literal["fedasync"] = "fedasync"
    strategy_class = FedAsync
    alpha: float = Field(0.6, gt=0, le=1, allow_inf_nan=False, description="mixing weight")
