"""The privacy-utility benchmark's --quick mode runs and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "privacy_utility.py"


def test_privacy_utility_quick_run():
    pytest.importorskip("mnist1d")
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("path "))
    assert all(c in header for c in ("z", "epsilon", "accuracy", "ratio"))
    rows = [line for line in lines if line.startswith("DP-FedAvg ")]
    epsilons = [float(line.split()[3]) for line in rows[:3]]  # name, m, z, epsilon
    assert epsilons == sorted(epsilons, reverse=True)  # more noise, less epsilon
    assert "Reproduce:" in proc.stdout
