"""A site policy as a client mod: refused tasks and metrics that never leave the site."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import fedhive as fl
from deploy_helpers import APPS, fedhive, stop_all
from fedhive.client import ClientApp, Context, SitePolicy, policy_mod
from fedhive.common import ConfigError, ndarrays_to_parameters
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
)
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ServerThread


@pytest.fixture(autouse=True)
def _reap():
    """Stop the processes a test started, even when it fails."""
    yield
    stop_all()


POLICY = SitePolicy(
    allowed_config_keys=frozenset({"local_epochs", "lr"}),
    max_local_epochs=2,
    allowed_metrics=frozenset({"loss", "accuracy"}),
)


class Site(fl.client.NumPyClient):
    built = 0

    def __init__(self):
        Site.built += 1

    def get_parameters(self, config):
        return [np.zeros(3, np.float32)]

    def fit(self, parameters, config):
        return [p + 1 for p in parameters], 5, {"loss": 0.25, "patients_seen": 42}

    def evaluate(self, parameters, config):
        return 0.5, 5, {"accuracy": 0.9, "site_name": "st-mary", "loss_by_ward": 0.1}


def site_fn(context: Context):
    return Site()


def task(message_type, content):
    return Message.task(
        run_id=1,
        node_id="site",
        server_round=1,
        model_version=0,
        message_type=message_type,
        content=content,
    )


def fit_task(config):
    return task(MessageType.FIT, FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), config))


def evaluate_task(config):
    params = ndarrays_to_parameters([np.zeros(3, np.float32)])
    return task(MessageType.EVALUATE, EvaluateIns(params, config))


def run(message, policy=POLICY):
    app = ClientApp(site_fn, mods=[policy_mod(policy)])
    return app.handle(message, Context(node_id="site"))


def test_allowed_task_runs_and_private_metrics_are_stripped():
    reply = run(fit_task({"local_epochs": 2, "lr": 0.1}))
    assert reply.error is None and isinstance(reply.content, FitRes)
    assert reply.content.metrics == {"loss": 0.25}
    assert reply.content.num_examples == 5
    assert np.array_equal(reply.content.parameters.arrays[0], np.ones(3, np.float32))
    reply = run(evaluate_task({}))
    assert isinstance(reply.content, EvaluateRes)
    assert reply.content.metrics == {"accuracy": 0.9} and reply.content.loss == 0.5


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"local_epochs": 1, "export_data": True}, "config key(s) 'export_data' not allowed"),
        ({"local_epochs": 3}, "local_epochs = 3 exceeds this site's maximum of 2"),
        ({"local_epochs": 2.5}, "local_epochs = 2.5 exceeds"),
        ({"local_epochs": "many"}, "local_epochs = 'many' is not a number of epochs"),
        ({"local_epochs": True}, "is not a number of epochs"),
    ],
)
def test_refused_tasks_say_why_and_never_build_the_client(config, reason):
    before = Site.built
    reply = run(fit_task(config))
    assert reply.content is None
    assert reply.error.startswith("refused by the site policy: ")
    assert reason in reply.error
    assert Site.built == before
    assert "allowed: local_epochs, lr" in run(fit_task({"x": 1})).error


def test_every_task_with_a_config_is_checked():
    reply = run(evaluate_task({"dump_rows": 10}))
    assert reply.error is not None and "'dump_rows'" in reply.error
    reply = run(task(MessageType.GET_PARAMETERS, GetParametersIns({})))
    assert isinstance(reply.content, GetParametersRes)


def test_no_limits_means_everything_passes():
    reply = run(fit_task({"local_epochs": 100, "anything": "x"}), SitePolicy())
    assert reply.error is None
    assert reply.content.metrics == {"loss": 0.25, "patients_seen": 42}


def test_custom_epochs_key_and_empty_allow_lists():
    policy = SitePolicy(max_local_epochs=1, epochs_key="epochs", allowed_metrics=frozenset())
    assert "epochs = 2 exceeds" in run(fit_task({"epochs": 2}), policy).error
    reply = run(fit_task({"local_epochs": 9}), policy)  # not the key this site limits
    assert reply.error is None and reply.content.metrics == {}
    closed = SitePolicy(allowed_config_keys=[])
    assert "allowed: (none)" in run(fit_task({"lr": 0.1}), closed).error
    assert run(fit_task({}), closed).error is None


def test_policy_is_validated_and_picklable():
    assert SitePolicy(allowed_metrics=["a", "b"]).allowed_metrics == frozenset({"a", "b"})
    with pytest.raises(ConfigError, match="max_local_epochs must be an int >= 0"):
        SitePolicy(max_local_epochs=-1)
    with pytest.raises(ConfigError, match="max_local_epochs"):
        SitePolicy(max_local_epochs=1.5)
    with pytest.raises(ConfigError, match="allowed_metrics must be a collection"):
        SitePolicy(allowed_metrics="accuracy")
    with pytest.raises(ConfigError, match="must hold str names"):
        SitePolicy(allowed_config_keys=[1])
    with pytest.raises(ConfigError, match="epochs_key"):
        SitePolicy(epochs_key="")
    with pytest.raises(TypeError, match="needs a SitePolicy"):
        policy_mod({"max_local_epochs": 1})
    mod = pickle.loads(pickle.dumps(policy_mod(POLICY)))
    assert mod.policy == POLICY


def test_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(
        'allowed_config_keys = ["local_epochs", "lr"]\nmax_local_epochs = 2\n'
        'allowed_metrics = ["loss", "accuracy"]\n'
    )
    assert SitePolicy.from_file(path) == POLICY
    path.write_text("max_local_epoch = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_local_epoch' \(value 2\)"):
        SitePolicy.from_file(path)
    path.write_text("max_local_epochs = -2\n")
    with pytest.raises(ConfigError, match=r"policy\.toml: max_local_epochs must be"):
        SitePolicy.from_file(path)
    path.write_text("max_local_epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        SitePolicy.from_file(path)


def test_policy_over_grpc_via_the_client_cli(tmp_path):
    """Round 1 asks for 2 epochs (allowed), round 2 for 4 (refused); metrics are stripped."""
    (tmp_path / "policy.toml").write_text(
        'allowed_config_keys = ["local_epochs"]\nmax_local_epochs = 2\n'
        'allowed_metrics = ["loss", "accuracy"]\n'
    )
    strategy = FedAvg(
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
        on_fit_config_fn=lambda rnd: {"local_epochs": 2 * rnd},
    )
    server = ServerThread(config=ServerConfig(num_rounds=2), strategy=strategy).start()
    site = fedhive(
        tmp_path,
        "site",
        "client",
        "--server",
        server.address,
        "--insecure",
        "--app",
        "deploy_app:client_fn",
        "--app-dir",
        str(APPS),
        "--node-id",
        "st-mary",
        "--policy",
        "policy.toml",
        "--max-retries",
        "3",
    )
    try:
        history = server.join()
        assert site.wait() == 0, site.stderr
    finally:
        site.stop()
    first, second = history.rounds  # no centralized evaluation, so no round 0
    assert first["fit"]["num_results"] == 1 and not first["failures"]
    (failure,) = second["failures"]
    assert failure["client_id"] == "st-mary"
    assert "refused by the site policy" in failure["reason"]
    assert "local_epochs = 4 exceeds this site's maximum of 2" in failure["reason"]
    for record in (first, second):
        (evaluated,) = record["distributed"]["clients"]
        assert evaluated["metrics"] == {"accuracy": 0.75}  # site_name never left
    assert "refused a fit task of round 2" in site.stderr
