"""Smoke run of ``benchmarks/backends.py --quick``: it must finish and print its table.

Marked slow: the process-pool configurations spawn workers that import torch (~15 s).
"""

from __future__ import annotations

import pytest

from conftest import run_benchmark


@pytest.mark.slow
def test_backends_benchmark_quick_run() -> None:
    pytest.importorskip("torch")
    out = run_benchmark("backends.py", "--quick", timeout=110)
    lines = out.splitlines()
    columns = ("workload", "backend", "workers", "median s/round", "speed-up", "start cost s")
    assert any(line.startswith("workload ") and all(c in line for c in columns) for line in lines)
    rows = [line.split()[:3] for line in lines]
    for workload in ("torch", "numpy", "pure-python"):
        for backend, workers in (("thread", "1"), ("thread", "2"), ("process", "2")):
            assert [workload, backend, workers] in rows, out
    assert "Reproduce:" in out
