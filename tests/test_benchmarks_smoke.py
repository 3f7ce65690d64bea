"""Smoke runs of the benchmarks: each one with ``--quick`` must finish and print its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "columns"),
    [
        ("engine_overhead.py", ("ms/client-round", "ratio", "overhead ms", "target", "status")),
        ("aggregation.py", ("median ms", "ratio", "target", "peak extra MB", "x model")),
    ],
)
def test_benchmark_quick_run(script: str, columns: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("path ")]
    assert any(all(c in line for c in columns) for line in headers), proc.stdout
    assert "Reproduce:" in proc.stdout


def test_checkpoint_release_benchmark_quick_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(BENCHMARKS / "checkpoint_release.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "release+save wall" in proc.stdout and "FedAdam" in proc.stdout
    assert "reproduce:" in proc.stdout
