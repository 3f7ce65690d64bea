"""Smoke run of the McMahan et al. 2017 Table 2 benchmark: ``--quick`` must finish and print it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mcmahan_table2.py"


@pytest.mark.slow
def test_mcmahan_table2_quick_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    header = ("row", "iid rounds", "iid speedup", "non-iid rounds", "non-iid speedup")
    lines = proc.stdout.splitlines()
    assert any(line.startswith("row ") and all(c in line for c in header) for line in lines), (
        proc.stdout
    )
    assert "Reproduce:" in proc.stdout
