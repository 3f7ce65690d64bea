"""A DP server killed at any point of a round, then resumed, releases each round once.

The new model, its privacy charge and the checkpoint are one durable step taken before
anything outside the server sees the model (evaluation is the first to). These tests
kill a real server process (``os._exit``, no cleanup) at each point of round 2, resume
it with ``--resume`` and check what the world saw (a log the server writes before it
lets a model out) against what the resumed server reports: one model per round, the
history and the final model describe it, and the epsilon charged covers every release.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedhive.privacy.accounting import PrivacyAccountant, Release
from fedhive.server.checkpoint import load_npz
from grpc_helpers import ROOT, client_process, finish
from test_grpc_faults import free_port

SERVER = ROOT / "tests" / "apps" / "crash_server.py"
CRASH_CODE = 17
ROUNDS = 3
POINTS = [
    "aggregated",
    "release-written",
    "released",
    "evaluated",
    "saved-unswitched",
    "saved",
]


def server(port, tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    command = [
        sys.executable, str(SERVER), "--port", str(port), "--rounds", str(ROUNDS),
        "--checkpoint", str(tmp_path / "ckpt"), "--releases", str(tmp_path / "releases.jsonl"),
        *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_with_a_crash(tmp_path, point: str) -> dict:
    port = free_port()
    address = f"127.0.0.1:{port}"
    clients = [
        client_process(address, "--pid", str(i), "--node-id", f"n{i}", "--persistent")
        for i in range(2)
    ]
    try:
        first = server(port, tmp_path, "--crash", point, "--crash-round", "2")
        _, err = first.communicate(timeout=120)
        assert first.returncode == CRASH_CODE, err[-3000:]
        out = tmp_path / "history.json"
        second = server(port, tmp_path, "--resume", "--history", str(out))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err[-3000:]
    finally:
        for proc in clients:
            proc.kill()
        finish(clients)
    return json.loads(out.read_text())


def releases(tmp_path) -> dict[int, list[dict]]:
    seen: dict[int, list[dict]] = {}
    for line in (tmp_path / "releases.jsonl").read_text().splitlines():
        entry = json.loads(line)
        seen.setdefault(entry["round"], []).append(entry)
    return seen


def epsilon(rounds: int, delta: float) -> float:
    accountant = PrivacyAccountant("none")
    accountant.record(Release(1.0), rounds)
    return accountant.epsilon(delta)


def check_consistent(tmp_path, history: dict) -> None:
    rounds = [r["round"] for r in history["rounds"]]
    assert rounds == list(range(ROUNDS + 1))  # no round lost, none run twice
    seen = releases(tmp_path)
    assert sorted(seen) == list(range(ROUNDS + 1))
    for rnd, entries in seen.items():
        # a round evaluated again after a resume shows the same model; never a second one
        assert len({e["sha256"] for e in entries}) == 1, (rnd, entries)
    for record in history["rounds"]:
        assert record["centralized"]["loss"] == seen[record["round"]][0]["mean"]
    final = np.concatenate([a.ravel() for a in load_npz(tmp_path / "ckpt" / "final_model.npz")])
    assert hashlib.sha256(final.tobytes()).hexdigest() == seen[ROUNDS][0]["sha256"]
    released = len(seen) - 1  # round 0 is the initial model, not a DP release
    metrics = history["rounds"][-1]["fit"]["metrics"]
    assert metrics["dp_rounds"] == released
    assert metrics["epsilon"] == pytest.approx(epsilon(released, metrics["delta"]))
    for record in history["rounds"][1:]:
        fit = record["fit"]["metrics"]
        assert fit["dp_rounds"] == record["round"]
        assert fit["epsilon"] == pytest.approx(epsilon(record["round"], fit["delta"]))


@pytest.mark.slow  # two server processes and two clients per point: about 15 s each
@pytest.mark.parametrize("point", POINTS)
def test_a_server_killed_at_any_point_of_a_round_releases_each_round_once(tmp_path, point):
    history = run_with_a_crash(tmp_path, point)
    check_consistent(tmp_path, history)
