"""``fedhive client --state-dir``: a deployed client keeps its personal layers across a
restart of its process (real processes over gRPC)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from fedhive.common.records import ndarrays_to_parameters
from fedhive.common.serde import decode_record_dict
from fedhive.models.torch_models import get_weights
from fedhive.personalization.client import META_RECORD, STATE_RECORD, split_for
from fedhive.server.checkpoint import load_npz
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ServerThread, finish

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
FIT = {"local_epochs": 1, "batch_size": 10, "lr": 0.1, "momentum": 0.0}


def _serve(tmp_path: Path, initial, fit: bool, state_dir: Path, tag: str):
    """One run of one round (fit and evaluate, or evaluate only) with one ``fedhive
    client`` process; the run's history and the client's stderr."""
    strategy = FedAvg(
        fraction_fit=1.0 if fit else 0.0,
        min_fit_clients=1 if fit else 0,
        min_evaluate_clients=1,
        min_available_clients=1,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda rnd: dict(FIT),
    )
    server = ServerThread(
        config=ServerConfig(num_rounds=1), strategy=strategy, wait_timeout=60,
        checkpoint_dir=tmp_path / f"ckpt-{tag}",
    ).start()  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhive.cli.main", "client", "--server", server.address,
         "--insecure", "--app", "personal_client:client_fn", "--app-dir", str(APPS),
         "--state-dir", str(state_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    history = server.join(timeout=90)
    ((code, err),) = finish([proc])
    assert history is not None and code == 0, err
    (row,) = history.rounds[-1]["distributed"]["clients"]
    return history, row, err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fedhive_client_state_dir_keeps_personal_layers_across_a_restart(tmp_path):
    """Run 1 trains a FedPer site (``fedhive client --state-dir``); its process exits. A
    new process with the same folder (and so the same node id) serves run 2, which only
    evaluates: it reports exactly the personal model the first process left, unlike a
    site started with an empty folder, whose personal model is the global one."""
    sys.path.insert(0, str(APPS))
    from personal_client import CONFIG, model  # type: ignore[import-not-found]

    net = model()
    split = split_for(net, CONFIG)
    shared = split.shared(get_weights(net))
    state = tmp_path / "state"

    _, row, err = _serve(tmp_path, shared, True, state, "1")
    node = (state / "node_id").read_text().strip()
    assert row["client_id"] == node, err
    (saved,) = state.glob("state-*.fhv")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # learnt from local data
    kept = decode_record_dict(bytearray(saved.read_bytes()))
    personal = kept.array_records[STATE_RECORD]
    head = [a.shape for a in split.personal_part(get_weights(net))]
    assert [personal[str(i)].shape for i in range(len(personal))] == head
    assert kept.config_records[META_RECORD]["method"] == "fedper"
    trained = load_npz(tmp_path / "ckpt-1" / "final_model.npz")
    assert [a.shape for a in trained] == [a.shape for a in shared]  # the body only

    second, again, err = _serve(tmp_path, trained, False, state, "2")
    assert second.rounds[-1]["fit"]["num_clients"] == 0
    assert again["client_id"] == node, err
    metrics, before = again["metrics"], row["metrics"]
    assert metrics["p_test_accuracy"] == before["p_test_accuracy"], err
    assert metrics["p_test_loss"] == pytest.approx(before["p_test_loss"])
    assert metrics["p_test_loss"] != pytest.approx(metrics["g_test_loss"])

    _, fresh, err = _serve(tmp_path, trained, False, tmp_path / "empty", "3")
    assert fresh["client_id"] != node
    assert fresh["metrics"]["p_test_loss"] == pytest.approx(fresh["metrics"]["g_test_loss"])
    assert fresh["metrics"]["p_test_loss"] != pytest.approx(metrics["p_test_loss"]), err


def test_state_dir_that_is_a_file_is_refused(tmp_path):
    from typer.testing import CliRunner

    from fedhive.cli.main import app

    not_a_folder = tmp_path / "state"
    not_a_folder.write_text("x")
    result = CliRunner().invoke(
        app,
        ["client", "--server", "127.0.0.1:1", "--insecure", "--demo",
         "--state-dir", str(not_a_folder)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output
    assert not_a_folder.read_text() == "x"
