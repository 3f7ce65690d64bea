"""Smoke run of benchmarks/stragglers.py: --quick finishes and prints its tables."""

from __future__ import annotations

import pytest

from conftest import run_benchmark


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stragglers_benchmark_quick_run():
    out = run_benchmark("stragglers.py", "--quick", timeout=280)
    assert "s to target" in out and "fedbuff / fedavg+deadline" in out
    assert "CPU ms/task" in out and "command: nice -n " in out
    assert "fedbuff on the virtual clock / plain synchronous, CPU per task" in out
