"""`[strategy] name = ...` in the experiment config: every strategy by name, its parameters,
validation at the edge, and short `fedhive run`s with FedProx and SCAFFOLD."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli_helpers import run_toml
from fedhive.cli import app
from fedhive.cli.config import STRATEGY_PARAMETERS, load_config, validate
from fedhive.cli.experiment import (
    STRATEGIES,
    ClientFactory,
    ModelSpec,
    build_strategy,
    weighted_average,
)
from fedhive.client.mods import scaffold_mod
from fedhive.common import ConfigError, ndarrays_to_parameters
from fedhive.server import ServerConfig
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
)
from fedhive.server.strategy.fednova import local_norm
from fedhive.simulation import start_simulation

runner = CliRunner()
TRAIN = {"local_epochs": 1, "batch_size": 10, "lr": 0.05, "momentum": 0.9}

# name -> (class, parameters set in the TOML, {attribute: expected value})
CASES = {
    "fedavg": (FedAvg, {}, {}),
    "fedprox": (FedProx, {"proximal_mu": 1.0}, {"proximal_mu": 1.0}),
    "fedavgm": (
        FedAvgM,
        {"server_momentum": 0.9, "server_learning_rate": 0.5},
        {"server_momentum": 0.9, "server_learning_rate": 0.5},
    ),
    "fedadam": (
        FedAdam,
        {"eta": 0.01, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3, "bias_correction": True},
        {"eta": 0.01, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3},
    ),
    "fedyogi": (FedYogi, {"eta": 0.02, "tau": 1e-4}, {"eta": 0.02, "tau": 1e-4, "beta_1": 0.9}),
    "fedadagrad": (FedAdagrad, {"eta": 0.3, "beta_1": 0.5}, {"eta": 0.3, "beta_1": 0.5}),
    "qfedavg": (
        QFedAvg,
        {"q_param": 1.0, "qffl_learning_rate": 0.2},
        {"q_param": 1.0, "qffl_learning_rate": 0.2},
    ),
    "fedmedian": (FedMedian, {}, {}),
    "fedtrimmedavg": (FedTrimmedAvg, {"beta": 0.2}, {"beta": 0.2}),
    "krum": (
        Krum,
        {"num_malicious_clients": 2, "num_clients_to_keep": 3},
        {"num_malicious_clients": 2, "num_clients_to_keep": 3},
    ),
    "multikrum": (MultiKrum, {"num_malicious_clients": 2}, {"num_malicious_clients": 2}),
    "bulyan": (
        Bulyan,
        {"num_malicious_clients": 1, "to_keep": 2},
        {"num_malicious_clients": 1, "to_keep": 2},
    ),
    "scaffold": (Scaffold, {"server_learning_rate": 0.8}, {"server_learning_rate": 0.8}),
    "fednova": (
        FedNova,
        {"server_learning_rate": 0.9, "local_momentum": 0.5},
        {"server_learning_rate": 0.9, "local_momentum": 0.5},
    ),
    "fedbuff": (
        FedBuff,
        {"buffer_size": 5, "concurrency": 8, "server_lr": 0.5, "staleness": "hinge"},
        {"buffer_size": 5, "concurrency": 8, "server_lr": 0.5},
    ),
    "fedasync": (FedAsync, {"alpha": 0.9, "concurrency": 4}, {"alpha": 0.9, "concurrency": 4}),
}


def fedavg_args() -> dict:
    return {
        "fraction_fit": 0.5,
        "min_fit_clients": 2,
        "min_available_clients": 2,
        "initial_parameters": ndarrays_to_parameters([np.zeros((3, 2), np.float32)]),
    }


def build(name: str, params: dict, num_clients: int = 20):
    cfg = validate(
        {"num_clients": num_clients, "strategy": {"name": name, "fraction_fit": 0.5, **params}},
        "exp.toml",
    )
    return build_strategy(cfg.strategy, TRAIN, fedavg_args())


def test_every_name_is_covered():
    assert set(CASES) == set(STRATEGY_PARAMETERS) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_name_builds_its_class_with_the_given_parameters(name):
    cls, params, expected = CASES[name]
    strategy, mods = build(name, params)
    assert type(strategy) is cls
    for attr, value in expected.items():
        assert getattr(strategy, attr) == pytest.approx(value), attr
    sampling = strategy if isinstance(strategy, FedAvg) else strategy.sampling
    assert sampling.fraction_fit == 0.5  # FedAvg's keys are passed on too
    assert mods == ((scaffold_mod,) if name == "scaffold" else ())


def test_unset_parameters_keep_the_class_defaults_or_follow_the_clients():
    adam, _ = build("fedadam", {})
    assert (adam.eta, adam.tau, adam.beta_2) == (0.1, 1e-9, 0.99)  # FedAdam's defaults
    assert adam.server_optimizer.bias_correction == "flower"  # Flower's FedAdam
    trimmed, _ = build("fedtrimmedavg", {})
    assert trimmed.beta == 0.2
    qffl, _ = build("qfedavg", {})
    assert qffl.qffl_learning_rate == TRAIN["lr"]  # the CLI's clients train with train.lr
    nova, _ = build("fednova", {})
    assert nova.local_momentum == TRAIN["momentum"]


def test_a_foreign_parameter_is_refused_naming_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        validate({"strategy": {"name": "fedprox", "proximal_mu": 1.0, "server_momentum": 0.9}})
    text = str(info.value)
    assert "strategy.server_momentum = 0.9" in text
    assert "'fedprox'" in text and "proximal_mu" in text  # what fedprox takes
    assert "fedavgm" in text  # where the key belongs
    with pytest.raises(ConfigError, match=r"strategy\.beta = 0\.1: .*'fedavg'.*none"):
        validate({"strategy": {"beta": 0.1}})
    with pytest.raises(ConfigError, match=r"strategy\.to_keep = 2: .*'krum'"):
        validate({"strategy": {"name": "krum", "to_keep": 2}})


def test_bad_values_and_missing_or_unknown_keys_are_refused():
    cases = [
        ({"name": "fedprox", "proximal_mu": -1}, r"strategy\.proximal_mu = -1: .*greater than"),
        ({"name": "fedprox", "proximal_mu": float("nan")}, r"strategy\.proximal_mu = nan"),
        ({"name": "fedprox"}, r"strategy\.proximal_mu is missing: .*'fedprox' needs"),
        ({"name": "fedavgm", "server_momentum": 1.0}, r"server_momentum = 1\.0: .*less than 1"),
        ({"name": "fedtrimmedavg", "beta": 0.5}, r"strategy\.beta = 0\.5: .*less than 0\.5"),
        ({"name": "krum", "num_malicious_clients": 1.5}, r"num_malicious_clients = 1\.5"),
        ({"name": "fedadam", "eta_l": 0.01}, r"strategy\.eta_l = 0\.01: .*train\.lr"),
        ({"name": "fedsgd"}, r"strategy\.name = 'fedsgd': .*'fedprox'"),
        ({"name": "fedprox", "mu": 1.0}, r"unknown key 'strategy\.mu' .*proximal_mu"),
    ]
    for table, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            validate({"strategy": table}, "exp.toml")


def test_a_robust_rule_needs_enough_clients_per_round():
    # 100 clients x fraction_fit 0.1 = 10 per round; Bulyan with f = 2 needs 11.
    with pytest.raises(ConfigError) as info:
        validate({"strategy": {"name": "bulyan", "num_malicious_clients": 2}}, "exp.toml")
    text = str(info.value)
    assert "strategy.num_malicious_clients = 2" in text and "11" in text and "10" in text
    validate({"strategy": {"name": "bulyan", "num_malicious_clients": 2, "min_fit_clients": 11}})
    with pytest.raises(ConfigError, match=r"num_clients_to_keep = 20: .*20 clients per round"):
        validate({"strategy": {"name": "multikrum", "num_clients_to_keep": 20}})


def test_defaults_are_unchanged():
    cfg = validate({})
    assert cfg.strategy.name == "fedavg" and cfg.strategy.parameters() == {}


def test_sim_client_reports_the_effective_learning_rate_under_scaffold_momentum():
    """SCAFFOLD's Option II variate divides the move by K lr; with momentum the move is
    lr ||a||_1 (FedNova's local_norm), so the client reports that rate."""
    spec = ModelSpec("logreg", 4, 3, 0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, size=30)
    factory = ClientFactory(spec, x, y, [(np.arange(30), np.arange(0))])
    config = {"local_epochs": 1, "batch_size": 10, "lr": 0.1, "momentum": 0.9, "scaffold": True}
    hist = start_simulation(
        client_fn=factory,
        num_clients=1,
        config=ServerConfig(num_rounds=1),
        strategy=Scaffold(
            min_fit_clients=1,
            min_available_clients=1,
            fraction_evaluate=0.0,
            on_fit_config_fn=lambda rnd: {k: v for k, v in config.items() if k != "scaffold"},
            initial_parameters=ndarrays_to_parameters(spec.initial(0)),
            fit_metrics_aggregation_fn=weighted_average,
        ),
        mods=[scaffold_mod],
        seed=0,
    )
    metrics = hist.metrics_distributed_fit
    assert metrics["lr"][0][1] == pytest.approx(0.1 * local_norm(3, 0.9) / 3)


@pytest.mark.parametrize(("name", "params"), [("fedprox", "proximal_mu = 1.0"), ("scaffold", "")])
def test_fedhive_run_with_a_named_strategy(tmp_path, name, params):
    out = tmp_path / name
    cfg = tmp_path / "exp.toml"
    cfg.write_text(run_toml(out, strategy=f'name = "{name}"\n{params}'))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # every sampled client trained (SCAFFOLD: the mod was installed)
        assert r["fit"]["num_results"] == 4 and r["fit"]["num_failures"] == 0, r["fit"]
    start = history["rounds"][0]["centralized"]["accuracy"]  # round 0: the initial model
    assert rounds[-1]["centralized"]["accuracy"] > start + 0.2
    saved = validate(load_config(out / "config.toml"))  # what --resume reads back
    assert saved.strategy.name == name
    if name == "fedprox":
        assert saved.strategy.proximal_mu == 1.0


def test_fedhive_run_refuses_a_foreign_parameter(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(run_toml(tmp_path, strategy='name = "fedprox"\nproximal_mu = 1\neta = 1'))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 2
    assert "strategy.eta" in result.output and "proximal_mu" in result.output
