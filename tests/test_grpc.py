"""Real deployments: a server and client processes talking gRPC on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np

import fedhive as fl
from fedhive.common import ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from grpc_helpers import ServerThread, client_process, client_tls_args, finish, make_certificates


def strategy(n, **kwargs):
    return FedAvg(
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
        evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
        **kwargs,
    )


def test_flower_style_federation_of_three_processes():
    server = ServerThread(config=ServerConfig(num_rounds=2), strategy=strategy(3)).start()
    procs = [client_process(server.address, "--pid", str(i)) for i in range(3)]
    history = server.join()
    results = finish(procs)
    assert [code for code, _ in results] == [0, 0, 0], results
    # round 1: deltas 1, 2, 3 weighted 1, 2, 3 -> 14/6; round 2 adds it again
    assert history.losses_centralized[-1][1] == np.float32(2 * 14 / 6)
    assert [r for r, _ in history.losses_distributed] == [1, 2]
    assert history.rounds[-1]["fit"]["num_results"] == 3


def test_tls_with_mutual_auth_and_tokens(tmp_path):
    certs = make_certificates(tmp_path)
    read = {k: v.read_bytes() for k, v in certs.items()}
    server = ServerThread(
        config=ServerConfig(num_rounds=1),
        strategy=strategy(2),
        certificates=(read["ca"], read["server"], read["server_key"]),
        require_client_auth=True,
        auth_tokens={"alice": "s3cret-a", "bob": "s3cret-b"},
    ).start()
    tls = client_tls_args(certs)
    intruder = client_process(server.address, "--node-id", "mallory", "--token", "guess", *tls)
    ((intruder_code, intruder_err),) = finish([intruder])
    assert intruder_code == 2 and "AuthenticationError" in intruder_err
    assert "not enrolled" in intruder_err
    audit = tmp_path / "audit.jsonl"
    alice = ["--node-id", "alice", "--token", "s3cret-a", "--audit", str(audit)]
    bob = ["--node-id", "bob", "--token", "s3cret-b", "--pid", "1"]
    good = [
        client_process(server.address, *alice, *tls),
        client_process(server.address, *bob, *tls),
    ]
    history = server.join()
    assert [code for code, _ in finish(good)] == [0, 0]
    ids = {c["client_id"] for c in history.rounds[-1]["distributed"]["clients"]}
    assert ids == {"alice", "bob"}  # mallory never took part
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["fit", "evaluate"]
    assert all(e["size"] > 0 and len(e["sha256"]) == 64 for e in entries)


def test_client_without_the_ca_cannot_connect(tmp_path):
    certs = make_certificates(tmp_path)
    read = {k: v.read_bytes() for k, v in certs.items()}
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")
    server = ServerThread(
        config=ServerConfig(num_rounds=0),
        strategy=strategy(1),
        certificates=(read["ca"], read["server"], read["server_key"]),
        wait_timeout=0.1,
    ).start()
    proc = client_process(server.address, "--node-id", "x", "--ca", str(other["ca"]))
    ((code, err),) = finish([proc])
    server.join()
    assert code == 2 and "giving up" in err


def test_a_client_dying_mid_round_does_not_stop_the_round():
    server = ServerThread(
        # the wait covers three client processes starting on a loaded machine; the
        # evaluation then waits it out for the dead client once
        config=ServerConfig(num_rounds=1, round_timeout=30),
        strategy=strategy(3),
        wait_timeout=10,
    ).start()
    procs = [
        client_process(server.address, "--pid", "0"),
        client_process(server.address, "--pid", "1", "--mode", "die"),
        client_process(server.address, "--pid", "2"),
    ]
    history = server.join()
    finish(procs)
    record = history.rounds[-1]
    assert record["fit"]["num_results"] == 2
    (failure,) = record["failures"]
    assert "disconnected" in failure["reason"]
    assert record["distributed"] is None  # 2 clients left, 3 required to evaluate


def test_nan_update_over_the_network_is_refused_and_named():
    server = ServerThread(config=ServerConfig(num_rounds=1), strategy=strategy(2)).start()
    procs = [
        client_process(server.address, "--pid", "0"),
        client_process(server.address, "--pid", "1", "--mode", "nan", "--node-id", "bad-node"),
    ]
    history = server.join()
    finish(procs)
    (failure,) = history.rounds[-1]["failures"]
    assert failure["client_id"] == "bad-node" and "NaN" in failure["reason"]
    assert history.losses_centralized[-1][1] == 1.0


def test_protocol_version_mismatch_is_clear_on_both_sides(caplog):
    import pytest

    from fedhive.transport.grpc_client import ClientSecurity, ClientSession
    from fedhive.transport.grpc_server import GrpcServer

    server = GrpcServer("127.0.0.1:0").start()
    try:
        session = ClientSession(
            f"127.0.0.1:{server.port}", "old", lambda t: t,
            security=ClientSecurity(insecure=True), protocol_version=99,
        )  # fmt: skip
        with pytest.raises(fl.TransportError, match="protocol version mismatch"):
            session.run()
    finally:
        server.close()
    assert any("protocol version mismatch" in r.getMessage() for r in caplog.records)


def _one_round_with_late_joiners(strategy):
    """One round: one client connects well before two others; all three must end by
    themselves (told the run ended)."""
    import time

    server = ServerThread(config=ServerConfig(num_rounds=1), strategy=strategy).start()
    procs = [client_process(server.address, "--pid", "0")]
    time.sleep(3.0)
    procs += [client_process(server.address, "--pid", str(i)) for i in (1, 2)]
    history = server.join()
    results = finish(procs, timeout=30)
    assert [code for code, _ in results] == [0, 0, 0], results
    return history


def test_round_one_starts_once_min_available_clients_are_connected():
    """fraction_fit=1.0 sizes a round from the clients connected when it starts: the
    first round waits for min_available_clients, so it asks all three, not the one (and
    min_fit_clients) that had connected by then."""
    st = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_available_clients=3,
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
    )  # fmt: skip
    history = _one_round_with_late_joiners(st)
    assert history.rounds[-1]["fit"]["num_clients"] == 3


def test_fedbuff_starts_once_min_available_clients_are_connected():
    """An asynchronous strategy's min_available_clients (on its FedAvg sampling) holds the
    first dispatch too, not only its concurrency: with two in flight and three wanted, the
    run waits for the third, so no client comes after the run and finds no server."""
    from fedhive.server.strategy import FedBuff

    st = FedBuff(
        buffer_size=2, concurrency=2, staleness="constant", min_available_clients=3,
        fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32)]),
    )  # fmt: skip
    history = _one_round_with_late_joiners(st)
    # The late joiners all ended by themselves (checked above): the run was still on when
    # they came. Which clients filled the buffer is a race (a fast client may give both).
    contributions = history.rounds[-1]["contributions"]
    assert sum(c["results"] for c in contributions) == 2, contributions
