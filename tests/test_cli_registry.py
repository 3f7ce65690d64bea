"""One registration per strategy: the `[strategy]` models of `fedhive.cli.strategies`, what
is derived from them (parameters, minimum results, secure aggregation, client mods), a
strategy added by one registry entry, and secure aggregation's one source of defaults."""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading
from typing import Literal

import numpy as np
import pytest
from pydantic import Field
from typer.testing import CliRunner

from cli_helpers import run_toml
from fedhive.cli import app
from fedhive.cli.config import (
    REQUIRED_PARAMETERS,
    SECURE_AGGREGATION_STRATEGIES,
    STRATEGY_PARAMETERS,
    SecureAggregationConfig,
    load_config,
    validate,
)
from fedhive.cli.experiment import STRATEGIES, build_strategy
from fedhive.cli.server_cmd import server_strategy
from fedhive.cli.server_config import DeployStrategyConfig, validate_server_config
from fedhive.cli.strategies import (
    FedAvgConfig,
    FedProxConfig,
    StrategyConfig,
    register_strategy,
    registered_strategies,
    required_client_mods,
    strategy_model,
    unregister_strategy,
)
from fedhive.client.mods import scaffold_mod
from fedhive.common import ConfigError, ndarrays_to_parameters
from fedhive.secagg import SecAggConfig
from fedhive.server.strategy import FedAvg, FedMedian
from fedhive.server.strategy.traits import MEAN_TRAITS, StrategyTraits

runner = CliRunner()
TRAIN = {"local_epochs": 1, "batch_size": 10, "lr": 0.05, "momentum": 0.9}
BUILT_IN = (
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "qfedavg",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "scaffold", "fednova",
    "fedbuff", "fedasync",
)  # fmt: skip
INITIAL = ndarrays_to_parameters([np.zeros((3, 2), np.float32)])
WEIGHTED_MEANS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


# --------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", registered_strategies())  # a new entry is covered too
def test_every_registered_strategy_has_a_model_that_builds_and_round_trips(name, tmp_path):
    model = strategy_model(name)
    assert model.registered_name() == name and model.strategy_class is STRATEGIES[name]
    assert STRATEGY_PARAMETERS[name] == model.parameter_names()
    # Flower's argument names: every parameter is a keyword of the class it builds
    keywords = inspect.signature(model.strategy_class).parameters
    # checkpoint_every goes to the run policy, not to the strategy (test_cli_stragglers)
    assert set(model.parameter_names()) - {"checkpoint_every"} <= set(keywords), name
    table = model.example()
    strategy, _ = build_strategy(table, {}, {"initial_parameters": INITIAL})
    assert type(strategy) is model.strategy_class
    # unset parameters keep the class defaults (without train settings to follow)
    for key in set(model.parameter_names()) & set(keywords):
        default = keywords[key].default
        if default is inspect.Parameter.empty:
            continue
        if hasattr(strategy, key):
            assert getattr(strategy, key) == pytest.approx(default), (name, key)
    # the table round-trips through the config.toml that --resume reads back
    cfg = validate({"strategy": table.model_dump(), "num_clients": 1000, "seed": 3})
    assert cfg.strategy == table and type(cfg.strategy) is model
    from fedhive.cli.output import write_config

    write_config(tmp_path / "config.toml", cfg.model_dump())
    assert validate(load_config(tmp_path / "config.toml")).strategy == table


def test_the_built_in_registry_and_its_derived_tables():
    assert registered_strategies() == BUILT_IN
    assert tuple(STRATEGY_PARAMETERS) == tuple(STRATEGIES) == BUILT_IN
    assert (
        REQUIRED_PARAMETERS["fedprox"] == ("proximal_mu",) and REQUIRED_PARAMETERS["fedavg"] == ()
    )
    # from the built strategies' traits, not from a list of names
    assert tuple(SECURE_AGGREGATION_STRATEGIES) == WEIGHTED_MEANS
    assert required_client_mods() == (scaffold_mod,)


def test_validating_the_base_picks_the_registered_model():
    table = StrategyConfig.model_validate({"name": "fedprox", "proximal_mu": 0.3})
    assert type(table) is FedProxConfig and table.parameters() == {"proximal_mu": 0.3}
    assert type(StrategyConfig.model_validate({})) is FedAvgConfig
    deploy = DeployStrategyConfig.model_validate({"name": "fedprox", "proximal_mu": 0.3})
    assert isinstance(deploy, FedProxConfig) and isinstance(deploy, DeployStrategyConfig)
    assert (deploy.fraction_fit, deploy.min_available_clients) == (1.0, 2)
    assert deploy.parameters() == {"proximal_mu": 0.3}  # min_available_clients is sampling
    with pytest.raises(ConfigError, match="is the base of the \\[strategy\\] models"):
        StrategyConfig()


def test_register_strategy_refuses_an_incomplete_model():
    class Unnamed(StrategyConfig):
        strategy_class = FedAvg

    class NoClass(StrategyConfig):
        name: Literal["noclass"] = "noclass"

    class NoExample(StrategyConfig):
        name: Literal["noexample"] = "noexample"
        strategy_class = FedAvg
        mu: float = Field(ge=0)

    class Twin(StrategyConfig):
        name: Literal["fedavg"] = "fedavg"
        strategy_class = FedAvg

    for model, message in [
        (Unnamed, "must be a Literal"),
        (NoClass, "must set strategy_class"),
        (NoExample, "need an example.*mu"),
        (Twin, "'fedavg' is already registered by FedAvgConfig"),
    ]:
        with pytest.raises(ConfigError, match=message):
            register_strategy(model)
    assert registered_strategies() == BUILT_IN


# ------------------------------------------------------------------ options of another strategy


def test_an_option_of_another_strategy_names_its_owners():
    with pytest.raises(ConfigError) as info:
        validate({"strategy": {"name": "fedadam", "server_momentum": 0.9, "to_keep": 1}})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 2  # every foreign key at once
    assert "strategy.server_momentum = 0.9: not a parameter of strategy 'fedadam'" in lines[0]
    assert "eta, beta_1, beta_2, tau, bias_correction" in lines[0]  # what fedadam takes
    assert lines[0].endswith("server_momentum belongs to fedavgm, fedbuff")
    assert lines[1].endswith("to_keep belongs to bulyan")
    # a key shared by several strategies lists them all; FedAvg takes none
    with pytest.raises(
        ConfigError, match=r"'fedavg'; its parameters: none .*krum, multikrum, bulyan"
    ):
        validate({"strategy": {"num_malicious_clients": 1}})
    with pytest.raises(
        ConfigError, match=r"server_learning_rate belongs to fedavgm, scaffold, fednova"
    ):
        validate_server_config({"strategy": {"name": "fedyogi", "server_learning_rate": 0.5}})


def test_a_key_no_strategy_takes_lists_the_keys_of_the_chosen_one():
    with pytest.raises(ConfigError) as info:
        validate({"strategy": {"name": "fedtrimmedavg", "betta": 0.1}}, "exp.toml")
    text = str(info.value)
    assert "exp.toml: unknown key 'strategy.betta' (value 0.1); allowed keys here:" in text
    # the chosen strategy's keys, and the closest of them
    assert text.rstrip().endswith(
        "centralized_eval, deadline_s, over_selection, partial_work, beta; did you mean 'beta'?"
    )
    with pytest.raises(ConfigError, match=r"strategy\.min_available_clients.*allowed keys"):
        validate({"strategy": {"min_available_clients": 3}})  # a key of fedhive server only
    with pytest.raises(ConfigError, match=r"allowed keys here: .*, beta, min_available_clients"):
        validate_server_config({"strategy": {"name": "fedtrimmedavg", "betta": 0.1}})


# ---------------------------------------------------------------- a strategy added in one place

MOD_CALLS: list[str] = []
_lock = threading.Lock()


def toy_mod(message, context, call_next):
    with _lock:
        MOD_CALLS.append(message.metadata.message_type)
    return call_next(message, context)


class StepAvg(FedAvg):
    """FedAvg whose clients must run `toy_mod` (declared in its traits, not by name)."""

    def __init__(self, *, step: float = 1.0, **fedavg) -> None:
        super().__init__(**fedavg)
        self.step = step

    @property
    def traits(self) -> StrategyTraits:
        return MEAN_TRAITS.but(required_mods=(toy_mod,))


class StepAvgConfig(StrategyConfig):
    """The one registry entry the new strategy needs."""

    name: Literal["stepavg"] = "stepavg"
    strategy_class = StepAvg
    step: float | None = Field(None, gt=0, description="the step")


class MedianToyConfig(StrategyConfig):
    name: Literal["mediantoy"] = "mediantoy"
    strategy_class = FedMedian


@pytest.fixture
def toys():
    register_strategy(StepAvgConfig)
    register_strategy(MedianToyConfig)
    MOD_CALLS.clear()
    yield
    unregister_strategy("stepavg")
    unregister_strategy("mediantoy")
    assert registered_strategies() == BUILT_IN


@pytest.mark.usefixtures("toys")
def test_a_registered_strategy_runs_from_the_toml(tmp_path):
    assert STRATEGY_PARAMETERS["stepavg"] == ("step",) and STRATEGIES["stepavg"] is StepAvg
    cfg = tmp_path / "exp.toml"
    cfg.write_text(run_toml(tmp_path / "out", strategy='name = "stepavg"\nstep = 0.5'))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["config"]["strategy"]["step"] == 0.5
    assert all(r["fit"]["num_results"] == 4 for r in history["rounds"] if r["round"] > 0)
    assert MOD_CALLS.count("fit") == 8  # the mod its traits require ran on every fit
    saved = validate(load_config(tmp_path / "out" / "config.toml"))
    assert type(saved.strategy) is StepAvgConfig and saved.strategy.step == 0.5


@pytest.mark.usefixtures("toys")
def test_a_registered_strategy_is_known_everywhere():
    strategy, mods = build_strategy(validate({"strategy": {"name": "stepavg", "step": 2}}).strategy,
                                    TRAIN, {})  # fmt: skip
    assert isinstance(strategy, StepAvg) and strategy.step == 2.0 and mods == (toy_mod,)
    assert required_client_mods() == (scaffold_mod, toy_mod)
    # bad values, foreign keys and unknown names name the new strategy too
    with pytest.raises(ConfigError, match=r"strategy\.step = -1\.0: .*greater than 0"):
        validate({"strategy": {"name": "stepavg", "step": -1.0}})
    with pytest.raises(
        ConfigError, match=r"strategy\.step = 1: .*'fedprox'.*step belongs to stepavg"
    ):
        validate({"strategy": {"name": "fedprox", "proximal_mu": 1.0, "step": 1}})
    with pytest.raises(ConfigError, match=r"strategy\.name = 'fedfoo': .*'fedasync', 'stepavg'"):
        validate({"strategy": {"name": "fedfoo"}})
    # the server takes it with its own defaults
    cfg = validate_server_config({"model": {"name": "logreg"}, "data": {"dataset": "digits"},
                                  "strategy": {"name": "stepavg", "step": 3}})  # fmt: skip
    assert cfg.strategy.fraction_fit == 1.0 and cfg.strategy.min_available_clients == 2
    strategy, mods, _ = server_strategy(cfg)
    assert isinstance(strategy, StepAvg) and strategy.step == 3.0 and mods == (toy_mod,)


@pytest.mark.usefixtures("toys")
def test_secure_aggregation_asks_the_traits_of_the_built_strategy():
    assert tuple(SECURE_AGGREGATION_STRATEGIES) == (*WEIGHTED_MEANS, "stepavg")
    validate({"strategy": {"name": "stepavg"}, "secure_aggregation": {}})
    # a new name for a median: refused by what it builds, with the traits' reason
    for check in (validate, validate_server_config):
        with pytest.raises(ConfigError) as info:
            check({"strategy": {"name": "mediantoy"}, "secure_aggregation": {}}, "x.toml")
        text = str(info.value)
        assert "x.toml: strategy.name = 'mediantoy': mediantoy cannot run with secure" in text
        assert FedMedian().traits.reason in text and "fedadagrad, stepavg" in text
    for name in ("scaffold", "qfedavg", "fednova", "krum"):
        with pytest.raises(ConfigError, match=f"'{name}': {name} cannot run with secure"):
            validate({"strategy": {"name": name}, "secure_aggregation": {}})


# ------------------------------------------------------------------ secure aggregation defaults


def test_secure_aggregation_keys_and_defaults_are_secaggconfigs():
    fields = {f.name: f.default for f in dataclasses.fields(SecAggConfig)}
    assert list(SecureAggregationConfig.model_fields) == list(fields)
    assert SecureAggregationConfig.model_validate({}).options() == fields
    cfg = validate({"secure_aggregation": {"bits": 16}})
    assert cfg.secure_aggregation is not None
    assert cfg.secure_aggregation.options() == {**fields, "bits": 16}
    SecAggConfig(**cfg.secure_aggregation.options())  # what start_simulation builds


@pytest.mark.parametrize(
    ("key", "bad", "good"),
    [("bits", 63, 20), ("bits", 0, 1), ("clip", 0.0, 1e-3), ("max_clients", 1, 2),
     ("corrupt_fraction", 0.5, 0.49), ("dropout_fraction", -0.1, 0.0),
     ("failure_probability", 1.0, 0.5), ("threshold", 0, 1), ("ring_bits", 48, 64)],
)  # fmt: skip
def test_the_cli_bounds_agree_with_secaggconfig(key, bad, good):
    with pytest.raises(ConfigError):
        SecAggConfig(**{key: bad})
    with pytest.raises(ConfigError, match=rf"secure_aggregation\.{key} = "):
        validate({"secure_aggregation": {key: bad}})
    SecAggConfig(**{key: good})
    validate({"secure_aggregation": {key: good}})


# -------------------------------------------------------------------------- simulation backends


def test_the_simulation_backend_is_any_registered_one(monkeypatch):
    from fedhive.simulation import backend_names, register_backend
    from fedhive.simulation.backends import ThreadBackend, unregister_backend

    with pytest.raises(ConfigError) as info:
        validate({"simulation": {"backend": "threads"}}, "exp.toml")
    text = str(info.value)
    assert "exp.toml: simulation.backend = 'threads'" in text
    assert all(repr(name) in text for name in backend_names())
    register_backend("inline-test", ThreadBackend)
    try:
        assert validate({"simulation": {"backend": "inline-test"}}).simulation.backend == (
            "inline-test"
        )
    finally:
        unregister_backend("inline-test")
    with pytest.raises(ConfigError, match="inline-test"):
        validate({"simulation": {"backend": "inline-test"}})
