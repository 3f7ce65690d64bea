"""`fedhive server` and `fedhive client`: refusals in-process, real federations as processes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deploy_helpers import APPS, DEMO, TINY_SERVER, demo_federation, fedhive
from fedhive.cli import app
from fedhive.cli.deploy import DeployConfig, load_tokens, validate_server_config
from fedhive.common import ConfigError
from grpc_helpers import make_certificates

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("restore_process_state")


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- refusals


def test_server_refuses_to_start_without_tls_or_insecure(tmp_path):
    result = invoke("server", "--rounds", "1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "requires TLS" in result.output and "--insecure" in result.output
    assert "--cert" in result.output and "--key" in result.output
    assert "[tls] table" in result.output  # not taken for console markup
    assert not (tmp_path / "out").exists()  # nothing was started or written


def test_server_tls_contradictions_are_clear(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    result = invoke("server", "--insecure", "--require-client-auth")
    assert result.exit_code == 2 and "needs TLS" in result.output
    result = invoke("server", "--cert", str(pem), "--key", str(pem), "--require-client-auth")
    assert result.exit_code == 2 and "--ca" in result.output
    result = invoke("server", "--insecure", "--cert", str(pem))
    assert result.exit_code == 2 and "requires TLS" in result.output  # a key is missing
    result = invoke("server", "--cert", str(tmp_path / "missing.pem"), "--key", str(pem))
    assert result.exit_code == 2 and "cannot read server certificate" in result.output


def test_server_refuses_to_start_without_client_authentication_unless_insecure(tmp_path):
    certs = make_certificates(tmp_path)
    tls = ["--cert", str(certs["server"]), "--key", str(certs["server_key"])]
    out = tmp_path / "out"
    result = invoke("server", *tls, "--rounds", "1", "--out", str(out))
    assert result.exit_code == 2
    assert "requires client authentication" in result.output
    for flag in ("--tokens", "--require-client-auth", "--insecure"):
        assert flag in result.output
    assert not out.exists()  # nothing was started or written


@pytest.mark.slow  # two short server runs
def test_server_with_tls_serves_enrolled_clients_or_anyone_with_insecure(tmp_path):
    certs = make_certificates(tmp_path)
    tls = ["--cert", str(certs["server"]), "--key", str(certs["server_key"])]
    out = tmp_path / "out"
    # --insecure with TLS: TLS, and anyone may join (said in the listening line); nobody
    # joins this one-round run within its wait
    config = tmp_path / "server.toml"
    config.write_text(TINY_SERVER.format(rounds=1))
    quick = [str(config), "--address", "127.0.0.1:0", "--set", "wait_timeout=0.1"]
    result = invoke("server", *quick, *tls, "--insecure", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "(TLS, NO CLIENT AUTHENTICATION)" in result.output
    # enrolled clients (tokens) are client authentication
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('site-0 = "a-long-secret"\n')
    result = invoke("server", *quick, *tls, "--tokens", str(tokens), "--out", str(tmp_path / "t"))
    assert result.exit_code == 0, result.output
    assert "listening on 127.0.0.1" in result.output and "(TLS)" in result.output


def test_client_refuses_to_start_without_tls_or_insecure():
    result = invoke("client", "--server", "127.0.0.1:1", "--demo")
    assert result.exit_code == 2
    assert "requires TLS" in result.output and "--root-certificates" in result.output
    assert "--insecure" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --app"),
        (["--demo", "--app", "x:y"], "exactly one of --app"),
        (["--app", "nocolon"], "MODULE:ATTRIBUTE"),
        (["--app", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
        (["--app", "deploy_app:missing"], "has no attribute 'missing'"),
        (["--app", "deploy_app:not_a_client"], "got int"),
        (["--demo", "--partition-id", "3", "--num-partitions", "2"], "--partition-id must be"),
        (["--demo", "--partition", "random"], "--partition = 'random'"),
        (["--demo", "--model", "resnet"], "--model = 'resnet'"),
        (["--demo", "--token", "a", "--token-file", "t.txt"], "not both"),
        (["--demo", "--cert", "c.pem"], "both --cert and --key"),
        (["--demo", "--policy", "missing.toml"], "cannot read policy file"),
    ],
)
def test_client_option_errors_are_clear(args, message):
    base = ["client", "--server", "127.0.0.1:1", "--insecure", "--app-dir", str(APPS)]
    if "--cert" in args:
        base.remove("--insecure")
        base += ["--root-certificates", "ca.pem"]
    result = invoke(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_server_config_errors_name_key_value_and_allowed(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text("rounds = 2\n[strategy]\nfraction_fitt = 0.5\n")
    result = invoke("server", str(cfg), "--insecure")
    assert result.exit_code == 2
    assert "strategy.fraction_fitt" in result.output and "0.5" in result.output
    assert "fraction_fit" in result.output.split("allowed keys here:")[1]
    with pytest.raises(ConfigError, match=r"model\.name = 'resnet'"):
        validate_server_config({"model": {"name": "resnet"}})
    with pytest.raises(ConfigError, match=r"unknown key 'adress'.*allowed keys here: address"):
        validate_server_config({"adress": "x"})
    assert DeployConfig().rounds == 10 and DeployConfig().tls.cert == ""


def test_tokens_files_in_toml_or_json(tmp_path):
    toml = tmp_path / "tokens.toml"
    toml.write_text('alice = "a-secret"\nbob = "b-secret"\n')
    assert load_tokens(toml) == {"alice": "a-secret", "bob": "b-secret"}
    js = tmp_path / "tokens.json"
    js.write_text(json.dumps({"alice": "a-secret"}))
    assert load_tokens(js) == {"alice": "a-secret"}
    js.write_text(json.dumps({"alice": 3}))
    with pytest.raises(ConfigError, match="token of 'alice' must be a non-empty string"):
        load_tokens(js)
    js.write_text("{}")
    with pytest.raises(ConfigError, match="enrolls no client"):
        load_tokens(js)
    js.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_tokens(js)


def test_help_lists_the_deployment_options():
    client_options = (
        "--server --app --demo --insecure --root-certificates --cert --key --node-id --token "
        "--token-file --policy --audit-log --persistent --max-retries --partition-id "
        "--num-partitions"
    )
    result = invoke("client", "--help")
    for option in client_options.split():
        assert option in result.output, option
    server_options = (
        "CONFIG.toml --insecure --ca --cert --key --tokens --require-client-auth "
        "--checkpoint-dir --resume --set"
    )
    result = invoke("server", "--help")
    for option in server_options.split():
        assert option in result.output, option


# --------------------------------------------------------------------------- real federations


def test_three_process_federation_via_the_clis(tmp_path):
    server, clients = demo_federation(tmp_path, TINY_SERVER.format(rounds=2))
    out = tmp_path / "out"
    for name in ("history.json", "metrics.csv", "config.toml", "final_model.npz"):
        assert (out / name).exists(), name
    assert (out / "checkpoints" / "LATEST").exists()
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["fit"]["num_results"] == 2 and not r["failures"] for r in rounds[1:])
    assert rounds[-1]["centralized"]["accuracy"] > 0.6
    assert len(rounds[-1]["distributed"]["clients"]) == 2
    assert "INSECURE" in server.stderr and "round 2/2" in server.stderr
    assert "summary" in server.stdout
    assert "demo client: partition 1 of 2" in clients[1].stderr

    # resuming a finished run needs no client: it reloads the checkpoint and writes again
    (out / "history.json").unlink()
    result = invoke(
        "server",
        str(tmp_path / "server.toml"),
        "--insecure",
        "--resume",
        "--address",
        "127.0.0.1:0",
        "--out",
        str(out),
        "--log-level",
        "warning",
    )
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "history.json").read_text())["rounds"]
    assert resumed == rounds


def test_tls_federation_with_mutual_auth_tokens_and_audit_via_the_clis(tmp_path):
    certs = make_certificates(tmp_path)
    (tmp_path / "server.toml").write_text(TINY_SERVER.format(rounds=1))
    (tmp_path / "tokens.json").write_text(json.dumps({"alice": "a-s3cret", "bob": "b-s3cret"}))
    (tmp_path / "bob.token").write_text("b-s3cret\n")
    server = fedhive(
        tmp_path,
        "server",
        "server",
        "server.toml",
        "--address",
        "127.0.0.1:0",
        "--ca",
        str(certs["ca"]),
        "--cert",
        str(certs["server"]),
        "--key",
        str(certs["server_key"]),
        "--require-client-auth",
        "--tokens",
        "tokens.json",
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        tls = [
            "--root-certificates",
            str(certs["ca"]),
            "--cert",
            str(certs["client"]),
            "--key",
            str(certs["client_key"]),
        ]
        base = ["client", "--server", address, *tls, *DEMO, "--max-retries", "3"]
        intruder = fedhive(tmp_path, "mallory", *base, "--node-id", "mallory", "--token", "x")
        # refused before the others join: the run would otherwise end before it connects
        assert intruder.wait() == 2, intruder.stderr
        alice = fedhive(
            tmp_path,
            "alice",
            *base,
            "--node-id",
            "alice",
            "--token",
            "a-s3cret",
            "--audit-log",
            "audit.jsonl",
        )
        bob = fedhive(
            tmp_path,
            "bob",
            *base,
            "--partition-id",
            "1",
            "--node-id",
            "bob",
            "--token-file",
            "bob.token",
        )
        assert server.wait() == 0, server.stderr
        assert [alice.wait(), bob.wait()] == [0, 0], [alice.stderr, bob.stderr]
    finally:
        server.stop()
    assert "error: the server refused this client" in intruder.stderr  # no class names
    assert "not enrolled" in intruder.stderr and "AuthenticationError" not in intruder.stderr
    assert "mutual TLS" in server.stderr
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    ids = {c["client_id"] for c in rounds[-1]["distributed"]["clients"]}
    assert ids == {"alice", "bob"}
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["fit", "evaluate"]


def test_a_persistent_client_joins_two_consecutive_runs(tmp_path):
    (tmp_path / "server.toml").write_text(TINY_SERVER.format(rounds=1))
    one_client = [
        "--set",
        "strategy.min_available_clients=1",
        "--set",
        "strategy.min_fit_clients=1",
        "--set",
        "strategy.min_evaluate_clients=1",
    ]
    first = fedhive(
        tmp_path,
        "server1",
        "server",
        "server.toml",
        "--insecure",
        *one_client,
        "--address",
        "127.0.0.1:0",
        "--out",
        "run1",
    )
    address = f"127.0.0.1:{first.port()}"
    stayer = fedhive(
        tmp_path,
        "stayer",
        "client",
        "--server",
        address,
        "--insecure",
        *DEMO,
        "--max-retries",
        "30",
        "--persistent",
        "--node-id",
        "stayer",
    )
    try:
        assert first.wait() == 0, first.stderr
        stayer.wait_for("run ended")
        assert stayer.popen.poll() is None  # still up, waiting for the next run
        second = fedhive(
            tmp_path,
            "server2",
            "server",
            "server.toml",
            "--insecure",
            *one_client,
            "--address",
            address,
            "--out",
            "run2",
        )
        assert second.wait() == 0, second.stderr
        for run in ("run1", "run2"):
            rounds = json.loads((tmp_path / run / "history.json").read_text())["rounds"]
            ids = {c["client_id"] for c in rounds[-1]["distributed"]["clients"]}
            assert ids == {"stayer"}, run
        assert stayer.popen.poll() is None  # and still up after the second run
    finally:
        stayer.stop()
    assert stayer.stderr.count("run ended") == 2


@pytest.mark.parametrize("attr", ["client_fn", "legacy_client_fn", "client", "app"])
def test_every_app_form_answers_a_task(attr):
    import numpy as np

    from fedhive.cli.client_cmd import client_target, load_app
    from fedhive.client import ClientApp, Context
    from fedhive.client.start import _constant
    from fedhive.common import FitIns, ndarrays_to_parameters
    from fedhive.common.message import Message

    target, mods = client_target(load_app(f"deploy_app:{attr}", str(APPS)), attr)
    fn = target.get("client_fn") or _constant(target["client"])
    task = Message.task(
        run_id=1,
        node_id="n",
        server_round=1,
        model_version=0,
        message_type="fit",
        content=FitIns(ndarrays_to_parameters([np.zeros(4, np.float32)]), {}),
    )
    reply = ClientApp(fn, mods).handle(task, Context(node_id="n"))
    assert reply.error is None and reply.content.num_examples == 3


@pytest.mark.slow  # a server and two client processes
def test_a_site_whose_every_task_failed_exits_with_status_1(tmp_path):
    import numpy as np

    from fedhive.common import ndarrays_to_parameters
    from fedhive.server import ServerConfig
    from fedhive.server.strategy import FedAvg
    from grpc_helpers import ServerThread

    strategy = FedAvg(
        min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
    )  # fmt: skip
    server = ServerThread(
        config=ServerConfig(num_rounds=1, round_timeout=60), strategy=strategy
    ).start()
    base = ["client", "--server", server.address, "--insecure", "--app-dir", str(APPS)]
    broken = fedhive(tmp_path, "broken", *base, "--app", "deploy_app:broken_client_fn")
    partial = fedhive(tmp_path, "partial", *base, "--app", "deploy_app:no_evaluate_client_fn")
    history = server.join(timeout=120)
    assert broken.wait() == 1, broken.stderr
    assert "every one of this site's 2 tasks failed" in broken.stderr
    assert "the site's data is unreadable" in broken.stderr  # the reasons came first
    assert partial.wait() == 0, partial.stderr  # its fit succeeded
    assert history.rounds[-1]["fit"]["num_results"] == 1


def test_an_app_file_named_like_a_standard_module_is_named_as_shadowed(tmp_path):
    """``--app site:app`` with a ``site.py`` in the app folder: Python's own ``site`` is
    imported first; the error says so instead of "has no attribute 'app'"."""
    from fedhive.cli.client_cmd import load_app

    (tmp_path / "site.py").write_text("app = None\n")
    with pytest.raises(ConfigError) as caught:
        load_app("site:app", str(tmp_path))
    message = " ".join(str(caught.value).split())
    assert f"not {tmp_path.resolve() / 'site.py'}" in message
    assert "rename" in message
