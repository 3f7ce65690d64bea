"""Shared toy clients for the engine and simulation tests."""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np
import pytest

import fedhive as fl
from fedhive.client import Context


class AddClient(fl.client.NumPyClient):
    """fit returns parameters + (1 + partition id); evaluate reports the mean."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def get_parameters(self, config):
        return [np.zeros(4, np.float32), np.zeros((2, 3), np.float32)]

    def fit(self, parameters, config):
        delta = 1.0 + self.pid
        return [p + delta for p in parameters], 1 + self.pid, {"pid": self.pid}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 2, {"acc": self.pid / 10}


def add_client_fn(context: Context) -> fl.client.Client:
    return AddClient(int(context.node_config["partition-id"])).to_client()


class NoisyClient(fl.client.NumPyClient):
    """Uses the task seed and per-client state: deterministic given the run seed."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters, config):
        rng = self.context.rng
        state = self.context.state.metric_records.setdefault("stats", {"calls": 0})
        state["calls"] = int(state["calls"]) + 1
        noise = rng.normal(size=parameters[0].shape).astype(np.float32)
        time.sleep(float(rng.uniform(0, 0.003)))  # scramble arrival order across workers
        new = [parameters[0] + 0.1 * noise + 0.01 * state["calls"]]
        return new, int(rng.integers(1, 20)), {"calls": state["calls"]}

    def evaluate(self, parameters, config):
        return (
            float(np.abs(parameters[0]).mean()),
            3,
            {"norm": float(np.linalg.norm(parameters[0]))},
        )


def noisy_client_fn(context: Context) -> NoisyClient:
    return NoisyClient(context)


def initial(shape=(8,)) -> fl.common.Parameters:
    return fl.common.ndarrays_to_parameters([np.zeros(shape, np.float32)])


def weighted_acc(metrics):
    total = sum(n for n, _ in metrics)
    return {"acc": sum(n * m["acc"] for n, m in metrics) / total}


@pytest.fixture
def release():
    """An event that hanging clients wait on; set at teardown so threads end."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def restore_process_state(monkeypatch):
    """The CLI commands set the fedhive logger's level and put --app-dir on sys.path; the
    processes a test started are stopped, even when it failed. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("restore_process_state")``."""
    monkeypatch.setattr(sys, "path", sys.path.copy())
    logger = logging.getLogger("fedhive")
    level = logger.level
    yield
    logger.setLevel(level)
    from deploy_helpers import stop_all

    stop_all()


def run_benchmark(name: str, *args: str, timeout: float = 120) -> str:
    """Run ``benchmarks/NAME`` (warnings are errors) and return its output; it must exit 0."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / name
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
