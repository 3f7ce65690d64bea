"""The privacy-utility benchmark's --quick mode runs and prints its table."""

from __future__ import annotations

import pytest

from conftest import run_benchmark


def test_privacy_utility_quick_run():
    pytest.importorskip("mnist1d")
    out = run_benchmark("privacy_utility.py", "--quick", timeout=120)
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("path "))
    assert all(c in header for c in ("z", "epsilon", "accuracy", "ratio"))
    rows = [line for line in lines if line.startswith("DP-FedAvg ")]
    epsilons = [float(line.split()[3]) for line in rows[:3]]  # name, m, z, epsilon
    assert epsilons == sorted(epsilons, reverse=True)  # more noise, less epsilon
    assert "Reproduce:" in out
