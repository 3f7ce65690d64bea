"""The ``[policy]`` table of `fedhive run` and `fedhive server`: validation, the policy it
builds, and asynchronous runs through the real commands."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
from typer.testing import CliRunner

from cli_helpers import run_toml
from deploy_helpers import TINY_SERVER, demo_federation
from fedhive.cli import app
from fedhive.cli.config import validate
from fedhive.cli.policies import (
    BufferedAsyncConfig,
    PolicyConfig,
    SyncConfig,
    policy_model,
    register_policy,
    registered_policies,
    unregister_policy,
)
from fedhive.cli.server_cmd import server_policy
from fedhive.cli.server_config import validate_server_config
from fedhive.common import ConfigError
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.policy import SyncRounds

runner = CliRunner()

ASYNC_TABLE = '[policy]\nname = "buffered-async"\nbuffer_size = 2\nconcurrency = 3'

ASYNC = {"name": "buffered-async", "buffer_size": 2, "concurrency": 3}


def flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def error_of(data: dict, validator=validate) -> str:
    with pytest.raises(ConfigError) as info:
        validator(data, "exp.toml")
    return str(info.value)


# --------------------------------------------------------------------------- the table


def test_sync_is_the_default_and_builds_synchronous_rounds():
    cfg = validate({})
    assert isinstance(cfg.policy, SyncConfig)
    assert isinstance(cfg.policy.build(), SyncRounds)
    assert cfg.model_dump()["policy"] == {"name": "sync"}
    assert isinstance(validate({"policy": {"name": "sync"}}).policy.build(), SyncRounds)


def test_buffered_async_builds_a_fresh_policy_with_its_arguments():
    cfg = validate({"policy": {**ASYNC, "max_staleness": 4}})
    assert isinstance(cfg.policy, BufferedAsyncConfig)
    first, second = cfg.policy.build(), cfg.policy.build()
    assert isinstance(first, BufferedAsync)
    assert (first.buffer_size, first.concurrency, first.max_staleness) == (2, 3, 4)
    assert first is not second  # a policy keeps run state (its dispatch counter)
    assert cfg.policy.describe() == (
        "buffered-async (buffer_size = 2, concurrency = 3, max_staleness = 4)"
    )
    assert validate({"policy": ASYNC}).policy.build().max_staleness is None


def test_sync_takes_no_other_key_and_names_the_policy_that_does():
    text = error_of({"policy": {"name": "sync", "buffer_size": 4}})
    assert "exp.toml: unknown key 'policy.buffer_size' (value 4)" in text
    assert "allowed keys of policy 'sync': name" in text
    assert "buffer_size belongs to policy 'buffered-async'" in text


def test_unknown_key_of_buffered_async_lists_its_keys():
    text = error_of({"policy": {**ASYNC, "bufer_size": 2}})
    assert "unknown key 'policy.bufer_size' (value 2)" in text
    assert "name, buffer_size, concurrency, max_staleness" in text


def test_unknown_policy_name_lists_the_registered_ones():
    text = error_of({"policy": {"name": "fedasync"}})
    assert "policy.name = 'fedasync'" in text
    assert "'sync', 'buffered-async'" in text


def test_missing_required_arguments_are_named_with_an_example():
    text = error_of({"policy": {"name": "buffered-async"}})
    assert "policy.buffer_size is missing" in text and "buffer_size = 10 under [policy]" in text
    assert "policy.concurrency is missing" in text and "concurrency = 20 under [policy]" in text


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("buffer_size", 0, "greater than or equal to 1"),
        ("concurrency", -2, "greater than or equal to 1"),
        ("max_staleness", -1, "greater than or equal to 0"),
        ("buffer_size", 2.5, "valid integer"),
        ("concurrency", True, "valid integer"),  # true must not count as 1
        ("buffer_size", "4", "valid integer"),
    ],
)
def test_bad_values_name_key_value_and_rule(key, value, rule):
    text = error_of({"policy": {**ASYNC, key: value}})
    assert f"policy.{key} = {value!r}" in text and rule in text


def test_policy_table_must_be_a_table():
    assert "policy = 'sync': Input should be a valid dictionary" in error_of({"policy": "sync"})


def test_concurrency_beyond_the_clients_is_refused():
    text = error_of({"num_clients": 4, "policy": {**ASYNC, "concurrency": 5}})
    assert "policy.concurrency = 5" in text and "num_clients = 4" in text


def test_buffered_async_with_secure_aggregation_is_refused_in_toml_terms():
    data = {"num_clients": 10, "policy": ASYNC, "secure_aggregation": {"threshold": 3}}
    text = error_of(data)
    assert "policy.name = 'buffered-async'" in text
    assert "secure aggregation (SecAgg+) needs a synchronous round" in text
    assert 'name = "sync" under [policy], or drop secure_aggregation' in text
    # the server's config says the same
    server_text = error_of({"policy": ASYNC, "secure_aggregation": {}}, validate_server_config)
    assert "invalid server configuration" in server_text
    assert "policy.name = 'buffered-async'" in server_text and "synchronous round" in server_text
    # synchronous rounds with SecAgg+ stay accepted
    validate({"num_clients": 10, "secure_aggregation": {"threshold": 3}})


def test_a_robust_rule_needs_buffer_size_results_per_version():
    strategy = {"name": "krum", "num_malicious_clients": 1, "fraction_fit": 1.0}
    text = error_of({"num_clients": 10, "strategy": strategy, "policy": ASYNC})
    assert "strategy.num_malicious_clients = 1" in text
    assert "buffer_size = 2" in text and "raise policy.buffer_size" in text
    big = {**ASYNC, "buffer_size": 5}
    assert (
        validate({"num_clients": 10, "strategy": strategy, "policy": big}).policy.buffer_size == 5
    )


def test_a_registered_policy_is_one_entry():
    from typing import Literal

    from pydantic import Field

    @register_policy
    class SlowConfig(PolicyConfig):
        name: Literal["slow-sync"] = "slow-sync"
        policy_class = SyncRounds
        pause: int | None = Field(None, ge=0)

    try:
        assert "slow-sync" in registered_policies() and policy_model("slow-sync") is SlowConfig
        cfg = validate({"policy": {"name": "slow-sync", "pause": 0}})
        assert isinstance(cfg.policy, SlowConfig)
        assert "'slow-sync'" in error_of({"policy": {"name": "nope"}})
        with pytest.raises(ConfigError, match="already registered"):

            @register_policy
            class Other(PolicyConfig):
                name: Literal["slow-sync"] = "slow-sync"
                policy_class = SyncRounds

    finally:
        unregister_policy("slow-sync")
    assert "slow-sync" not in registered_policies()
    with pytest.raises(ConfigError, match="unknown policy 'slow-sync'; known: sync"):
        policy_model("slow-sync")


def test_server_config_builds_the_policy():
    assert isinstance(server_policy(validate_server_config({})), SyncRounds)
    cfg = validate_server_config({"policy": {**ASYNC, "max_staleness": 1}})
    policy = server_policy(cfg)
    assert isinstance(policy, BufferedAsync)
    assert (policy.buffer_size, policy.concurrency, policy.max_staleness) == (2, 3, 1)
    assert cfg.model_dump()["policy"] == {**ASYNC, "max_staleness": 1, "checkpoint_every": None}
    text = error_of({"policy": {"name": "sync", "concurrency": 2}}, validate_server_config)
    assert "unknown key 'policy.concurrency' (value 2)" in text


# --------------------------------------------------------------------------- real runs


def test_run_with_buffered_async_publishes_versions_with_staleness_and_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        run_toml(out, rounds=3, num_clients=6, train="local_epochs = 1", tables=ASYNC_TABLE)
    )
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "policy buffered-async (buffer_size = 2, concurrency = 3)" in flat(result.output)

    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["policy"] == ASYNC
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["policy"] == {**ASYNC, "max_staleness": None, "checkpoint_every": None}
    versions = [r for r in history["rounds"] if r["round"] > 0]
    assert [r["model_version"] for r in versions] == [1, 2, 3]
    for record in versions:
        assert record["fit"]["num_results"] == 2
        staleness = record["staleness"]
        assert len(staleness) == 2
        assert all(s["staleness"] >= 0 and s["client_id"] for s in staleness)
        assert "accuracy" in record["centralized"]

    first = versions
    # the saved config.toml carries the table: --resume continues the same policy
    result = runner.invoke(
        app,
        ["run", "--resume", str(out), "--rounds", "5", "--no-progress"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "history.json").read_text())
    versions = [r for r in resumed["rounds"] if r["round"] > 0]
    assert [r["model_version"] for r in versions] == [1, 2, 3, 4, 5]
    assert versions[:3] == first  # kept from the checkpoint, not run again
    assert all(len(r["staleness"]) == 2 for r in versions)


def test_run_refuses_bad_policy_tables_before_any_work(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('rounds = 2\n[policy]\nname = "buffered-async"\nbuffer_size = 2\n')
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    # the table's name survives the console's markup
    assert "policy.concurrency is missing" in flat(result.output)
    assert "concurrency = 20 under [policy]" in flat(result.output)
    assert not (tmp_path / "out").exists()

    cfg.write_text(
        'num_clients = 10\n[policy]\nname = "buffered-async"\nbuffer_size = 2\n'
        "concurrency = 2\n[secure_aggregation]\nthreshold = 3\n"
    )
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "policy.name = 'buffered-async'" in flat(result.output)
    assert "drop secure_aggregation" in flat(result.output)

    result = runner.invoke(app, ["run", "--set", "policy.name='fedasync'"])
    assert result.exit_code == 2 and "policy.name = 'fedasync'" in flat(result.output)


@pytest.mark.usefixtures("restore_process_state")
def test_server_with_buffered_async_and_two_client_processes(tmp_path):
    policy = '[policy]\nname = "buffered-async"\nbuffer_size = 2\nconcurrency = 2\n'
    server, _ = demo_federation(tmp_path, TINY_SERVER.format(rounds=3) + policy)
    assert "policy buffered-async (buffer_size = 2, concurrency = 2)" in server.stderr
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["config"]["policy"] == {
        "name": "buffered-async",
        "buffer_size": 2,
        "concurrency": 2,
        "max_staleness": None,
        "checkpoint_every": None,
    }
    versions = [r for r in history["rounds"] if r["round"] > 0]
    assert [r["model_version"] for r in versions] == [1, 2, 3]
    assert all(r["fit"]["num_results"] == 2 and len(r["staleness"]) == 2 for r in versions)
    assert versions[-1]["centralized"]["accuracy"] > 0.3
