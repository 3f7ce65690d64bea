"""The command line's small print: version, help text, labelled errors, output folders,
resume lines, the plot and exit statuses."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deploy_helpers import fedhive, stop_all
from fedhive import __version__
from fedhive.cli import app
from fedhive.cli.output import CURVE_NAMES, plot_title

runner = CliRunner()

SMALL = [
    "--rounds", "2", "--num-clients", "4", "--seed", "1", "--no-progress",
    "--set", "data.dataset='digits'", "--set", "model.name='logreg'",
    "--set", "strategy.fraction_fit=0.5", "--set", "strategy.fraction_evaluate=0.5",
    "--set", "train.lr=0.1",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("restore_process_state")


@pytest.fixture(autouse=True)
def _reap():
    yield
    stop_all()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"fedhive {__version__}"


def test_help_keeps_toml_table_names():
    keygen = invoke("secagg", "keygen", "--help").output
    assert "(an [identities] table)" in " ".join(keygen.split())
    client = " ".join(invoke("client", "--help").output.split())
    assert "(TOML [identities])" in client
    server = " ".join(invoke("server", "--help").output.split())
    assert "[strategy] name picks another" in server and "[tls] table" in server
    assert '[policy] name = "buffered-async"' in server
    run = " ".join(invoke("run", "--help").output.split())
    assert '[policy] name = "buffered-async"' in run and "[[CONFIG.toml]]" not in run


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--set", "data.alpha", "0.1"], ["--set expects KEY=VALUE", "got 'data.alpha'"]),
        (["--set", "data.alpha=-1"], ["--set: data.alpha = -1: Input should be greater than 0"]),
        (["--rounds", "0"], ["--rounds: rounds = 0", "greater than or equal to 1"]),
        (["--set", "data.alpah=0.1"], ["unknown key 'data.alpah'", "did you mean 'alpha'?"]),
        (["--set", "strategy.name='median'"], ["did you mean 'fedmedian'?"]),
    ],
)
def test_run_errors_say_where_the_value_came_from(tmp_path, args, fragments):
    result = invoke("run", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "defaults:" not in result.output and "ConfigError" not in result.output
    assert "cannot read config file" not in result.output
    assert not (tmp_path / "o").exists()


def test_server_rounds_zero_and_set_errors_are_labelled(tmp_path):
    result = invoke("server", "--insecure", "--rounds", "0", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--rounds: rounds = 0" in result.output, result.output
    result = invoke("server", "--insecure", "--set", "strategy.fraction_fitt=0.5")
    assert result.exit_code == 2 and "--set: unknown key" in result.output
    assert "did you mean 'fraction_fit'?" in result.output


def test_resume_of_a_missing_folder(tmp_path):
    result = invoke("run", "--resume", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert f"--resume {tmp_path / 'nope'}: no such folder" in result.output


def test_a_used_output_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *SMALL, "--out", str(out)).exit_code == 0
    first = (out / "history.json").read_text()
    result = invoke("run", *SMALL, "--out", str(out))
    assert result.exit_code == 2
    assert f"{out} already holds a run (history.json" in result.output
    assert "checkpoints/" in result.output and f"--resume {out}" in result.output
    assert "--overwrite" in result.output
    assert (out / "history.json").read_text() == first  # nothing was touched
    (out / "notes.txt").write_text("mine")
    stale = out / "checkpoints" / "round-000099"
    stale.mkdir()
    result = invoke("run", *SMALL, "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    # resuming the finished run says where it stands; extending it says where it goes on
    result = invoke("run", "--resume", str(out), "--no-progress")
    assert result.exit_code == 0
    assert "after round 2: all 2 rounds are done" in result.output
    result = invoke("run", "--resume", str(out), "--no-progress", "--rounds", "3")
    assert result.exit_code == 0, result.output
    assert "resuming after round 2" in result.output and "rounds 3 to 3" in result.output


def test_the_plot_names_its_run_and_curves(tmp_path, monkeypatch):
    from fedhive.cli import output

    seen = {}
    original = output.write_plot

    def spy(path, history, title=None):
        seen["title"] = title
        return original(path, history, title)

    monkeypatch.setattr(output, "write_plot", spy)
    assert invoke("run", *SMALL, "--out", str(tmp_path / "o")).exit_code == 0
    assert seen["title"] == "digits, fedavg, seed 1" == plot_title("digits", "fedavg", 1)
    assert CURVE_NAMES == {"centralized": "server test set", "federated": "client validation"}
    assert (tmp_path / "o" / "accuracy.png").stat().st_size > 0


def test_the_plot_is_written_on_interrupt(tmp_path, monkeypatch):
    from fedhive.cli import progress

    original = progress.EveryRound.on_round_end

    def stop_after_one(self, engine, record):
        original(self, engine, record)
        if record["round"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.EveryRound, "on_round_end", stop_after_one)
    result = invoke("run", *SMALL, "--out", str(tmp_path / "o"))
    assert result.exit_code == 130
    assert (tmp_path / "o" / "accuracy.png").exists()


def test_fedhive_run_without_a_single_fit_result_exits_1(tmp_path):
    # a learning rate this large overflows: every update is refused (NaN/Inf)
    proc = fedhive(tmp_path, "run", "run", *SMALL, "--set", "train.lr=1e308", "--out", "o")
    assert proc.wait(120) == 1, proc.stderr
    err = proc.stderr
    assert re.search(r"round 1: fit failed on 2 clients \(\d, \d\): array 0 contains NaN", err)
    assert "warning: round 2: no fit result succeeded (2 clients asked)" in err
    assert "error: no client's fit succeeded in 2 rounds" in err
    rounds = json.loads((tmp_path / "o" / "history.json").read_text())["rounds"]
    assert all(r["fit"]["num_results"] == 0 for r in rounds[1:])
