"""Full runs with SecAgg+: in simulation and over real gRPC between processes, accuracy
matches a run without it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from apps.digits_client import DigitsClient
from fedhive.common import ndarrays_to_parameters
from fedhive.models import numpy_lr
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from grpc_helpers import ROOT, ServerThread, finish, secure_mean_round

NUM_CLIENTS = 20


def _test_split():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order][1400:] / 16.0, y[order][1400:]  # the clients share the first 1400


TEST = _test_split()


def _accuracy(rnd, params, config):
    loss, acc = numpy_lr.evaluate(params, *TEST)
    return loss, {"accuracy": acc}


def _run(secure_aggregation):
    strategy = FedAvg(
        fraction_fit=0.5,
        fraction_evaluate=0.0,
        initial_parameters=ndarrays_to_parameters(numpy_lr.init_params(64, 10, seed=0)),
        evaluate_fn=_accuracy,
    )
    return start_simulation(
        client_fn=lambda cid: DigitsClient(int(cid), NUM_CLIENTS),
        num_clients=NUM_CLIENTS,
        strategy=strategy,
        config=ServerConfig(num_rounds=15),
        secure_aggregation=secure_aggregation,
        seed=0,
    )


def test_simulated_run_with_secagg_reaches_the_plain_accuracy():
    plain = _run(None).metrics_centralized["accuracy"][-1][1]
    secure_hist = _run({"bits": 16, "clip": 0.5})
    secure = secure_hist.metrics_centralized["accuracy"][-1][1]
    assert plain > 0.85
    assert abs(secure - plain) <= 0.01, (plain, secure)
    secagg = secure_hist.rounds[-1]["fit"]["secagg"]
    assert secagg["clients"] == 10 and secagg["after_unmask"] == 10


@pytest.mark.timeout(180)
def test_grpc_run_with_secagg_and_a_client_dying_mid_round():
    """Five client processes, one dies while training: the others' mean goes through."""
    history = secure_mean_round(5, {"threshold": 3, "bits": 16, "clip": 8.0})
    first = history.rounds[1]
    assert first["fit"]["updated"], first["fit"]
    assert first["fit"]["secagg"]["dropped_after_sharing"] == 1
    (failure,) = first["failures"]
    assert failure["stage"] == "fit"
    # deltas 1..4 weighted 1..4: 30 / 10 = 3 per round, within the quantization bound
    step = 2 * 8.0 / (2**16 - 1)
    assert abs(history.losses_centralized[1][1] - 3.0) <= step


def _grpc_digits_run(secure_aggregation, num_clients=4):
    import os
    import subprocess
    import sys

    server = ServerThread(
        config=ServerConfig(num_rounds=8, round_timeout=60),
        strategy=FedAvg(
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters(numpy_lr.init_params(64, 10, seed=0)),
            evaluate_fn=_accuracy,
        ),
        secure_aggregation=secure_aggregation,
        wait_timeout=60,
    ).start()
    app = ROOT / "tests" / "apps" / "digits_client.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(app),
                "--address",
                server.address,
                "--pid",
                str(i),
                "--num-clients",
                str(num_clients),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_clients)
    ]
    history = server.join(timeout=150)
    assert [code for code, _ in finish(procs)] == [0] * num_clients
    return history


@pytest.mark.timeout(300)
def test_grpc_digits_run_with_secagg_reaches_the_plain_accuracy():
    plain = _grpc_digits_run(None).metrics_centralized["accuracy"][-1][1]
    secure_hist = _grpc_digits_run({"bits": 16, "clip": 0.5})
    secure = secure_hist.metrics_centralized["accuracy"][-1][1]
    assert plain > 0.85
    assert abs(secure - plain) <= 0.01, (plain, secure)
    assert all(r["fit"]["updated"] for r in secure_hist.rounds[1:])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_grpc_round_on_a_derived_graph_with_a_client_dying_mid_round():
    """Eight clients over gRPC (five processes, one of them with three sessions) on a
    degree-4 graph that every client derives in the secagg.graph stage; one process dies
    while training, after sharing its keys, and the others' mean goes through."""
    history = secure_mean_round(
        8,
        {"degree": 4, "threshold": 3, "bits": 16, "clip": 8.0},
        extra=[["--sessions", "3", "--node-id", "s"]],
        timeout=200,
        round_timeout=90,
        wait_timeout=60,
    )
    first = history.rounds[1]
    assert first["fit"]["updated"], first["fit"]
    secagg = first["fit"]["secagg"]
    assert secagg["graph"] == "derived" and secagg["degree"] == 4
    assert secagg["after_graph"] == 8 and secagg["dropped_after_sharing"] == 1
    # pids 0..3 and 0, 1, 2 survive: deltas 1 + pid weighted 1 + pid, 44 / 16 = 2.75
    step = 2 * 8.0 / (2**16 - 1)
    assert abs(history.losses_centralized[1][1] - 2.75) <= step
