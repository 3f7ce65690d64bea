"""The experiment config of ``fedhive run``: parsed and validated once, at the edge.

A TOML file has up to six tables, every key optional (defaults give the default run)::

    seed = 0
    rounds = 100
    num_clients = 100
    out = "runs/default"

    [data]       dataset, num_samples, path, partition, alpha, min_size, shards_per_client,
                 sigma, val_fraction
    [model]      name ("cnn1d" | "mlp" | "logreg"), hidden
    [train]      local_epochs, batch_size, lr, momentum
    [strategy]   name, fraction_fit, fraction_evaluate, min_fit_clients,
                 min_evaluate_clients, centralized_eval, and the chosen strategy's own
                 parameters under Flower's names (see ``STRATEGY_PARAMETERS``)
    [simulation] backend, num_workers, round_timeout
    secure_aggregation = { threshold, degree, bits, clip, ... }   (SecAgg+, optional)

An unknown key or a bad value stops the run with a message naming the key, the value and
what is allowed. So does a strategy parameter that the chosen strategy does not take
(``server_momentum`` with ``name = "fedprox"``), a missing required one (FedProx's
``proximal_mu``), or a robust rule whose ``num_malicious_clients`` needs more clients per
round than the sampling gives.

Example::

    [strategy]
    name = "fedadam"
    eta = 0.01
    tau = 0.001
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from fedhive.common.errors import ConfigError

__all__ = [
    "SECURE_AGGREGATION_STRATEGIES",
    "STRATEGY_PARAMETERS",
    "ExperimentConfig",
    "SecureAggregationConfig",
    "StrategyConfig",
    "apply_overrides",
    "check_round_size",
    "describe_error",
    "load_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["mnist1d", "digits", "synthetic", "folder"] = "mnist1d"
    num_samples: int = Field(20_000, ge=100, description="MNIST-1D samples to generate")
    path: str = Field("", description="folder of train/test .npz or .csv (dataset = folder)")
    partition: Literal["iid", "dirichlet", "shards", "quantity_skew", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more skew)")
    min_size: int = Field(10, ge=0, description="smallest client under the Dirichlet split")
    shards_per_client: int = Field(2, ge=1)
    sigma: float = Field(1.0, gt=0, description="log-normal sigma of quantity skew")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="client data kept for evaluation")


class ModelConfig(_Section):
    name: Literal["cnn1d", "mlp", "logreg"] = "cnn1d"
    hidden: int = Field(128, ge=1, description="hidden width of the MLP")


class TrainConfig(_Section):
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(10, description="minibatch size; 0 = full batch (FedSGD)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "scaffold",
    "fednova",
]

#: Each strategy's own parameters (beyond FedAvg's sampling keys), under the argument
#: names of its ``fedhive.server.strategy`` class (Flower's names). Unset ones take the
#: class defaults, except where :class:`StrategyConfig` says otherwise.
STRATEGY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("eta", "beta_1", "beta_2", "tau", "bias_correction"),
    "fedyogi": ("eta", "beta_1", "beta_2", "tau"),
    "fedadagrad": ("eta", "beta_1", "tau"),
    "qfedavg": ("q_param", "qffl_learning_rate"),
    "fedmedian": (),
    "fedtrimmedavg": ("beta",),
    "krum": ("num_malicious_clients", "num_clients_to_keep"),
    "multikrum": ("num_malicious_clients", "num_clients_to_keep"),
    "bulyan": ("num_malicious_clients", "to_keep"),
    "scaffold": ("server_learning_rate",),
    "fednova": ("server_learning_rate", "local_momentum"),
}

#: Parameters a strategy cannot do without (its class has no default for them).
REQUIRED_PARAMETERS: dict[str, tuple[str, ...]] = {"fedprox": ("proximal_mu",)}

#: Flower arguments the CLI refuses, with the reason.
_REFUSED: dict[str, str] = {
    "eta_l": "the clients' learning rate is train.lr (Flower's eta_l is only recorded)",
}


class StrategyConfig(_Section):
    """``[strategy]``: which strategy, FedAvg's sampling keys, and the strategy's parameters.

    The parameter fields are all optional; a model validator accepts only those that the
    chosen ``name`` takes (:data:`STRATEGY_PARAMETERS`). Two defaults differ from the
    classes' so that the server and the CLI's clients agree: q-FedAvg's
    ``qffl_learning_rate`` defaults to ``train.lr`` and FedNova's ``local_momentum`` to
    ``train.momentum``.
    """

    name: StrategyName = "fedavg"
    fraction_fit: float = Field(0.1, ge=0, le=1)
    fraction_evaluate: float = Field(0.05, ge=0, le=1)
    min_fit_clients: int = Field(2, ge=0)
    min_evaluate_clients: int = Field(2, ge=0)
    centralized_eval: bool = True
    # -- strategy parameters (Flower's argument names) -------------------------------------
    proximal_mu: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="FedProx: weight of the proximal term"
    )
    server_learning_rate: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="FedAvgM, Scaffold, FedNova: server step size"
    )
    server_momentum: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False, description="FedAvgM: momentum"
    )
    eta: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="FedAdam/FedYogi/FedAdagrad: server learning rate",
    )
    beta_1: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False, description="adaptive: first moment decay"
    )
    beta_2: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False, description="adaptive: second moment decay"
    )
    tau: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="adaptive: adaptivity degree"
    )
    bias_correction: bool | None = Field(None, description="FedAdam: Adam's bias correction")
    q_param: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="q-FedAvg: fairness q"
    )
    qffl_learning_rate: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="q-FedAvg: clients' learning rate (1/L)"
    )
    beta: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        allow_inf_nan=False,
        description="FedTrimmedAvg: fraction trimmed at each end",
    )
    num_malicious_clients: int | None = Field(
        None, ge=0, description="Krum, MultiKrum, Bulyan: f, the Byzantine clients tolerated"
    )
    num_clients_to_keep: int | None = Field(
        None, ge=0, description="Krum, MultiKrum: models averaged (0 = the rule's default)"
    )
    to_keep: int | None = Field(None, ge=0, description="Bulyan: Multi-Krum width per step")
    local_momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="FedNova: the clients' heavy-ball momentum",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_flower_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, reason in _REFUSED.items():
                if key in data:
                    raise PydanticCustomError(
                        "strategy_parameter",
                        "{reason}",
                        {"field": key, "value": data[key], "reason": reason},
                    )
        return data

    @model_validator(mode="after")
    def _check_parameters(self) -> Self:
        allowed = STRATEGY_PARAMETERS[self.name]
        for key in _parameter_fields():
            value = getattr(self, key)
            if value is not None and key not in allowed:
                owners = [n for n, keys in STRATEGY_PARAMETERS.items() if key in keys]
                takes = ", ".join(allowed) if allowed else "none (only FedAvg's sampling keys)"
                raise PydanticCustomError(
                    "strategy_parameter",
                    "not a parameter of strategy '{name}'; its parameters: {takes}; "
                    "{key} belongs to {owners}",
                    {
                        "field": key,
                        "value": value,
                        "name": self.name,
                        "takes": takes,
                        "key": key,
                        "owners": ", ".join(owners),
                    },
                )
        for key in REQUIRED_PARAMETERS.get(self.name, ()):
            if getattr(self, key) is None:
                raise PydanticCustomError(
                    "strategy_parameter",
                    "strategy '{name}' needs {key} (e.g. {key} = 0.01 under [strategy])",
                    {"field": key, "name": self.name, "key": key},
                )
        return self

    def parameters(self) -> dict[str, Any]:
        """The strategy's own parameters that are set, as keyword arguments."""
        return {
            key: getattr(self, key)
            for key in STRATEGY_PARAMETERS[self.name]
            if getattr(self, key) is not None
        }

    def sample_size(self, num_clients: int) -> int:
        """Clients sampled per fit round out of ``num_clients`` (FedAvg's rule)."""
        return max(int(num_clients * self.fraction_fit), self.min_fit_clients)


def _parameter_fields() -> list[str]:
    sampling = {"name", "fraction_fit", "fraction_evaluate", "min_fit_clients"}
    sampling |= {"min_evaluate_clients", "centralized_eval"}
    return [k for k in StrategyConfig.model_fields if k not in sampling]


def _min_results(st: StrategyConfig) -> int:
    """Results a robust rule needs per round (0: no constraint)."""
    f = st.num_malicious_clients or 0
    if st.name in ("krum", "multikrum"):
        return max(2 * f + 3, st.num_clients_to_keep or 0)
    if st.name == "bulyan":
        return 4 * f + 3
    return 0


class SimulationConfig(_Section):
    backend: Literal["thread", "process"] = "thread"
    num_workers: int = Field(0, ge=0, description="0 = one per core")
    round_timeout: float | None = Field(None, gt=0)


#: Strategies whose aggregate is a function of the weighted mean: they can run with SecAgg+.
SECURE_AGGREGATION_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class SecureAggregationConfig(_Section):
    """``secure_aggregation = { ... }``: every fit round runs SecAgg+ (see
    docs/secure_aggregation.md); the keys are :class:`fedhive.secagg.SecAggConfig`'s."""

    threshold: int | None = Field(None, ge=1)
    degree: int | Literal["complete"] | None = None
    bits: int = Field(12, ge=1, le=62)
    clip: float = Field(1.0, gt=0)
    max_weight: int = Field(1000, ge=1)
    max_clients: int = Field(1000, ge=2)
    ring_bits: Literal[32, 64] | None = None
    corrupt_fraction: float = Field(0.1, ge=0, lt=0.5)
    dropout_fraction: float = Field(0.1, ge=0, lt=0.5)
    failure_probability: float = Field(1e-6, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        from fedhive.secagg import SecAggConfig

        try:
            SecAggConfig(**self.options())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`fedhive.secagg.SecAggConfig`."""
        return self.model_dump()


def check_secure_strategy(secure: SecureAggregationConfig | None, name: str) -> None:
    """Refuse SecAgg+ with a strategy that needs individual updates."""
    if secure is not None and name not in SECURE_AGGREGATION_STRATEGIES:
        raise PydanticCustomError(
            "strategy_parameter",
            "{name} needs individual updates, which secure aggregation hides; use one of "
            "{allowed}, or drop secure_aggregation",
            {
                "field": "name",
                "value": name,
                "section": "strategy",
                "name": name,
                "allowed": ", ".join(SECURE_AGGREGATION_STRATEGIES),
            },
        )


class ExperimentConfig(_Section):
    seed: int = 0
    rounds: int = Field(100, ge=0)
    num_clients: int = Field(100, ge=1)
    out: str = "runs/default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    simulation: SimulationConfig = SimulationConfig()
    secure_aggregation: SecureAggregationConfig | None = None

    @model_validator(mode="after")
    def _check_sample_size(self) -> Self:
        st = self.strategy
        check_secure_strategy(self.secure_aggregation, st.name)
        check_round_size(
            st,
            min(st.sample_size(self.num_clients), self.num_clients),
            f"fraction_fit = {st.fraction_fit} of num_clients = {self.num_clients} "
            f"(min_fit_clients = {st.min_fit_clients})",
            "raise strategy.fraction_fit or strategy.min_fit_clients, or lower "
            "strategy.num_malicious_clients",
        )
        return self


def check_round_size(st: StrategyConfig, have: int, sampling: str, fix: str) -> None:
    """Refuse a robust rule that needs more results per round than the ``have`` sampled.

    Raised from a model validator, so the message names the key at fault; ``sampling``
    says how ``have`` comes about and ``fix`` which keys to change. Shared by ``fedhive
    run`` and ``fedhive server``, whose sampling differs.
    """
    need = _min_results(st)
    if need <= have:
        return
    f = st.num_malicious_clients or 0
    by_keep = st.name != "bulyan" and (st.num_clients_to_keep or 0) > 2 * f + 3
    key = "num_clients_to_keep" if by_keep else "num_malicious_clients"
    rule = "4f + 3" if st.name == "bulyan" else "max(2f + 3, num_clients_to_keep)"
    raise PydanticCustomError(
        "strategy_parameter",
        "{name} needs at least {rule} = {need} clients per round, but {sampling} samples "
        "{have}; {fix}",
        {
            "field": key,
            "value": getattr(st, key) or 0,
            "section": "strategy",
            "name": st.name,
            "rule": rule,
            "need": need,
            "sampling": sampling,
            "have": have,
            "fix": fix,
        },
    )


def describe_error(
    error: dict[str, Any], source: str, root: type[BaseModel] = ExperimentConfig
) -> str:
    """One line for one pydantic error of a config whose top-level model is ``root``."""
    key = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    if error["type"] == "strategy_parameter":
        ctx = error.get("ctx") or {}
        parts = [str(p) for p in error["loc"]]
        if ctx.get("section") and ctx["section"] not in parts:
            parts.append(ctx["section"])
        key = ".".join([*parts, str(ctx.get("field", ""))])
        if "value" not in ctx:
            return f"{source}: {key} is missing: {error['msg']}"
        return f"{source}: {key} = {ctx['value']!r}: {error['msg']}"
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = root
        for part in error["loc"][:-1]:
            section = _section_model(section.model_fields[str(part)].annotation)
        allowed = ", ".join(section.model_fields)
        return f"{source}: unknown key {key!r} (value {value!r}); allowed keys here: {allowed}"
    return f"{source}: {key} = {value!r}: {error['msg']}"


def _section_model(annotation: Any) -> type[BaseModel]:
    """The model class of a section's annotation (``Section`` or ``Section | None``)."""
    for member in getattr(annotation, "__args__", (annotation,)):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    raise TypeError(f"{annotation!r} is not a config section")


def validate(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig` (ConfigError if bad)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [describe_error(e, source) for e in exc.errors()]  # type: ignore[arg-type]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None) -> dict[str, Any]:
    """The raw dict of a TOML file (empty for ``None``); ConfigError if unreadable."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with dotted keys (``"data.alpha"``) set; the input is not changed."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.alpha=0.1"`` -> ``("data.alpha", 0.1)``; the value is read as TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. data.alpha=0.1), got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
