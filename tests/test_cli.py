"""`fedhive run`: config validation, outputs, interrupt and resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedhive.cli import app
from fedhive.cli.config import ExperimentConfig, validate
from fedhive.common import ConfigError

runner = CliRunner()

SMALL = [
    "--rounds", "3", "--num-clients", "8", "--seed", "1", "--no-progress",
    "--set", "data.dataset='digits'", "--set", "model.name='logreg'",
    "--set", "strategy.fraction_fit=0.5", "--set", "strategy.fraction_evaluate=0.5",
    "--set", "train.lr=0.1",
]  # fmt: skip


def invoke(*args):
    return runner.invoke(app, ["run", *args], catch_exceptions=False)


def test_help_documents_every_option():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--rounds", "--num-clients", "--seed", "--out", "--resume", "--set",
                   "--show-partition", "--workers", "--backend", "CONFIG.toml"):  # fmt: skip
        assert option in result.output


def test_unknown_key_names_key_value_and_allowed(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text("rounds = 2\n[data]\nalhpa = 0.1\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "data.alhpa" in result.output and "0.1" in result.output
    assert "alpha" in result.output  # what is allowed


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError) as info:
        validate({"data": {"alpha": -1}}, "exp.toml")
    text = str(info.value)
    assert "data.alpha = -1" in text and "greater than 0" in text
    with pytest.raises(ConfigError, match=r"model\.name = 'resnet'"):
        validate({"model": {"name": "resnet"}})
    with pytest.raises(ConfigError, match="not valid TOML"):
        from fedhive.cli.config import load_config

        bad = __import__("pathlib").Path(__file__).parent / "conftest.py"
        load_config(bad)


def test_defaults_are_the_documented_main_job():
    cfg = ExperimentConfig()
    assert (cfg.num_clients, cfg.rounds, cfg.data.dataset, cfg.data.partition) == (
        100, 100, "mnist1d", "dirichlet",
    )  # fmt: skip
    assert (cfg.data.alpha, cfg.strategy.fraction_fit, cfg.model.name) == (0.5, 0.1, "cnn1d")


def test_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    result = invoke(*SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    for name in ("history.json", "metrics.csv", "accuracy.png", "config.toml",
                 "final_model.npz", "best_model.npz"):  # fmt: skip
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["rounds"] == 3
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert set(r) >= {"round", "elapsed_s", "centralized", "distributed", "fit"}
        assert set(r["centralized"]) >= {"loss", "accuracy"}
    assert rounds[-1]["centralized"]["accuracy"] > 0.5
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["round"] for row in rows] == ["0", "1", "2", "3"]
    assert "summary" in result.output


def test_show_partition_prints_histograms(tmp_path):
    result = invoke(*SMALL, "--out", str(tmp_path), "--show-partition")
    assert result.exit_code == 0
    assert result.output.count("\n") >= 8
    assert not (tmp_path / "history.json").exists()


def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert invoke(*SMALL, "--out", str(full)).exit_code == 0

    from fedhive.cli import progress

    original = progress.EveryRound.on_round_end

    def stop_after_two(self, engine, record):
        original(self, engine, record)
        if record["round"] == 2:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    monkeypatch.setattr(progress.EveryRound, "on_round_end", stop_after_two)
    result = invoke(*SMALL, "--out", str(cut))
    assert result.exit_code == 130 and "--resume" in result.output
    rounds = json.loads((cut / "history.json").read_text())["rounds"]
    assert rounds[-1]["round"] == 2  # what was done is saved
    monkeypatch.setattr(progress.EveryRound, "on_round_end", original)
    result = invoke("--resume", str(cut), "--no-progress")
    assert result.exit_code == 0, result.output

    def strip(path):
        data = json.loads((path / "history.json").read_text())
        for r in data["rounds"]:
            r.pop("elapsed_s", None)
        data["config"].pop("out")
        return data

    assert strip(cut) == strip(full)


def test_resume_of_a_folder_without_a_run_is_an_error(tmp_path):
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "config.toml" in result.output


def test_console_script_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedhive.cli.main", "run", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--rounds" in out.stdout
