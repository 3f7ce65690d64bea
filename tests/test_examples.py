"""The examples in examples/ run end to end: a server and clients as real processes."""

from __future__ import annotations

import importlib.util
import re

import pytest

from deploy_helpers import ROOT, script, stop_all

EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _reap():
    """Stop the processes a test started, even when it fails."""
    yield
    stop_all()


def final_accuracy(output: str, rounds: int) -> float:
    found = re.search(rf"round {rounds}: loss [\d.]+, accuracy ([\d.]+)", output)
    assert found, output
    return float(found.group(1))


def test_pytorch_server_and_two_clients(tmp_path):
    server = script(
        tmp_path,
        "server",
        EXAMPLES / "pytorch" / "server.py",
        "--address",
        "127.0.0.1:0",
        "--rounds",
        "2",
    )
    try:
        address = f"127.0.0.1:{server.port()}"
        clients = [
            script(
                tmp_path,
                f"client{i}",
                EXAMPLES / "pytorch" / "client.py",
                "--server",
                address,
                "--partition-id",
                str(i),
            )
            for i in range(2)
        ]
        assert server.wait() == 0, server.stderr
        assert [c.wait() for c in clients] == [0, 0], [c.stderr for c in clients]
    finally:
        server.stop()
    assert final_accuracy(server.stdout, 2) > 0.5


def test_keras_clients_the_example_and_the_tutorials(tmp_path):
    """examples/keras/client.py and examples/keras/tutorial_client.py (a Flower tutorial's
    Keras client with only the import changed, no evaluate) in one federation of the
    example server, which holds no model; the federated evaluation improves."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("the 'keras' package (Keras 3) is not installed: pip install keras")
    server = script(
        tmp_path, "server", EXAMPLES / "keras" / "server.py",
        "--address", "127.0.0.1:0", "--rounds", "2", "--min-clients", "2",
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{server.port()}"
        example = script(
            tmp_path, "client", EXAMPLES / "keras" / "client.py",
            "--server", address, "--partition-id", "0", "--num-partitions", "2",
        )  # fmt: skip
        tutorial = script(
            tmp_path, "tutorial", EXAMPLES / "keras" / "tutorial_client.py",
            address, "1", "2", str(tmp_path / "initial.npz"),
        )  # fmt: skip
        assert server.wait() == 0, server.stderr
        assert example.wait() == 0, example.stderr
        assert tutorial.wait() == 0, tutorial.stderr
    finally:
        server.stop()
    assert tutorial.stderr.count("does not implement evaluate") == 1, tutorial.stderr
    assert "loss:" in tutorial.stdout  # Keras's progress lines: its model.fit ran
    assert final_accuracy(server.stdout, 2) > 0.5
