"""Smoke runs of the gRPC benchmarks: each one with ``--quick`` must finish and print its table.

Each run starts a server in the benchmark process and client processes on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "title", "columns"),
    [
        ("grpc_round.py", "gRPC round:", ("path", "s/round", "MB/s", "ratio", "target", "status")),
        ("grpc_latency.py", "gRPC latency:", ("path", "median ms", "ratio", "target ms", "status")),
        (
            "grpc_many_clients.py",
            "gRPC many clients:",
            ("phase", "clients/round", "s/round", "rounds/min", "server CPU s/round"),
        ),
    ],
)
def test_grpc_benchmark_quick_run(script: str, title: str, columns: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith(title), proc.stdout
    header = columns[0] + " "
    assert any(line.startswith(header) and all(c in line for c in columns) for line in lines), (
        proc.stdout
    )
    assert "Reproduce:" in lines[-1]
