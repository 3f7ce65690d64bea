"""The experiment config of ``fedhive run``: parsed and validated once, at the edge.

A TOML file has up to seven tables, every key optional (defaults give the default run)::

    seed = 0
    rounds = 100
    num_clients = 100
    out = "runs/default"
    app = ""          # your own client, "MODULE:ATTR" (see below); default: the built-in one

    [data]       dataset, num_samples, path, partition, alpha, min_size, shards_per_client,
                 sigma, val_fraction
    [model]      name ("cnn1d" | "mlp" | "logreg"), hidden
    [train]      local_epochs, batch_size, lr, momentum, max_steps
    [strategy]   name, fraction_fit, fraction_evaluate, min_fit_clients,
                 min_evaluate_clients, centralized_eval, and the chosen strategy's own
                 parameters under Flower's names: one model per strategy, registered
                 in :mod:`fedhive.cli.strategies` (see ``STRATEGY_PARAMETERS``)
    [simulation] backend (a registered one), num_workers, round_timeout
    [policy]     name ("sync" | "buffered-async"), and the chosen policy's arguments:
                 buffered-async takes buffer_size, concurrency (both required) and
                 max_staleness; one model per policy, registered in
                 :mod:`fedhive.cli.policies`. ``rounds`` counts model versions
    [system]     latency, sigma, bandwidth_mbps, trace, dropout: simulated devices on the
                 virtual clock (:mod:`fedhive.cli.stragglers`); rounds record virtual_time_s
    secure_aggregation = { threshold, degree, bits, clip, ... }   (SecAgg+, optional;
                 the keys and defaults of ``fedhive.secagg.SecAggConfig``)
    [personalization] method ("none" | "finetune" | "fedper" | "fedrep" | "fedbn" |
                 "ditto" | "apfl"), personal_layers, personal_types, lam, finetune_epochs,
                 finetune_head, finetune_head_epochs,
                 head_epochs, personal_epochs, alpha, alpha_lr, eval_clients,
                 test_fraction (optional; see :mod:`fedhive.cli.personalization`)
    [compression] uplink, ratio, bits, error_feedback, downlink (update compression,
                 optional; :mod:`fedhive.cli.compression_config`)
    [tracking]   tensorboard = { logdir, histograms }, mlflow = { tracking_uri,
                 experiment, run_name } (optional; :mod:`fedhive.cli.tracking`)

``app = "client:app"`` simulates your own client instead of the built-in model and data:
a ``ClientApp``, a ``client_fn`` (taking a ``Context``, whose ``node_config`` has
``partition-id`` and ``num-partitions``) or a ``NumPyClient``, imported from ``app_dir``
(default: the config file's folder). Each round's fit config carries ``[train]``'s
values; the initial model comes from one client and evaluation is the clients' own.
``[data]``, ``[model]``, ``[system]`` and ``[personalization]`` do not apply to it.

An unknown key or a bad value stops the run with a message naming the key, the value and
what is allowed. So does a strategy parameter that the chosen strategy does not take
(``server_momentum`` with ``name = "fedprox"``), a missing required one (FedProx's
``proximal_mu``), or a robust rule whose ``num_malicious_clients`` needs more clients per
round than the sampling gives (under buffered-async: than ``buffer_size``), or secure
aggregation with a strategy whose traits do not declare a weighted mean, or with an
asynchronous policy (SecAgg+ needs a synchronous round), or a policy that keeps more
clients training than there are.

Example::

    [strategy]
    name = "fedadam"
    eta = 0.01
    tau = 0.001

    [policy]
    name = "buffered-async"
    buffer_size = 10
    concurrency = 20
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedhive.cli.compression_config import (
    CompressionConfig,
    check_compression_secure,
)
from fedhive.cli.personalization import PersonalizationSection
from fedhive.cli.policies import PolicyConfig, SyncConfig
from fedhive.cli.stragglers import SystemConfig, check_strategy_policy
from fedhive.cli.strategies import (
    FedAvgConfig,
    RegistryView,
    StrategyConfig,
    strategy_model,
    weighted_mean_strategies,
)
from fedhive.cli.tracking import TrackingConfig
from fedhive.common.errors import ConfigError

__all__ = [
    "SECURE_AGGREGATION_STRATEGIES",
    "STRATEGY_PARAMETERS",
    "ExperimentConfig",
    "PolicyConfig",
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
    batch_norm: bool = Field(False, description="batch norm after each convolution (cnn1d)")

    @model_validator(mode="after")
    def _batch_norm_needs_cnn(self) -> Self:
        if self.batch_norm and self.name != "cnn1d":
            raise ValueError(f"batch_norm = true needs name = 'cnn1d', not {self.name!r}")
        return self


class TrainConfig(_Section):
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(10, description="minibatch size; 0 = full batch (FedSGD)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    max_steps: int = Field(
        0, ge=0, description="at most this many local steps per round (0 = every epoch's)"
    )


#: Each strategy's own parameters (beyond FedAvg's sampling keys), under the argument
#: names of its ``fedhive.server.strategy`` class (Flower's): a live view of the registry
#: in :mod:`fedhive.cli.strategies`, kept here for compatibility. Unset ones take the
#: class defaults, except where the strategy's model says otherwise.
STRATEGY_PARAMETERS: Mapping[str, tuple[str, ...]] = RegistryView(
    lambda model: model.parameter_names()
)

#: Parameters a strategy cannot do without (its class has no default for them); a live
#: view of the registry, kept for compatibility.
REQUIRED_PARAMETERS: Mapping[str, tuple[str, ...]] = RegistryView(
    lambda model: tuple(k for k, f in model.model_fields.items() if f.is_required())
)


def _backends() -> tuple[str, ...]:
    # Imported when a [simulation] table is checked: the simulation package is not needed
    # to read the rest of a config.
    from fedhive.simulation.backends import backend_names

    return backend_names()


class SimulationConfig(_Section):
    backend: str = Field(
        "thread", description="a registered simulation backend (fedhive.simulation.backend_names)"
    )
    num_workers: int = Field(0, ge=0, description="0 = one per core")
    round_timeout: float | None = Field(None, gt=0)
    client_resources: dict[Literal["num_cpus", "num_gpus", "memory"], float] = Field(
        default_factory=dict, description="each client's Ray resources (memory in bytes)"
    )
    ray_init_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="ray.init arguments; address joins a cluster"
    )

    @field_validator("backend")
    @classmethod
    def _registered(cls, value: str) -> str:
        known = _backends()
        if value not in known:
            raise PydanticCustomError(
                "literal_error",
                "Input should be {expected} (the registered backends; register your own "
                "with fedhive.simulation.register_backend)",
                {"expected": ", ".join(repr(name) for name in known)},
            )
        return value


class _SecureNames(Sequence[str]):
    """The registered strategies whose traits declare a weighted mean, computed on use."""

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return weighted_mean_strategies()[index]

    def __len__(self) -> int:
        return len(weighted_mean_strategies())

    def __eq__(self, other: object) -> bool:  # compares like the tuple it replaces
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(weighted_mean_strategies())


#: Strategies whose aggregate is a weighted mean (their ``traits``): they can run with
#: SecAgg+. Derived from the registry on use; kept for compatibility.
SECURE_AGGREGATION_STRATEGIES: Sequence[str] = _SecureNames()


def _secagg_defaults() -> dict[str, Any]:
    """:class:`fedhive.secagg.SecAggConfig`'s fields and defaults: the one source of both."""
    # Imported on use: the secagg package loads its cryptography, which a config without
    # secure_aggregation does not need.
    from fedhive.secagg.config import SecAggConfig

    return {f.name: f.default for f in dataclasses.fields(SecAggConfig)}


class SecureAggregationConfig(_Section):
    """``secure_aggregation = { ... }``: every fit round runs SecAgg+ (see
    docs/secure_aggregation.md); the keys and defaults are those of
    :class:`fedhive.secagg.SecAggConfig`, which also checks their combination.

    The fields carry the bounds, so that a bad value is named at its key; an unset one
    takes ``SecAggConfig``'s default (filled in before validation, so no default is
    repeated here; ``tests/test_secagg_cli.py`` checks that both have the same keys).
    """

    threshold: int | None = Field(ge=1)
    degree: int | Literal["complete"] | None
    bits: int = Field(ge=1, le=62)
    clip: float = Field(gt=0)
    max_weight: int = Field(ge=1)
    max_clients: int = Field(ge=2)
    ring_bits: Literal[32, 64] | None
    corrupt_fraction: float = Field(ge=0, lt=0.5)
    dropout_fraction: float = Field(ge=0, lt=0.5)
    failure_probability: float = Field(gt=0, lt=1)
    threat_model: Literal["honest-but-curious", "malicious"]
    peers: str | None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {**_secagg_defaults(), **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        from fedhive.secagg.config import SecAggConfig

        try:
            SecAggConfig(**self.options())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`fedhive.secagg.SecAggConfig`."""
        return self.model_dump()


def check_secure_strategy(
    secure: SecureAggregationConfig | None, strategy: StrategyConfig | str
) -> None:
    """Refuse SecAgg+ with a strategy whose aggregate is not a weighted mean.

    Asks the traits of the strategy ``strategy`` builds (a name: its registered model's
    example), never its name.
    """
    if secure is None:
        return
    st = strategy_model(strategy).example() if isinstance(strategy, str) else strategy
    traits = st.traits()
    if traits.weighted_mean:
        return
    why = traits.reason or (
        "it needs individual updates" if traits.individual_updates
        else "its aggregate is not a weighted mean"
    )  # fmt: skip
    raise PydanticCustomError(
        "strategy_parameter",
        "{name} cannot run with secure aggregation, which reveals only the weighted mean "
        "of the updates ({why}); use one of {allowed}, or drop secure_aggregation",
        {
            "field": "name",
            "value": st.name,
            "section": "strategy",
            "name": st.name,
            "why": why,
            "allowed": ", ".join(weighted_mean_strategies()),
        },
    )


def check_secure_policy(secure: SecureAggregationConfig | None, policy: PolicyConfig) -> None:
    """Refuse SecAgg+ under a policy without synchronous rounds (the engine refuses it
    too; this says it in the config's terms)."""
    if secure is None or policy.synchronous:
        return
    raise PydanticCustomError(
        "config_parameter",
        "secure aggregation (SecAgg+) needs a synchronous round, in which every sampled "
        "client's masked update is summed at once; policy '{name}' folds each result as "
        'it arrives. Use name = "sync" under [policy], or drop secure_aggregation',
        {"field": "name", "value": policy.name, "section": "policy", "name": policy.name},
    )


def check_policy_round_size(st: StrategyConfig, policy: PolicyConfig) -> bool:
    """Refuse a robust rule that needs more results than each of the policy's model
    versions aggregates; ``False`` when the strategy's sampling decides it instead."""
    per_version = policy.results_per_version()
    if per_version is None:
        return False
    check_round_size(
        st,
        per_version,
        f"policy '{policy.name}' with buffer_size = {per_version}",
        "raise policy.buffer_size",
    )
    return True


class ExperimentConfig(_Section):
    seed: int = 0
    rounds: int = Field(100, ge=1, description="rounds (model versions under any policy)")
    num_clients: int = Field(100, ge=1)
    out: str = "runs/default"
    app: str = Field("", description="your client, MODULE:ATTR (replaces [data] and [model])")
    app_dir: str = Field("", description="folder app is imported from; default: the config's")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    strategy: SerializeAsAny[StrategyConfig] = FedAvgConfig()
    simulation: SimulationConfig = SimulationConfig()
    secure_aggregation: SecureAggregationConfig | None = None
    policy: SerializeAsAny[PolicyConfig] = SyncConfig()
    system: SystemConfig | None = None
    personalization: PersonalizationSection | None = None
    compression: CompressionConfig | None = None
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _check_sample_size(self) -> Self:
        st = self.strategy
        if self.app:
            for section in ("system", "personalization"):
                if getattr(self, section) is not None:
                    raise PydanticCustomError(
                        "config_parameter",
                        "[{table}] needs the built-in client; with app = {value!r} your "
                        "client does its own training: remove [{table}] or app",
                        {"field": "app", "value": self.app, "table": section},
                    )
        check_strategy_policy(
            st, self.policy, self.num_clients, self.secure_aggregation is not None
        )
        check_secure_strategy(self.secure_aggregation, st)
        check_secure_policy(self.secure_aggregation, self.policy)
        check_compression_secure(self.compression, self.secure_aggregation)
        concurrency = self.policy.clients_training()
        if concurrency is not None and concurrency > self.num_clients:
            raise PydanticCustomError(
                "config_parameter",
                "only num_clients = {have} clients exist, so no more than {have} can "
                "train at once; lower policy.concurrency or raise num_clients",
                {
                    "field": "concurrency",
                    "value": concurrency,
                    "section": "policy",
                    "have": self.num_clients,
                },
            )
        if check_policy_round_size(st, self.policy):
            return self
        check_round_size(
            st,
            min(st.sample_size(self.num_clients), self.num_clients),
            f"fraction_fit = {st.fraction_fit} of num_clients = {self.num_clients} "
            f"(min_fit_clients = {st.min_fit_clients})",
            "raise strategy.fraction_fit or strategy.min_fit_clients",
        )
        return self


def check_round_size(st: StrategyConfig, have: int, sampling: str, fix: str) -> None:
    """Refuse a rule that needs more results per round (its
    :meth:`~fedhive.cli.strategies.StrategyConfig.min_results`) than the ``have`` sampled.

    Raised from a model validator, so the message names the key at fault; ``sampling``
    says how ``have`` comes about and ``fix`` which sampling keys to change (the message
    adds lowering the rule's own key). Shared by ``fedhive run`` and ``fedhive server``,
    whose sampling differs.
    """
    need = st.min_results()
    if need is None or need.need <= have:
        return
    raise PydanticCustomError(
        "strategy_parameter",
        "{name} needs at least {rule} = {need} clients per round, but {sampling} samples "
        "{have}; {fix}, or lower strategy.{key}",
        {
            "field": need.key,
            "value": getattr(st, need.key) or 0,
            "section": "strategy",
            "name": st.name,
            "rule": need.rule,
            "need": need.need,
            "sampling": sampling,
            "have": have,
            "fix": fix,
            "key": need.key,
        },
    )


def describe_error(
    error: dict[str, Any],
    source: str,
    root: type[BaseModel] = ExperimentConfig,
    sources: Mapping[str, str] | None = None,
) -> str:
    """One line for one pydantic error of a config whose top-level model is ``root``.

    The line starts with where the value came from: ``sources[key]`` (e.g. ``"--set"``
    for a key set on the command line), else ``source`` (the config file).
    """
    key = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    source = _source_of(key, error, source, sources)
    if error["type"] in ("strategy_parameter", "config_parameter"):
        ctx = error.get("ctx") or {}
        parts = [str(p) for p in error["loc"]]
        if ctx.get("section") and ctx["section"] not in parts:
            parts.append(ctx["section"])
        key = ".".join([*parts, str(ctx.get("field", ""))])
        if "value" not in ctx:
            return f"{source}: {key} is missing: {error['msg']}"
        return f"{source}: {key} = {ctx['value']!r}: {error['msg']}"
    if error["type"] == "unknown_key":  # a strategy table's key no strategy takes
        names = str((error.get("ctx") or {}).get("allowed", "")).split(", ")
        hint = did_you_mean(str(error["loc"][-1]), names)
        return f"{source}: unknown key {key!r} (value {value!r}); {error['msg']}{hint}"
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = root
        for part in error["loc"][:-1]:
            section = _section_model(section.model_fields[str(part)].annotation)
        allowed = ", ".join(section.model_fields)
        hint = did_you_mean(str(error["loc"][-1]), section.model_fields)
        return (
            f"{source}: unknown key {key!r} (value {value!r}); allowed keys here: {allowed}{hint}"
        )
    if error["type"] == "literal_error" and isinstance(value, str):
        names = re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", "")))
        hint = did_you_mean(value, names)
        if hint:
            return f"{source}: {key} = {value!r}: {error['msg']}{hint}"
    return f"{source}: {key} = {value!r}: {error['msg']}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'fraction_fit'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _source_of(
    key: str, error: dict[str, Any], source: str, sources: Mapping[str, str] | None
) -> str:
    if not sources:
        return source
    ctx = error.get("ctx") or {}
    candidates = [key]
    if ctx.get("field"):
        candidates.append(".".join([*(str(p) for p in error["loc"]), str(ctx["field"])]))
        if ctx.get("section"):
            candidates.append(f"{ctx['section']}.{ctx['field']}")
    for candidate in candidates:
        if candidate in sources:
            return sources[candidate]
    return source


def _section_model(annotation: Any) -> type[BaseModel]:
    """The model class of a section's annotation (``Section`` or ``Section | None``)."""
    for member in getattr(annotation, "__args__", (annotation,)):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    raise TypeError(f"{annotation!r} is not a config section")


def validate(
    data: dict[str, Any], source: str = "config", sources: Mapping[str, str] | None = None
) -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig` (ConfigError if bad);
    ``sources`` labels keys that did not come from ``source`` (see :func:`describe_error`)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [describe_error(e, source, ExperimentConfig, sources) for e in exc.errors()]  # type: ignore[arg-type]
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
        raise ConfigError(
            f"--set expects KEY=VALUE in one word (e.g. --set data.alpha=0.1), got {text!r}"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
