"""Deployment as a new user meets it: the server serves the clients' own model, and
failures show where people look (server console, client log, exit status)."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from deploy_helpers import APPS, ROOT, fedhive, script, stop_all
from fedhive.cli.deploy import validate_server_config
from fedhive.cli.server_cmd import server_strategy
from fedhive.common import ConfigError
from fedhive.data import load_digits
from fedhive.server.checkpoint import load_npz, save_npz

CLIENT_SERVER = """\
rounds = {rounds}
round_timeout = 30
wait_timeout = 30
out = "out"
{extra}
"""


@pytest.fixture(autouse=True)
def _reap():
    yield
    stop_all()


def _serve(tmp_path, toml: str):
    (tmp_path / "server.toml").write_text(toml)
    server = fedhive(
        tmp_path, "server", "server", "server.toml", "--insecure", "--address", "127.0.0.1:0"
    )
    return server, f"127.0.0.1:{server.port()}"


def _layout_client(tmp_path, address: str, node: str):
    return fedhive(
        tmp_path,
        node,
        "client",
        "--server",
        address,
        "--insecure",
        "--app",
        "layout_app:client_fn",
        "--app-dir",
        str(APPS),
        "--node-id",
        node,
        "--max-retries",
        "5",
    )


def _federation(tmp_path, toml: str, nodes: list[str]):
    server, address = _serve(tmp_path, toml)
    clients = [_layout_client(tmp_path, address, node) for node in nodes]
    code = server.wait()
    codes = [c.wait() for c in clients]
    return server, clients, code, codes


# ------------------------------------------------------------------ the clients' model


def test_the_default_server_takes_its_model_from_a_client(tmp_path):
    server, clients, code, codes = _federation(
        tmp_path, CLIENT_SERVER.format(rounds=2, extra=""), ["site-a", "site-b"]
    )
    assert code == 0, server.stderr
    assert codes == [0, 0], [c.stderr for c in clients]
    assert "initial parameters from one client's get_parameters" in server.stderr
    final = load_npz(tmp_path / "out" / "final_model.npz")
    # the client's zeros, plus 1 per round (FedAvg of two identical updates)
    assert [a.shape for a in final] == [(4,), (2, 3)]
    np.testing.assert_allclose(final[0], 2.0)


def test_initial_parameters_from_a_file(tmp_path):
    save_npz(tmp_path / "init.npz", [np.full(4, 10.0, np.float32), np.ones((2, 3), np.float32)])
    toml = CLIENT_SERVER.format(rounds=2, extra='[model]\ninitial_parameters = "init.npz"')
    server, _, code, codes = _federation(tmp_path, toml, ["site-a", "site-b"])
    assert code == 0 and codes == [0, 0], server.stderr
    assert "initial parameters from init.npz" in server.stderr
    final = load_npz(tmp_path / "out" / "final_model.npz")
    np.testing.assert_allclose(final[0], 12.0)
    np.testing.assert_allclose(final[1], 3.0)


def test_a_client_with_another_layout_is_refused_naming_array_and_shapes(tmp_path):
    toml = CLIENT_SERVER.format(rounds=1, extra="")
    server, _, code, codes = _federation(tmp_path, toml, ["narrow", "wide"])
    assert code == 0 and codes == [0, 0], server.stderr  # one client's model was taken
    found = re.search(
        r"round 1: fit failed on 1 client \((narrow|wide)\): array 0 has shape \((\d),\), "
        r"expected \((\d),\)",
        server.stderr,
    )
    assert found, server.stderr
    refused, got, expected = found.groups()
    assert {got, expected} == {"4", "5"} and got == ("5" if refused == "wide" else "4")
    assert "(1 fit results, 1 failures)" in server.stderr


def test_initial_parameters_file_errors(tmp_path):
    def strategy_for(model):
        cfg = validate_server_config({"model": model, "data": {"dataset": "digits"}})
        return server_strategy(cfg)

    with pytest.raises(ConfigError, match=r"model\.initial_parameters: cannot read"):
        strategy_for({"initial_parameters": str(tmp_path / "missing.npz")})
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match=r"is not a \.npz of arrays arr_0"):
        strategy_for({"initial_parameters": str(tmp_path / "junk.npz")})
    save_npz(tmp_path / "small.npz", [np.zeros((3, 3)), np.zeros(3)])
    with pytest.raises(
        ConfigError,
        match=r"array 0 of .*small\.npz \(logreg\): expected shape \(64, 10\), "
        r"received \(3, 3\)",
    ):
        strategy_for({"name": "logreg", "initial_parameters": str(tmp_path / "small.npz")})
    # a server optimizer needs a model before any client is asked
    cfg = validate_server_config({"strategy": {"name": "fedadam"}})
    with pytest.raises(ConfigError, match=r"FedAdam needs initial_parameters.*\[model\] "):
        server_strategy(cfg)
    strategy, _, data = server_strategy(validate_server_config({}))
    assert data is None and strategy.initialize_parameters(None) is None


# ------------------------------------------------------------------ visible failures


def test_a_run_without_a_single_fit_result_fails_loudly(tmp_path):
    toml = CLIENT_SERVER.format(rounds=2, extra="")
    server, clients, code, _ = _federation(tmp_path, toml, ["broken-1", "broken-2"])
    assert code == 1, server.stderr
    err = server.stderr
    line = re.search(
        r"round 1: fit failed on 2 clients \((broken-\d), (broken-\d)\): ValueError: "
        r"this site's data failed to load",
        err,
    )
    assert line and set(line.groups()) == {"broken-1", "broken-2"}, err
    assert err.count("fit failed on 2 clients") == 2  # one line per round, not per client
    assert "warning: round 2: no fit result succeeded (2 clients asked)" in err
    assert "error: no client's fit succeeded in 2 rounds" in err
    # the summary counts fit failures (2 per round); evaluation succeeded
    assert re.search(r"client failures\s+│\s+4", server.stdout), server.stdout
    for client in clients:
        assert "Traceback (most recent call last)" in client.stderr, client.stderr
        assert "ValueError: this site's data failed to load" in client.stderr
        assert "fit of round 1 failed; the server is told" in client.stderr


def test_the_summary_counts_evaluate_failures(tmp_path):
    from fedhive.cli.progress import summary_table
    from fedhive.server.history import History

    history = History()
    failure = {"client_id": "a", "round": 1, "stage": "evaluate", "reason": "x"}
    history.add_round(
        {
            "round": 1,
            "fit": {"num_clients": 1, "num_results": 1},
            "failures": [{**failure, "stage": "fit"}],
            "distributed": {"loss": None, "failures": [failure, {**failure, "client_id": "b"}]},
        }
    )
    table = summary_table(history, "out")
    rows = dict(zip(table.columns[0]._cells, table.columns[1]._cells, strict=True))
    assert rows["client failures"] == "3"


@pytest.mark.slow
def test_the_tutorial_keras_client_against_a_server_with_no_model(tmp_path):
    """The tutorial's Keras client (only the import changed), two processes, against
    ``fedhive server`` with no model configured: the federation improves the model."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("the 'keras' package (Keras 3) is not installed: pip install keras")
    server = fedhive(
        tmp_path,
        "server",
        "server",
        "--insecure",
        "--address",
        "127.0.0.1:0",
        "--rounds",
        "3",
        "--out",
        "out",
    )
    address = f"127.0.0.1:{server.port()}"
    clients = [
        script(
            tmp_path,
            f"keras{i}",
            ROOT / "examples" / "keras" / "tutorial_client.py",
            address,
            str(i),
            "2",
            str(tmp_path / f"initial{i}.npz"),
        )
        for i in range(2)
    ]
    assert server.wait(120) == 0, server.stderr
    assert [c.wait(120) for c in clients] == [0, 0], [c.stderr for c in clients]
    assert "(2 fit results, 0 failures" in server.stderr
    # the tutorial's client has no evaluate(): said once per client, counted per round
    for client in clients:
        assert client.stderr.count("does not implement evaluate") == 1, client.stderr
    data = load_digits(seed=0)

    def accuracy(w):
        hidden = np.maximum(data.x_test @ w[0] + w[1], 0.0)
        return float(((hidden @ w[2] + w[3]).argmax(1) == data.y_test).mean())

    final = accuracy(load_npz(tmp_path / "out" / "final_model.npz"))
    initial = max(accuracy(load_npz(tmp_path / f"initial{i}.npz")) for i in range(2))
    assert final > 0.4 and final > initial + 0.25, (initial, final)
