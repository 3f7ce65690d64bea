"""Smoke runs of the strategy reproductions: each ``--quick`` run finishes and prints its
table, its pass rule (where it has one) and the ``Reproduce:`` line, and leaves no file.

Wall times on an idle machine: fedprox_stragglers 1 s, adaptive_optimizers 4.5 s,
scaffold_fednova 4 s, robustness 7 s (30 short simulations; up to 30 s on a loaded
machine, so it is marked slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        pytest.param(
            "fedprox_stragglers.py",
            ("stragglers", "train loss", "test acc", "FedProx mu=1", "Pass rule"),
        ),
        pytest.param(
            "adaptive_optimizers.py",
            ("rounds (median)", "server lr", "FedAdam", "FedYogi", "FedAdagrad", "best adaptive"),
        ),
        pytest.param(
            "scaffold_fednova.py",
            ("rounds (median)", "FedNova", "SCAFFOLD", "FedAvg / method"),
        ),
        pytest.param(
            "robustness.py",
            ("20% signflip", "10% gaussian", "Bulyan f=4", "Krum f=4", "pass rule"),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_reproduction_quick_run(script: str, expected: tuple[str, ...], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, (text, proc.stdout)
    assert "Reproduce: .venv/bin/python benchmarks/" + script + " --quick" in proc.stdout
    assert "saved to" not in proc.stderr  # --quick writes no report file
