"""Smoke run of ``benchmarks/secagg.py --quick``: it must finish and print its tables.

About a second: tiny models (1k parameters), 6 and 10 clients, one timed round each.
"""

from __future__ import annotations

from conftest import run_benchmark


def test_secagg_benchmark_quick_run() -> None:
    out = run_benchmark("secagg.py", "--quick", timeout=120)
    lines = out.splitlines()
    time_columns = (
        "config",
        "plain round s",
        "SecAgg+ round s",
        "plain server s",
        "client s/update",
    )
    assert any(all(c in line for c in time_columns) for line in lines), out
    assert any("SecAgg+ up/client" in line and "up x" in line for line in lines), out
    assert any("client ms/update: key agr" in line and "mask exp" in line for line in lines), out
    for config in ("n=6 P=1k default k no drop", "n=10 P=1k default k 10% drop"):
        assert any(line.startswith(config) for line in lines), out
    targets = [
        line for line in lines if line.startswith(("bytes up per", "client overhead", "server vs"))
    ]
    assert len(targets) == 4, out
    assert all(line.rstrip().endswith(("PASS", "ABOVE TARGET")) for line in targets), out
    assert any(line.startswith("n=6 P=1k complete no drop") for line in lines), out
    assert "model check: every run's final model matched the exact FedAvg result" in out
    assert "Reproduce: .venv/bin/python benchmarks/secagg.py --quick" in out
