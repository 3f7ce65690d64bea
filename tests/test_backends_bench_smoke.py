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


@pytest.mark.slow
def test_overhead_mode_measures_each_backend_per_round() -> None:
    out = run_benchmark(
        "backends.py", "--overhead", "--clients", "50", "--rounds", "3", "--repeats", "1",
        "--backends", "thread", timeout=60,
    )  # fmt: skip
    row = next(line.split() for line in out.splitlines() if line.startswith("thread "))
    assert row[1] == "2" and float(row[2]) > 0 and row[3] == "1.00x", out
    assert "load average" in out and "Reproduce:" in out


def test_both_sides_of_the_flower_comparison_train_the_same_mlp() -> None:
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _vs_common import client_rows, mlp_init, mlp_train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 40)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    rows = client_rows(3, 400)
    assert len(set(rows.tolist())) == 16 and (client_rows(3, 400) == rows).all()
    params = mlp_init()
    for epoch in range(30):
        params = mlp_train(params, x[:200], y[:200], seed=epoch)
    h = np.maximum(x[200:] @ params[0] + params[1], 0) @ params[2] + params[3]
    assert (h.argmax(axis=1) == y[200:]).mean() > 0.8  # it learns
