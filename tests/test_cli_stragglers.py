"""`fedhive run` with `[system]`, FedBuff/FedAsync tables and deadline keys."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli_helpers import run_toml
from fedhive.cli import app
from fedhive.cli.config import validate
from fedhive.cli.server_config import validate_server_config
from fedhive.cli.stragglers import run_policy
from fedhive.common import ConfigError
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.deadline import DeadlineRounds
from fedhive.server.policy import SyncRounds

runner = CliRunner()
SYSTEM = """\
[system]
latency = "lognormal"
sigma = 1.5
bandwidth_mbps = 10.0
trace = ""
dropout = 0.1
"""


def _history(tmp_path, strategy, tables=SYSTEM, rounds=3):
    out = tmp_path / "run"
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        run_toml(
            out,
            rounds=rounds,
            num_clients=8,
            train="local_epochs = 1",
            strategy=strategy,
            tables=tables,
        )
    )
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "history.json").read_text())


def test_run_fedbuff_on_simulated_devices_records_virtual_time_and_staleness(tmp_path):
    history = _history(
        tmp_path,
        'name = "fedbuff"\nbuffer_size = 2\nconcurrency = 4\nstaleness = "poly"\n'
        "staleness_exponent = 0.5\nserver_lr = 1.0",
    )
    versions = [r for r in history["rounds"] if r["round"] > 0]
    assert [r["model_version"] for r in versions] == [1, 2, 3]
    times = [r["virtual_time_s"] for r in versions]
    assert times == sorted(times) and times[0] > 0
    for record in versions:
        assert record["fit"]["num_results"] == 2 and len(record["staleness"]) == 2
        assert {c["client_id"] for c in record["contributions"]} <= {str(i) for i in range(8)}
        assert "staleness_mean" in record["fit"]["metrics"]


def test_run_fedavg_with_a_deadline_and_over_selection(tmp_path):
    history = _history(tmp_path, "deadline_s = 3600.0\nover_selection = 0.5")
    for record in history["rounds"][1:]:
        fit = record["fit"]
        assert fit["wanted"] == 4 and fit["num_clients"] == 6
        assert fit["num_results"] + fit.get("discarded", 0) + len(record["failures"]) == 6
        assert "virtual_time_s" in record


def _cfg(strategy, **more):
    return {"num_clients": 8, "strategy": strategy, **more}


def test_the_strategy_table_picks_the_policy():
    fedbuff = validate(_cfg({"name": "fedbuff", "buffer_size": 3, "concurrency": 5}))
    assert run_policy(fedbuff.strategy, fedbuff.policy) is None  # the strategy's own
    strategy = fedbuff.strategy.build({})
    from fedhive.server.policy import default_policy

    policy = default_policy(strategy)
    assert isinstance(policy, BufferedAsync) and (policy.buffer_size, policy.concurrency) == (3, 5)
    deadline = validate(_cfg({"deadline_s": 30.0, "over_selection": 0.3, "partial_work": True}))
    built = run_policy(deadline.strategy, deadline.policy)
    assert isinstance(built, DeadlineRounds) and built.over_selection == 0.3 and built.partial_work
    assert isinstance(run_policy(validate({}).strategy, validate({}).policy), SyncRounds)
    server = validate_server_config({"strategy": {"name": "fedasync", "alpha": 0.5}})
    assert run_policy(server.strategy, server.policy) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"system": {"latency": "gamma"}}, r"system\.latency = 'gamma'"),
        ({"system": {"speed": 3.0}}, r"unknown key 'system\.speed'"),
        ({"system": {"dropout": 1.0}}, r"system\.dropout = 1\.0"),
        (
            _cfg(
                {"name": "fedbuff"},
                policy={"name": "buffered-async", "buffer_size": 2, "concurrency": 2},
            ),
            r"brings its own asynchronous policy",
        ),
        (_cfg({"name": "fedbuff", "deadline_s": 5.0}), r"fedbuff is asynchronous.*deadline_s"),
        (
            _cfg({"name": "fedasync", "concurrency": 20}),
            r"strategy\.concurrency = 20: only num_clients = 8",
        ),
        (_cfg({"partial_work": True}), r"partial_work.*set strategy\.deadline_s"),
        (
            _cfg({"over_selection": 0.3}, secure_aggregation={"threshold": 3}),
            r"secure aggregation needs the masked update of every sampled client",
        ),
        (
            _cfg({"name": "fedbuff", "concurrency": 4}, secure_aggregation={"threshold": 3}),
            r"fedbuff cannot run with secure aggregation.*staleness",
        ),
    ],
)
def test_bad_straggler_configs_are_refused_by_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(data)


def test_fedbuff_checkpoint_every_saves_the_open_buffer_and_resume_folds_it(tmp_path, monkeypatch):
    """[strategy] checkpoint_every: `fedhive run` checkpoints inside a buffer, under a name
    of its own (never over a finished version's checkpoint), and a run resumed from such a
    checkpoint publishes the next version with the results buffered before it stopped."""
    from fedhive.server.checkpoint import Checkpointer

    snapshots = tmp_path / "snapshots"  # the checkpoint folder as a stop would leave it
    save = Checkpointer.save

    def saved_then_copied(self, engine):
        path = save(self, engine)
        count = len(list(snapshots.glob("*"))) if snapshots.exists() else 0
        shutil.copytree(self.directory, snapshots / f"{count:03d}-{path.name}")
        return path

    monkeypatch.setattr(Checkpointer, "save", saved_then_copied)
    table = (
        'name = "fedbuff"\nbuffer_size = 3\nconcurrency = 2\nstaleness = "poly"\n'
        "checkpoint_every = 1"
    )
    history = _history(tmp_path, table, rounds=2)
    monkeypatch.undo()
    versions = [r for r in history["rounds"] if r["round"] > 0]
    assert [len(r["staleness"]) for r in versions] == [3, 3]
    # results 4 and 5 were saved inside version 2's buffer, each under its own name
    saved = sorted(snapshots.iterdir())
    names = [p.name.split("-", 1)[1] for p in saved]
    assert "round-000001-open-000001" in names and "round-000001-open-000002" in names
    stopped = saved[names.index("round-000001-open-000002")]
    assert (stopped / "LATEST").read_text() == "round-000001-open-000002"
    assert (stopped / "round-000001" / "meta.json").exists()  # version 1's, untouched
    meta = json.loads((stopped / "round-000001-open-000002" / "meta.json").read_text())
    opened = meta["policy"]["state"]["open"]
    assert meta["round"] == 1 and opened["num_results"] == 2
    assert opened["staleness"] == versions[1]["staleness"][:2]

    # the run stops right after that save, before version 2
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints)
    shutil.copytree(stopped, checkpoints)
    result = runner.invoke(
        app, ["run", "--resume", str(tmp_path / "run"), "--no-progress"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "run" / "history.json").read_text())
    again = [r for r in resumed["rounds"] if r["round"] > 0]
    assert again[0] == versions[0]  # kept from the checkpoint
    assert again[1]["fit"]["num_results"] == 3
    assert again[1]["staleness"][:2] == opened["staleness"]  # folded before the stop


def test_checkpoint_every_reaches_the_policy_from_either_table():
    fedbuff = validate(
        _cfg({"name": "fedbuff", "buffer_size": 3, "concurrency": 5, "checkpoint_every": 2})
    )
    policy = run_policy(fedbuff.strategy, fedbuff.policy)
    assert isinstance(policy, BufferedAsync)
    assert (policy.buffer_size, policy.concurrency, policy.checkpoint_every) == (3, 5, 2)
    assert "checkpoint_every" not in fedbuff.strategy.parameters()  # not FedBuff's argument
    table = {"name": "buffered-async", "buffer_size": 2, "concurrency": 2, "checkpoint_every": 1}
    cfg = validate(_cfg({}, policy=table))
    built = run_policy(cfg.strategy, cfg.policy)
    assert isinstance(built, BufferedAsync) and built.checkpoint_every == 1
    with pytest.raises(ConfigError, match=r"strategy\.checkpoint_every = 0"):
        validate(_cfg({"name": "fedbuff", "checkpoint_every": 0}))
    with pytest.raises(ConfigError, match=r"not a parameter of strategy 'fedasync'.*fedbuff"):
        validate(_cfg({"name": "fedasync", "checkpoint_every": 2}))


def test_checkpoint_every_with_a_strategy_that_keeps_no_open_buffer_is_refused(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        run_toml(
            tmp_path / "run",
            tables='[policy]\nname = "buffered-async"\nbuffer_size = 2\nconcurrency = 2\n'
            "checkpoint_every = 1\n",
        )
    )
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code != 0
    assert "checkpoint_every saves the open buffer mid-version" in " ".join(result.output.split())
