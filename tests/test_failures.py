"""Failure injection: every bad client is recorded and the good results still count."""

from __future__ import annotations

import numpy as np
import pytest

import fedhive as fl
from conftest import AddClient, initial
from fedhive.common import ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation


class Bad(fl.client.NumPyClient):
    def __init__(self, kind: str, release=None) -> None:
        self.kind = kind
        self.release = release

    def fit(self, parameters, config):
        p = parameters[0]
        if self.kind == "raise":
            raise RuntimeError("disk full")
        if self.kind == "hang":
            self.release.wait(30)
            return [p + 100], 1, {}
        if self.kind == "nan":
            return [np.full_like(p, np.nan)], 1, {}
        if self.kind == "inf":
            out = p.copy()
            out[0] = np.inf
            return [out], 1, {}
        if self.kind == "shape":
            return [np.zeros(p.size + 1, p.dtype)], 1, {}
        if self.kind == "count":
            return [p, p], 1, {}
        if self.kind == "dtype":
            return [p.astype(str)], 1, {}
        if self.kind == "object":
            return [np.array([object()] * p.size)], 1, {}
        if self.kind == "notarray":
            return [p.tolist()], 1, {}
        if self.kind == "num_examples":
            return [p], -3, {}
        if self.kind == "metrics":
            return [p], 1, {"bad": [1, 2]}
        return [p + 1], 1, {}


KINDS = {
    "raise": "RuntimeError: disk full",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "shape": "shape",
    "count": "expected 1 arrays, got 2",
    "dtype": "non-numeric dtype",
    "object": "non-numeric dtype",
    "notarray": "numpy.ndarray",
    "num_examples": "num_examples",
    "metrics": "fit metrics",
}


def run_with(kinds, *, release=None, accept_failures=True, timeout=None, min_fit_results=1):
    def client_fn(cid: str):
        return Bad(kinds[int(cid)], release)

    strategy = FedAvg(
        min_fit_clients=len(kinds),
        min_available_clients=len(kinds),
        fraction_evaluate=0.0,
        accept_failures=accept_failures,
        initial_parameters=initial((4,)),
        evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
    )
    config = ServerConfig(num_rounds=1, round_timeout=timeout, min_fit_results=min_fit_results)
    return start_simulation(
        client_fn=client_fn,
        num_clients=len(kinds),
        config=config,
        strategy=strategy,
        seed=1,
        num_workers=2,
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_client_is_recorded_and_good_ones_aggregated(kind):
    hist = run_with(["good", kind, "good"])
    record = hist.rounds[-1]
    (failure,) = record["failures"]
    assert failure["client_id"] == "1"
    assert failure["round"] == 1
    assert failure["stage"] == "fit"
    assert KINDS[kind] in failure["reason"]
    assert record["fit"]["num_results"] == 2
    assert hist.losses_centralized[-1] == (1, 1.0)  # mean of the two good updates


def test_client_hanging_past_the_deadline_is_a_timeout_failure(release):
    hist = run_with(["good", "hang", "good"], release=release, timeout=0.5)
    record = hist.rounds[-1]
    (failure,) = record["failures"]
    assert failure["client_id"] == "1" and "timeout" in failure["reason"]
    assert hist.losses_centralized[-1] == (1, 1.0)


def test_accept_failures_false_keeps_previous_model():
    hist = run_with(["good", "raise", "good"], accept_failures=False)
    assert hist.losses_centralized[-1] == (1, 0.0)
    assert hist.rounds[-1]["fit"]["updated"] is False


def test_fewer_successes_than_minimum_keeps_model_and_says_why():
    hist = run_with(["good", "raise", "nan"], min_fit_results=2)
    fit = hist.rounds[-1]["fit"]
    assert fit["updated"] is False
    assert "fewer than the minimum 2" in fit["note"]
    assert hist.losses_centralized[-1] == (1, 0.0)


def test_every_client_failing_keeps_model():
    hist = run_with(["raise", "nan"])
    assert hist.rounds[-1]["fit"]["updated"] is False
    assert len(hist.rounds[-1]["failures"]) == 2


def test_evaluate_failures_are_recorded_per_client():
    class EvalBad(AddClient):
        def evaluate(self, parameters, config):
            if self.pid == 1:
                raise ValueError("no test data")
            return super().evaluate(parameters, config)

    strategy = FedAvg(min_fit_clients=3, min_available_clients=3, min_evaluate_clients=3)
    strategy.initial_parameters = ndarrays_to_parameters([np.zeros(4), np.zeros((2, 3))])
    hist = start_simulation(
        client_fn=lambda cid: EvalBad(int(cid)), num_clients=3, strategy=strategy, seed=0
    )
    dist = hist.rounds[-1]["distributed"]
    assert dist["num_results"] == 2
    (failure,) = dist["failures"]
    assert failure["stage"] == "evaluate" and "no test data" in failure["reason"]
