"""Flower compatibility, behaviour seen in Flower's example apps: q-FedAvg without a
"loss" metric, a bare ndarray from get_parameters, and clients sharing one module-level
model in the thread backend."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch

import fedhive as fl
from fedhive.common import GetParametersIns, ndarrays_to_parameters
from fedhive.server import ServerConfig
from fedhive.simulation.sharing import shared_models

# The e2e pattern: one model for the whole module, which every client trains.
torch.manual_seed(0)
SHARED_NET = torch.nn.Linear(4, 1)
X = torch.randn(32, 4)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def get_weights() -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in SHARED_NET.parameters()]


def set_weights(weights) -> None:
    with torch.no_grad():
        for p, w in zip(SHARED_NET.parameters(), weights, strict=True):
            p.copy_(torch.as_tensor(w))


class SharedModelClient(fl.client.NumPyClient):
    def get_parameters(self, config):
        return get_weights()

    def fit(self, parameters, config):
        set_weights(parameters)
        opt = torch.optim.SGD(SHARED_NET.parameters(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(SHARED_NET(X), Y)
            loss.backward()
            opt.step()
        return get_weights(), len(X), {}

    def evaluate(self, parameters, config):
        set_weights(parameters)
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(SHARED_NET(X), Y))
        return loss, len(X), {}


def shared_client_fn(context):
    return SharedModelClient().to_client()


def test_shared_module_level_model_is_detected():
    assert "SHARED_NET" in shared_models(shared_client_fn)


def test_captured_models_are_flagged_and_other_callables_are_not():
    clean = functools.partial(np.zeros, 3)  # a partial over something that is no model
    assert shared_models(clean) == []
    net = torch.nn.Linear(2, 2)

    def captured(context):
        return net

    assert "net" in shared_models(captured)
    assert shared_models(functools.partial(lambda m, c: m, torch.nn.Linear(1, 1)))


def test_thread_backend_runs_clients_sharing_a_model_one_at_a_time(caplog):
    strategy = fl.server.strategy.FedAvg(min_fit_clients=4, min_available_clients=4)
    with caplog.at_level(logging.WARNING, logger="fedhive"):
        history = fl.simulation.start_simulation(
            client_fn=shared_client_fn,
            num_clients=4,
            num_workers=4,
            config=ServerConfig(num_rounds=2),
            strategy=strategy,
            seed=0,
        )
    assert "share the model object(s) SHARED_NET" in caplog.text
    losses = [loss for _, loss in history.losses_distributed]
    assert len(losses) == 2 and losses[-1] < losses[0] and all(np.isfinite(losses))


class BareArrayClient(fl.client.NumPyClient):
    """Flower's e2e-bare client: the model is one bare ndarray."""

    def __init__(self) -> None:
        self.params = np.array([1.0, 2.0])

    def get_parameters(self, config):
        return self.params

    def fit(self, parameters, config):
        return np.asarray(parameters[0]) + 1.0, 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def test_a_bare_ndarray_from_get_parameters_is_iterated_as_flower_does():
    client = BareArrayClient().to_client()
    arrays = client.get_parameters(GetParametersIns({})).parameters.arrays
    assert [a.tolist() for a in arrays] == [1.0, 2.0]  # its rows (here 0-d arrays)
    matrix = BareArrayClient()
    matrix.params = np.arange(6.0).reshape(2, 3)
    rows = matrix.to_client().get_parameters(GetParametersIns({})).parameters.arrays
    assert [r.tolist() for r in rows] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_other_non_lists_are_still_refused():
    class Bad(BareArrayClient):
        def get_parameters(self, config):
            return {"w": np.zeros(1)}

    with pytest.raises(fl.ProtocolError, match="list of numpy arrays"):
        Bad().to_client().get_parameters(GetParametersIns({}))


def _loss_free_client_fn(context):
    class C(fl.client.NumPyClient):
        def fit(self, parameters, config):
            return [parameters[0] * 0.5], 1, {}  # no "loss" metric, as in Flower's examples

        def evaluate(self, parameters, config):
            return 1.0, 1, {}

    return C().to_client()


def test_qfedavg_runs_without_a_loss_metric_when_there_is_an_evaluate_fn():
    strategy = fl.server.strategy.QFedAvg(
        min_fit_clients=2,
        min_available_clients=2,
        initial_parameters=ndarrays_to_parameters([np.ones(2)]),
        evaluate_fn=lambda rnd, arrays, config: (float(np.square(arrays[0]).sum()), {}),
    )
    history = fl.simulation.start_simulation(
        client_fn=_loss_free_client_fn, num_clients=2, config=ServerConfig(2), strategy=strategy
    )
    central = [loss for _, loss in history.losses_centralized]
    assert central[0] == 2.0 and central[-1] < central[0]  # the model moved both rounds
