"""Many clients in one process on one asyncio loop (``start_clients``), over real gRPC.

Each node has its own session and context; the sessions share one event loop and a small
thread pool for the clients' work, so a process can hold hundreds of nodes with a few dozen
threads, and a long fit never stops a node's heartbeats.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import ConfigError
from fedhive.common.records import ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ServerThread, client_process, finish, make_certificates


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _strategy(n: int, evaluate: bool = False) -> FedAvg:
    return FedAvg(
        min_fit_clients=n, min_available_clients=n, min_evaluate_clients=n,
        fraction_evaluate=1.0 if evaluate else 0.0,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
    )  # fmt: skip


def test_two_hundred_clients_in_one_process_complete_rounds_with_few_threads() -> None:
    strategy = _strategy(200, evaluate=True)
    server = ServerThread(config=ServerConfig(num_rounds=2), strategy=strategy).start()
    proc = client_process(server.address, "--aio", "--sessions", "200", "--node-id", "a")
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            most[0] = max(most[0], _threads(proc.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        history = server.join(timeout=120)
        ((code, err),) = finish([proc], timeout=60)
    finally:
        stop.set()
    assert code == 0, err
    assert [r["fit"]["num_results"] for r in history.rounds] == [200, 200]
    # each node adds 1 + (index % 3) with weight 1 + (index % 3); evaluation reports the
    # model's mean, so after two rounds it is twice the weighted mean step
    weights = np.array([1 + i % 3 for i in range(200)], np.float64)
    step = float((weights * weights).sum() / weights.sum())
    assert history.losses_distributed[-1][1] == pytest.approx(2 * step, rel=1e-6)
    assert most[0] < 80, most[0]  # threads for 200 nodes: pool of 32 plus gRPC's own


def test_a_long_fit_does_not_stop_the_heartbeats() -> None:
    server = ServerThread(
        config=ServerConfig(num_rounds=1), strategy=_strategy(3), heartbeat_timeout=1.5
    ).start()
    proc = client_process(
        server.address, "--aio", "--sessions", "3", "--mode", "slow", "--heartbeat", "0.3"
    )
    history = server.join(timeout=60)
    ((code, err),) = finish([proc], timeout=30)
    assert code == 0, err
    fit = history.rounds[-1]["fit"]
    assert fit["num_results"] == 3 and not history.rounds[-1]["failures"]


def test_a_refused_node_stops_the_group_with_an_error_naming_it() -> None:
    server = ServerThread(
        config=ServerConfig(num_rounds=1),
        strategy=_strategy(2),
        auth_tokens={"t-0": "right", "t-1": "right"},
        wait_timeout=5.0,
    ).start()
    proc = client_process(server.address, "--aio", "--sessions", "2", "--node-id", "t",
                          "--token", "wrong")  # fmt: skip
    ((code, err),) = finish([proc], timeout=60)
    assert code == 2
    assert "AuthenticationError: node 't-" in err and "refused" in err
    history = server.join(timeout=60)  # it gave up waiting for enrolled clients
    assert all(r.get("fit", {}).get("num_results", 0) == 0 for r in history.rounds)


def test_nodes_over_mutual_tls_with_their_own_tokens(tmp_path) -> None:
    certs = make_certificates(tmp_path)
    read = {k: v.read_bytes() for k, v in certs.items()}
    server = ServerThread(
        config=ServerConfig(num_rounds=1),
        strategy=_strategy(3),
        certificates=(read["ca"], read["server"], read["server_key"]),
        require_client_auth=True,
        auth_tokens={f"m-{i}": "tok" for i in range(3)},
    ).start()
    tls = ["--ca", str(certs["ca"]), "--cert", str(certs["client"]),
           "--key", str(certs["client_key"])]  # fmt: skip
    proc = client_process(server.address, "--aio", "--sessions", "3", "--node-id", "m",
                          "--token", "tok", *tls)  # fmt: skip
    history = server.join(timeout=60)
    ((code, err),) = finish([proc], timeout=30)
    assert code == 0, err
    assert history.rounds[-1]["fit"]["num_results"] == 3


def test_node_ids_are_checked() -> None:
    for ids in ([], ["a", "a"]):
        with pytest.raises(ConfigError, match="node id"):
            fl.client.start_clients(server_address="127.0.0.1:1", client_fn=lambda c: None,
                                    node_ids=ids, insecure=True)  # fmt: skip


def test_clients_retry_until_the_server_is_up() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = client_process(f"127.0.0.1:{port}", "--aio", "--sessions", "5")
    time.sleep(1.5)  # the clients are retrying with backoff
    history_box: dict[str, object] = {}

    def serve() -> None:
        history_box["h"] = fl.server.start_server(
            server_address=f"127.0.0.1:{port}", config=ServerConfig(num_rounds=1),
            strategy=_strategy(5), wait_timeout=60.0,
        )  # fmt: skip

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(90)
    ((code, err),) = finish([proc], timeout=60)
    assert code == 0, err
    history = history_box["h"]
    assert history.rounds[-1]["fit"]["num_results"] == 5  # type: ignore[attr-defined]
