"""Tracking callbacks: TensorBoard event files and an MLflow store, read back with the
real libraries after real runs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cli_helpers import run_toml
from conftest import initial
from fedhive.callbacks import MLflow, TensorBoard, client_values, round_scalars
from fedhive.cli import app
from fedhive.client import Context, NumPyClient
from fedhive.common import ConfigError
from fedhive.privacy import Accounting, DifferentialPrivacyServerSideFixedClipping
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

runner = CliRunner()

RECORD = {
    "round": 3,
    "fit": {"num_results": 2, "metrics": {"epsilon": 1.5, "loss": 0.3}, "updated": True},
    "failures": [{"client_id": "4", "reason": "timeout"}],
    "centralized": {"loss": 0.4, "accuracy": 0.9},
    "distributed": {
        "loss": 0.5,
        "metrics": {"accuracy": 0.8},
        "clients": [
            {"client_id": "1", "loss": 0.4, "num_examples": 3, "metrics": {"accuracy": 0.7}},
            {"client_id": "2", "loss": 0.6, "num_examples": 5, "metrics": {"accuracy": 0.9}},
        ],
    },
    "bytes_up": 100,
    "bytes_down": 300,
    "bytes_clients": {"1": {"up": 40, "down": 150}, "2": {"up": 60, "down": 150}},
    "virtual_time_s": 12.5,
    "elapsed_s": 0.2,
    "note": "text is not a number",
}


def test_round_scalars_take_every_numeric_field_by_its_path():
    assert round_scalars(RECORD) == {
        "fit/num_results": 2.0,
        "fit/metrics/epsilon": 1.5,
        "fit/metrics/loss": 0.3,
        "fit/updated": 1.0,
        "failures/count": 1.0,
        "centralized/loss": 0.4,
        "centralized/accuracy": 0.9,
        "distributed/loss": 0.5,
        "distributed/metrics/accuracy": 0.8,
        "distributed/clients/count": 2.0,
        "bytes_up": 100.0,
        "bytes_down": 300.0,
        "bytes_clients/count": 2.0,
        "virtual_time_s": 12.5,
        "elapsed_s": 0.2,
    }
    assert client_values(RECORD) == {
        "distributed/clients/loss": [0.4, 0.6],
        "distributed/clients/accuracy": [0.7, 0.9],
        "bytes_clients/up": [40.0, 60.0],
        "bytes_clients/down": [150.0, 150.0],
    }


def scalars(logdir):
    """Every scalar series under ``logdir`` as TensorBoard itself reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    series = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    return series, acc.Tags()["histograms"]


def expected(history_rounds):
    """Each path's value per round, from the saved history.json."""
    out: dict[str, dict[int, float]] = {}
    for record in history_rounds:
        for tag, value in round_scalars(record).items():
            out.setdefault(tag, {})[record["round"]] = value
    return out


def assert_series_match(got, want):
    assert set(got) == set(want)
    for tag, values in want.items():
        assert sorted(got[tag]) == sorted(values), tag
        # event files store float32
        np.testing.assert_allclose(
            [got[tag][s] for s in sorted(values)], [values[s] for s in sorted(values)], rtol=1e-6
        )


def test_fedhive_run_logs_every_history_field_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'fedhive[tensorboard]'")
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    tables = '[system]\nlatency = "lognormal"\n[tracking.tensorboard]\n'
    cfg.write_text(run_toml(out, rounds=3, tables=tables))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    got, histograms = scalars(out / "tensorboard")
    assert_series_match(got, expected(rounds))
    for tag in ("centralized/accuracy", "bytes_up", "bytes_down", "virtual_time_s"):
        assert sorted(got[tag]) == ([0, 1, 2, 3] if tag.startswith("centralized") else [1, 2, 3])
    assert got["bytes_up"][3] == rounds[-1]["bytes_up"] > 0
    assert got["virtual_time_s"][3] == pytest.approx(rounds[-1]["virtual_time_s"], rel=1e-6)
    assert {"distributed/clients/accuracy", "bytes_clients/up"} <= set(histograms)


def test_a_resumed_run_leaves_one_value_per_step_in_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install 'fedhive[tensorboard]'")
    from fedhive.cli import progress

    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(run_toml(out, rounds=3, tables="[tracking.tensorboard]\n"))
    original = progress.EveryRound.on_round_end

    def stop_after_two(self, engine, record):
        original(self, engine, record)
        if record["round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.EveryRound, "on_round_end", stop_after_two)
    assert runner.invoke(app, ["run", str(cfg), "--no-progress"]).exit_code == 130
    monkeypatch.setattr(progress.EveryRound, "on_round_end", original)
    result = runner.invoke(app, ["run", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    got, _ = scalars(out / "tensorboard")
    assert_series_match(got, expected(rounds))


class Client(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):
        return [p + 0.1 * (self.pid + 1) for p in parameters], 5, {}

    def evaluate(self, parameters, config):
        return float(np.mean(parameters[0])), 1, {"accuracy": 0.1 * self.pid}


def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"]))


def dp_run(callbacks):
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_fit=0.5, fraction_evaluate=0.5, initial_parameters=initial((5,))),
        noise_multiplier=1.0,
        clipping_norm=1.0,
        num_sampled_clients=3,
        accounting=Accounting(delta=1e-3),
    )
    return start_simulation(
        client_fn=client_fn,
        num_clients=6,
        config=ServerConfig(num_rounds=3),
        strategy=strategy,
        seed=4,
        num_workers=1,
        callbacks=callbacks,
    )


def test_tensorboard_logs_epsilon_of_a_private_simulation(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'fedhive[tensorboard]'")
    history = dp_run([TensorBoard(tmp_path / "tb")])
    got, _ = scalars(tmp_path / "tb")
    want = dict(history.metrics_distributed_fit["epsilon"])
    assert set(want) == {1, 2, 3} and want[3] > want[1] > 0
    np.testing.assert_allclose([got["fit/metrics/epsilon"][r] for r in (1, 2, 3)],
                               [want[r] for r in (1, 2, 3)], rtol=1e-6)  # fmt: skip
    assert_series_match(got, expected(history.rounds))


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """A local MLflow folder store (MLflow 3 asks for this opt-in to use one)."""
    pytest.importorskip("mlflow", reason="pip install 'fedhive[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path / "mlruns"


def mlflow_runs(store, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client, client.search_runs([found.experiment_id])


def test_fedhive_run_logs_every_history_field_to_mlflow(tmp_path, file_store):
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    tables = (
        '[system]\nlatency = "lognormal"\n'
        f'[tracking.mlflow]\ntracking_uri = "{file_store.as_uri()}"\nexperiment = "digits"\n'
    )
    cfg.write_text(run_toml(out, rounds=2, tables=tables))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    client, (run,) = mlflow_runs(file_store, "digits")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["model.name"] == "logreg"
    want = expected(rounds)
    assert set(run.data.metrics) == set(want)
    assert {"bytes_up", "bytes_down", "virtual_time_s", "centralized/accuracy"} <= set(want)
    for key, values in want.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(values, rel=1e-12), key
    # the store on disk: one file per metric, a line per step ("timestamp value step")
    folder = file_store / run.info.experiment_id / run.info.run_id / "metrics"
    lines = (folder / "bytes_up").read_text().split("\n")
    assert [int(line.split()[2]) for line in lines if line] == [1, 2]


def test_mlflow_marks_a_failed_run_and_logs_epsilon(file_store):
    tracker = MLflow(tracking_uri=file_store.as_uri(), experiment="dp", run_name="private")
    history = dp_run([tracker])
    client, (run,) = mlflow_runs(file_store, "dp")
    assert run.info.status == "FINISHED"
    epsilon = client.get_metric_history(run.info.run_id, "fit/metrics/epsilon")
    assert [(m.step, m.value) for m in epsilon] == history.metrics_distributed_fit["epsilon"]

    class Boom(Exception):
        pass

    def explode(engine, record):
        raise Boom

    failing = MLflow(tracking_uri=file_store.as_uri(), experiment="dp", run_name="boom")
    failing.on_round_end = explode  # type: ignore[method-assign]
    with pytest.raises(Boom):
        dp_run([failing])
    _, runs = mlflow_runs(file_store, "dp")
    assert {r.info.run_name: r.info.status for r in runs} == {
        "private": "FINISHED",
        "boom": "FAILED",
    }


def test_a_missing_tracker_package_is_a_clear_error_before_any_round(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it fails
    with pytest.raises(ConfigError, match=r"pip install 'fedhive\[tensorboard\]'"):
        TensorBoard(tmp_path)
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(run_toml(out, tables="[tracking.tensorboard]\n"))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 2 and "fedhive[tensorboard]" in result.output
    assert not (out / "history.json").exists()


def test_an_unknown_tracking_key_names_the_allowed_ones(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(run_toml(tmp_path / "run", tables="[tracking.tensorboard]\nlog_dir = 'x'\n"))
    result = runner.invoke(app, ["run", str(cfg), "--no-progress"])
    assert result.exit_code == 2
    assert "tracking.tensorboard.log_dir" in result.output and "logdir" in result.output


@pytest.mark.slow  # three processes, about 30 s
@pytest.mark.timeout(600)
def test_fedhive_server_logs_a_deployment_to_tensorboard_and_mlflow(tmp_path, file_store):
    pytest.importorskip("tensorboard", reason="pip install 'fedhive[tensorboard]'")
    from deploy_helpers import TINY_SERVER, demo_federation, stop_all

    tables = (
        "[tracking.tensorboard]\n"
        f'[tracking.mlflow]\ntracking_uri = "{file_store.as_uri()}"\nexperiment = "sites"\n'
    )
    try:
        demo_federation(tmp_path, TINY_SERVER.format(rounds=2) + tables)
    finally:
        stop_all()
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    got, histograms = scalars(tmp_path / "out" / "tensorboard")
    assert_series_match(got, expected(rounds))
    assert got["bytes_up"][2] == rounds[-1]["bytes_up"] > 0
    assert "distributed/clients/accuracy" in histograms
    client, (run,) = mlflow_runs(file_store, "sites")
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    accuracy = client.get_metric_history(run.info.run_id, "centralized/accuracy")
    assert [m.step for m in accuracy] == [0, 1, 2]
