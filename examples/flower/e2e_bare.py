"""Flower's e2e-bare pattern: no framework, the model is one bare NumPy array.

``get_parameters`` returns the array itself (Flower iterates it, so fedhive does too)::

    python examples/flower/e2e_bare.py
"""

from __future__ import annotations

import numpy as np

import fedhive as fl
from fedhive.common import Context

OBJECTIVE = 5.0


class BareClient(fl.client.NumPyClient):
    def __init__(self) -> None:
        self.model_params = np.array([1.0])

    def get_parameters(self, config):
        return self.model_params

    def fit(self, parameters, config):
        self.model_params = np.asarray(parameters[0]).reshape(1)
        self.model_params = self.model_params + (OBJECTIVE - self.model_params) * 0.5
        return self.model_params, 1, {}

    def evaluate(self, parameters, config):
        value = float(np.asarray(parameters[0]).reshape(-1)[0])
        return (value - OBJECTIVE) ** 2, 1, {"accuracy": 1.0 / (1.0 + abs(value - OBJECTIVE))}


def client_fn(context: Context) -> fl.client.Client:
    return BareClient().to_client()


def main(rounds: int = 3) -> fl.server.History:
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=2,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=fl.server.strategy.FedAvg(),
        seed=0,
    )
    for rnd, loss in history.losses_distributed:
        print(f"round {rnd}: loss {loss:.4f}")
    return history


if __name__ == "__main__":
    main()
