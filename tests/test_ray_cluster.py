"""The Ray backend joins a cluster started with ``ray start --head`` and leaves it running.

A module of its own: no Ray session may run in this process before the backend joins.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_ray_backend import _env_with_tests_on_path, pytestmark, simulate

ray = pytest.importorskip("ray")

__all__ = ["pytestmark"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no Ray head on port {port} after {timeout} s")


@pytest.mark.slow
def test_joins_a_running_cluster_and_never_shuts_it_down():
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
        env=_env_with_tests_on_path(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_port(port, 90)
        history = simulate("ray", rounds=1, ray_init_args={"address": address})
        assert history.config["backend"] == "ray" and not ray.is_initialized()
        assert head.poll() is None  # the cluster still runs
        again = simulate("ray", rounds=1, ray_init_args={"address": address})
        assert again.without_timings()["rounds"] == history.without_timings()["rounds"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the cluster this test started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_session_it_starts_is_sized_by_the_node_and_shut_down():
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env_with_tests_on_path()["PYTHONPATH"]
    try:
        history = simulate("ray", rounds=1, ray_init_args={"log_to_driver": False})
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert history.config["backend"] == "ray"
    assert not ray.is_initialized()  # its own session: stopped at the end
