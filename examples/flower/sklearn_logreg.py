"""Flower's sklearn-logreg-mnist pattern (digits stand in for MNIST), legacy API.

A warm-started ``LogisticRegression`` whose ``coef_`` and ``intercept_`` are the model,
zero-initialised parameters, and a server-side ``evaluate_fn``::

    python examples/flower/sklearn_logreg.py --rounds 3
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from _data import load_partition, load_test
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

import fedhive as fl
from fedhive.common import Context, NDArrays

NUM_PARTITIONS = 3
N_CLASSES, N_FEATURES = 10, 64


def get_model_parameters(model: LogisticRegression) -> NDArrays:
    return [model.coef_, model.intercept_]


def set_model_params(model: LogisticRegression, params: NDArrays) -> LogisticRegression:
    model.coef_, model.intercept_ = params[0], params[1]
    return model


def set_initial_params(model: LogisticRegression) -> None:
    model.classes_ = np.arange(N_CLASSES)
    model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
    model.intercept_ = np.zeros((N_CLASSES,))


def new_model() -> LogisticRegression:
    model = LogisticRegression(max_iter=1, warm_start=True)
    set_initial_params(model)
    return model


class SklearnClient(fl.client.NumPyClient):
    def __init__(self, data) -> None:
        self.model = new_model()
        self.x_train, self.y_train, self.x_test, self.y_test = data

    def get_parameters(self, config):
        return get_model_parameters(self.model)

    def fit(self, parameters, config):
        set_model_params(self.model, parameters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(self.x_train, self.y_train)
        return get_model_parameters(self.model), len(self.x_train), {}

    def evaluate(self, parameters, config):
        set_model_params(self.model, parameters)
        proba = self.model.predict_proba(self.x_test)
        loss = log_loss(self.y_test, proba, labels=list(range(N_CLASSES)))
        return (
            float(loss),
            len(self.x_test),
            {"accuracy": self.model.score(self.x_test, self.y_test)},
        )


def client_fn(context: Context) -> fl.client.Client:
    partition_id = int(context.node_config["partition-id"])
    return SklearnClient(load_partition(partition_id, NUM_PARTITIONS)).to_client()


def get_evaluate_fn():
    x_test, y_test = load_test()
    model = new_model()

    def evaluate(server_round, parameters, config):
        set_model_params(model, parameters)
        loss = log_loss(y_test, model.predict_proba(x_test), labels=list(range(N_CLASSES)))
        return float(loss), {"accuracy": model.score(x_test, y_test)}

    return evaluate


def main(rounds: int = 3) -> fl.server.History:
    strategy = fl.server.strategy.FedAvg(
        min_available_clients=2,
        evaluate_fn=get_evaluate_fn(),
        on_fit_config_fn=lambda server_round: {"server_round": server_round},
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=NUM_PARTITIONS,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=0,
    )
    for rnd, acc in history.metrics_centralized["accuracy"]:
        print(f"round {rnd}: accuracy {acc:.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args().rounds)
