"""Smoke run of the McMahan et al. 2017 Table 2 benchmark: ``--quick`` must finish and print it."""

from __future__ import annotations

import pytest

from conftest import run_benchmark


@pytest.mark.slow
def test_mcmahan_table2_quick_run() -> None:
    out = run_benchmark("mcmahan_table2.py", "--quick", timeout=300)
    header = ("row", "iid rounds", "iid speedup", "non-iid rounds", "non-iid speedup")
    lines = out.splitlines()
    assert any(line.startswith("row ") and all(c in line for c in header) for line in lines), out
    assert "Reproduce:" in out
