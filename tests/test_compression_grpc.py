"""Compression over real gRPC: unchanged deployed clients, bytes as the transport counts
them (checked against the clients' audit logs), the residual across a client restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedhive.common.records import ndarrays_to_parameters
from fedhive.common.serde import decode_record_dict
from fedhive.compression import RESIDUAL_RECORD, TopK
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ROOT, ServerThread, finish

APP = Path(__file__).resolve().parent / "apps" / "compression_client.py"


def client(address, pid, tmp: Path, run: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    args = [
        "--address",
        address,
        "--pid",
        str(pid),
        "--state",
        str(tmp / f"state{pid}"),
        "--audit",
        str(tmp / f"audit{pid}-{run}.jsonl"),
        "--marker",
        str(tmp / f"m{pid}-{run}"),
    ]
    return subprocess.Popen(
        [sys.executable, str(APP), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve(rounds=2):
    model = [np.zeros((40, 50), np.float32), np.zeros(50, np.float32)]
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters(model),
        min_fit_clients=2,
        min_available_clients=2,
        min_evaluate_clients=2,
    )
    return ServerThread(
        config=ServerConfig(num_rounds=rounds, round_timeout=60),
        strategy=strategy,
        compression=TopK(ratio=0.05, error_feedback=True),
        seed=1,
    ).start()


def audit_sizes(path: Path) -> int:
    return sum(json.loads(line)["size"] for line in path.read_text().splitlines())


def test_deployed_clients_answer_compressed_rounds_and_keep_their_residual(tmp_path):
    server = serve()
    procs = [client(server.address, pid, tmp_path, 1) for pid in (0, 1)]
    history = server.join(120)
    for code, err in finish(procs):
        assert code == 0, err
    rounds = [r for r in history.rounds if r["round"] > 0]
    assert all(r["fit"]["num_results"] == 2 for r in rounds)
    # bytes up as the server's transport counted them == what left the clients
    sent = sum(audit_sizes(tmp_path / f"audit{pid}-1.jsonl") for pid in (0, 1))
    assert sum(r["bytes_up"] for r in history.rounds) == sent
    dense = 2 * 2 * 4 * 2050  # two rounds, two clients, float32 model
    fit_up = sum(r["bytes_up"] for r in rounds)
    assert fit_up < dense  # fit and evaluate replies together are smaller than dense fits
    for pid in (0, 1):
        assert (tmp_path / f"m{pid}-1").read_text() == "empty"
        (state_file,) = (tmp_path / f"state{pid}").glob("state-*.fhv")
        state = decode_record_dict(bytearray(state_file.read_bytes()))
        assert state.array_records[RESIDUAL_RECORD]["0"].shape == (2000,)

    # the clients restart (new processes, same state directories) for the next run
    server = serve(rounds=1)
    procs = [client(server.address, pid, tmp_path, 2) for pid in (0, 1)]
    server.join(120)
    for code, err in finish(procs):
        assert code == 0, err
    for pid in (0, 1):
        assert (tmp_path / f"m{pid}-2").read_text() == "residual"
