"""`[strategy] name = ...` in the config of `fedhive server`: the same names, parameters and
validation as `fedhive run`, refusals in-process, and real federations as processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deploy_helpers import APPS, DEMO, TINY_SERVER, fedhive
from fedhive.cli import app
from fedhive.cli.deploy import server_strategy, validate_server_config
from fedhive.cli.experiment import ModelSpec
from fedhive.common import ConfigError
from fedhive.server.checkpoint import load_npz
from fedhive.server.strategy import FedAdam, FedAvg, FedProx, Krum

runner = CliRunner()

# deploy_helpers' tiny server config with a [strategy] line to fill in
SERVER = TINY_SERVER.replace(
    "min_available_clients = 2\n", "min_available_clients = 2\n{strategy}\n"
)

SMALL = {"model": {"name": "logreg"}, "data": {"dataset": "digits"}}


pytestmark = pytest.mark.usefixtures("restore_process_state")


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    ("table", "cls", "attrs"),
    [
        ({}, FedAvg, {}),
        ({"name": "fedprox", "proximal_mu": 0.5}, FedProx, {"proximal_mu": 0.5}),
        ({"name": "fedadam", "eta": 0.02, "tau": 1e-4}, FedAdam, {"eta": 0.02, "tau": 1e-4}),
        (
            {"name": "krum", "num_malicious_clients": 1, "min_available_clients": 5},
            Krum,
            {"num_malicious_clients": 1},
        ),
    ],
)
def test_the_server_builds_the_strategy_the_config_names(table, cls, attrs):
    cfg = validate_server_config({**SMALL, "strategy": table})
    strategy, mods, data = server_strategy(cfg)
    assert type(strategy) is cls and mods == () and data.name == "digits"
    # every connected site fits (fraction_fit 1.0); rounds wait for min_available_clients
    sampling = getattr(strategy, "sampling", strategy)  # composed strategies hold a FedAvg
    assert sampling.num_fit_clients(10) == (10, table.get("min_available_clients", 2))
    for name, value in attrs.items():
        assert getattr(strategy, name) == value, name


def test_scaffold_asks_for_the_client_mod():
    cfg = validate_server_config({**SMALL, "strategy": {"name": "scaffold"}})
    _, mods, _ = server_strategy(cfg)
    assert [m.__name__ for m in mods] == ["scaffold_mod"]


@pytest.mark.parametrize(
    ("strategy", "messages"),
    [
        ('name = "fedfoo"', ["strategy.name = 'fedfoo'", "'fedprox'", "'fedadam'"]),
        ('name = "fedadam"\nproximal_mu = 1.0', ["not a parameter of strategy 'fedadam'"]),
        ('name = "fedprox"', ["strategy.proximal_mu is missing", "'fedprox' needs"]),
        ('name = "fedprox"\nmu = 1.0', ["unknown key 'strategy.mu'", "proximal_mu"]),
        ('name = "fedadam"\neta_l = 0.1', ["strategy.eta_l = 0.1", "train.lr"]),
        (
            'name = "krum"\nnum_malicious_clients = 1',
            ["strategy.num_malicious_clients = 1", "5 clients per round", "min_available_clients"],
        ),
    ],
)
def test_bad_strategy_tables_stop_the_server_with_a_clear_message(tmp_path, strategy, messages):
    cfg = tmp_path / "server.toml"
    cfg.write_text(SERVER.format(rounds=1, strategy=strategy))
    result = invoke("server", str(cfg), "--insecure", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "invalid server configuration" in result.output
    for message in messages:
        assert message in result.output, (message, result.output)
    assert not (tmp_path / "out").exists()


def test_set_names_the_strategy_too(tmp_path):
    result = invoke("server", "--insecure", "--set", "strategy.name=median")
    assert result.exit_code == 2 and "--set: strategy.name = 'median'" in result.output
    with pytest.raises(ConfigError, match=r"strategy\.name = 'median'.*'fedmedian'"):
        validate_server_config({"strategy": {"name": "median"}})
    cfg = validate_server_config({"strategy": {"name": "fedmedian"}})
    assert cfg.strategy.name == "fedmedian" and cfg.strategy.fraction_fit == 1.0


# --------------------------------------------------------------------------- federations


def _serve_with_echo_clients(tmp_path, strategy: str) -> tuple[str, dict]:
    """One round with two EchoClients; the server's stderr and history.json."""
    (tmp_path / "server.toml").write_text(SERVER.format(rounds=1, strategy=strategy))
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0"
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        base = ["client", "--server", address, "--insecure", "--app-dir", str(APPS)]
        clients = [
            fedhive(tmp_path, f"c{i}", *base, "--app", "strategy_app:client_fn") for i in range(2)
        ]
        assert server.wait() == 0, server.stderr
        assert [c.wait() for c in clients] == [0, 0], [c.stderr for c in clients]
    finally:
        server.stop()
    return server.stderr, json.loads((tmp_path / "out" / "history.json").read_text())


def _model_step(tmp_path) -> list[np.ndarray]:
    """The final model minus the initial one (the server's seed 0)."""
    initial = ModelSpec("logreg", 64, 10, 128).initial(0)
    final = load_npz(tmp_path / "out" / "final_model.npz")
    return [f.astype(np.float64) - i for f, i in zip(final, initial, strict=True)]


def test_a_fedprox_server_sends_proximal_mu_to_its_sites(tmp_path):
    stderr, history = _serve_with_echo_clients(tmp_path, 'name = "fedprox"\nproximal_mu = 0.5')
    assert "strategy fedprox (proximal_mu = 0.5)" in stderr
    assert history["config"]["strategy"]["name"] == "fedprox"
    fit = history["rounds"][-1]["fit"]
    assert fit["num_results"] == 2 and fit["metrics"]["proximal_mu"] == 0.5
    for step in _model_step(tmp_path):  # FedProx averages like FedAvg: every site moved 1
        np.testing.assert_allclose(step, 1.0, atol=1e-5)


def test_a_fedadam_server_takes_adam_steps(tmp_path):
    strategy = 'name = "fedadam"\neta = 0.01\nbeta_1 = 0.9\nbeta_2 = 0.99\ntau = 0.001'
    stderr, history = _serve_with_echo_clients(tmp_path, strategy)
    assert "strategy fedadam (eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 0.001)" in stderr
    assert history["config"]["strategy"]["eta"] == 0.01
    assert "proximal_mu" not in history["rounds"][-1]["fit"]["metrics"]
    # Flower's FedAdam (the default under its name) from m = v = 0 with the mean update 1:
    # m = 1 - beta_1, v = 1 - beta_2 and a bias-corrected step of
    # eta sqrt(1 - beta_2^2) / (1 - beta_1^2) m / (sqrt(v) + tau), not FedAvg's 1
    expected = 0.01 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) * 0.1 / (np.sqrt(0.01) + 1e-3)
    for step in _model_step(tmp_path):
        np.testing.assert_allclose(step, expected, rtol=1e-4)


def test_a_scaffold_server_with_demo_clients(tmp_path):
    (tmp_path / "server.toml").write_text(SERVER.format(rounds=2, strategy='name = "scaffold"'))
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0"
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        base = ["client", "--server", address, "--insecure", *DEMO, "--max-retries", "5"]
        clients = [fedhive(tmp_path, f"c{i}", *base, "--partition-id", str(i)) for i in range(2)]
        assert server.wait() == 0, server.stderr
        assert [c.wait() for c in clients] == [0, 0], [c.stderr for c in clients]
    finally:
        server.stop()
    assert "strategy scaffold; every client must run fedhive.client.mods.scaffold_mod" in (
        server.stderr
    )
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert all(r["fit"]["num_results"] == 2 and not r["failures"] for r in rounds[1:])
    assert rounds[-1]["centralized"]["accuracy"] > 0.6


# --------------------------------------------------------------------------- [memory]


def test_the_memory_table_maps_onto_start_server(tmp_path):
    cfg = validate_server_config({"memory": {"spill_bytes": 0, "upload_window_bytes": 1 << 20,
                                             "spill_dir": str(tmp_path)}})  # fmt: skip
    assert cfg.memory.server_options() == {
        "spill_bytes": None,  # 0: never spill
        "spill_dir": str(tmp_path),
        "max_staged_uploads": 2,
        "max_staged_bytes": 64 << 20,
        "upload_window_bytes": 1 << 20,
        "min_upload_rate": 65536.0,
        "upload_grace_s": 10.0,
    }
    slow = validate_server_config({"memory": {"min_upload_rate": 1000, "upload_grace_s": 30}})
    assert slow.memory.server_options()["min_upload_rate"] == 1000.0
    for bad in ({"min_upload_rate": -1}, {"upload_grace_s": 0}, {"upload_grace_s": "inf"}):
        with pytest.raises(ConfigError):
            validate_server_config({"memory": bad})
    defaults = validate_server_config({}).memory.server_options()
    assert defaults["spill_bytes"] == 64 << 20 and defaults["upload_window_bytes"] is None


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"accumulator": "float16"}, "memory.accumulator"),
        ({"spill_dir": "/no/such/dir"}, "is not a directory"),
        ({"spill_bytes": -1}, "memory.spill_bytes"),
        ({"spil_bytes": 1}, "memory.spil_bytes"),
    ],
)
def test_bad_memory_tables_are_refused(memory, message):
    with pytest.raises(ConfigError, match=message):
        validate_server_config({"memory": memory})


def test_the_float32_accumulator_reaches_fedavg_and_is_refused_elsewhere():
    for table in ({}, {"name": "fedprox", "proximal_mu": 0.1}, {"name": "fedadam"}):
        cfg = validate_server_config({**SMALL, "strategy": table,
                                      "memory": {"accumulator": "model"}})  # fmt: skip
        strategy, _, _ = server_strategy(cfg)
        holder = getattr(strategy, "rule", strategy)  # composed strategies: their mean rule
        assert holder.accumulator == "model"
    assert FedAvg.accumulator == "float64"  # set on the instance only
    cfg = validate_server_config({**SMALL, "strategy": {"name": "fedmedian"},
                                  "memory": {"accumulator": "model"}})  # fmt: skip
    with pytest.raises(ConfigError, match="keeps a float64 aggregate"):
        server_strategy(cfg)


def test_a_server_spilling_every_upload_to_disk(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    memory = (
        f'\n[memory]\naccumulator = "model"\nspill_bytes = 1\nspill_dir = "{spill}"\n'
        "upload_window_bytes = 65536\n"
    )
    _, history = _serve_with_echo_clients(tmp_path, memory)
    assert history["config"]["memory"]["spill_bytes"] == 1
    assert history["rounds"][-1]["fit"]["num_results"] == 2
    for step in _model_step(tmp_path):  # every site moved 1
        np.testing.assert_allclose(step, 1.0, atol=1e-5)
    assert list(spill.iterdir()) == []
