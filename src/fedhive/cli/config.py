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
                 min_evaluate_clients, centralized_eval
    [simulation] backend, num_workers, round_timeout

An unknown key or a bad value stops the run with a message naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedhive.common.errors import ConfigError

__all__ = ["ExperimentConfig", "load_config", "apply_overrides"]


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


class StrategyConfig(_Section):
    name: Literal["fedavg"] = "fedavg"
    fraction_fit: float = Field(0.1, ge=0, le=1)
    fraction_evaluate: float = Field(0.05, ge=0, le=1)
    min_fit_clients: int = Field(2, ge=0)
    min_evaluate_clients: int = Field(2, ge=0)
    centralized_eval: bool = True


class SimulationConfig(_Section):
    backend: Literal["thread", "process"] = "thread"
    num_workers: int = Field(0, ge=0, description="0 = one per core")
    round_timeout: float | None = Field(None, gt=0)


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


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = ExperimentConfig
        for part in error["loc"][:-1]:
            section = section.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(section.model_fields)
        return f"{source}: unknown key {key!r} (value {value!r}); allowed keys here: {allowed}"
    return f"{source}: {key} = {value!r}: {error['msg']}"


def validate(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig` (ConfigError if bad)."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]  # type: ignore[arg-type]
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
