"""Flower's e2e strategies pattern: one module-level model that every client trains, run
under each of Flower's strategies (legacy API), each for a few rounds::

    python examples/flower/e2e_strategies.py

The clients share ``MODEL``, as Flower's e2e client does; the thread backend sees that and
runs them one at a time (``backend="process"`` gives each worker its own copy).
"""

from __future__ import annotations

import numpy as np
import torch
from _data import load_partition

import fedhive as fl
from fedhive.common import Context, ndarrays_to_parameters

NUM_CLIENTS = 7
torch.manual_seed(0)
MODEL = torch.nn.Linear(64, 10)


def get_weights():
    return [p.detach().numpy().copy() for p in MODEL.parameters()]


def set_weights(weights) -> None:
    with torch.no_grad():
        for p, w in zip(MODEL.parameters(), weights, strict=True):
            p.copy_(torch.as_tensor(w))


class SharedModelClient(fl.client.NumPyClient):
    def __init__(self, partition_id: int) -> None:
        x, y, self.x_test, self.y_test = load_partition(partition_id, NUM_CLIENTS)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def get_parameters(self, config):
        return get_weights()

    def fit(self, parameters, config):
        set_weights(parameters)
        opt = torch.optim.SGD(MODEL.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(MODEL(self.x), self.y).backward()
            opt.step()
        return get_weights(), len(self.x), {}

    def evaluate(self, parameters, config):
        set_weights(parameters)
        with torch.no_grad():
            out = MODEL(torch.from_numpy(self.x_test))
            loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(self.y_test))
        return float(loss), len(self.x_test), {}


def client_fn(context: Context) -> fl.client.Client:
    return SharedModelClient(int(context.node_config["partition-id"])).to_client()


def strategies() -> dict[str, fl.server.strategy.Strategy]:
    init = ndarrays_to_parameters(get_weights())
    common = {"min_fit_clients": NUM_CLIENTS, "min_available_clients": NUM_CLIENTS}
    return {
        "FedAvg": fl.server.strategy.FedAvg(**common),
        "FedAvgM": fl.server.strategy.FedAvgM(
            server_momentum=0.5, initial_parameters=init, **common
        ),
        "FedProx": fl.server.strategy.FedProx(proximal_mu=0.1, **common),
        "FedAdam": fl.server.strategy.FedAdam(initial_parameters=init, eta=0.05, **common),
        "FedYogi": fl.server.strategy.FedYogi(initial_parameters=init, eta=0.05, **common),
        "FedAdagrad": fl.server.strategy.FedAdagrad(initial_parameters=init, eta=0.05, **common),
        "FedMedian": fl.server.strategy.FedMedian(**common),
        "FedTrimmedAvg": fl.server.strategy.FedTrimmedAvg(**common),
        "Krum": fl.server.strategy.Krum(num_malicious_clients=1, **common),
        "MultiKrum": fl.server.strategy.MultiKrum(num_malicious_clients=1, **common),
        "Bulyan": fl.server.strategy.Bulyan(num_malicious_clients=1, **common),
        "QFedAvg": fl.server.strategy.QFedAvg(
            initial_parameters=init,
            evaluate_fn=lambda rnd, arrays, config: (1.0, {}),
            **common,
        ),
        "FaultTolerantFedAvg": fl.server.strategy.FaultTolerantFedAvg(),
    }


def main(rounds: int = 2) -> dict[str, list[float]]:
    out = {}
    for name, strategy in strategies().items():
        set_weights([np.zeros_like(w) for w in get_weights()])
        history = fl.simulation.start_simulation(
            client_fn=client_fn,
            num_clients=NUM_CLIENTS,
            config=fl.server.ServerConfig(num_rounds=rounds),
            strategy=strategy,
            seed=0,
        )
        out[name] = [loss for _, loss in history.losses_distributed]
        print(f"{name}: distributed loss by round {[round(v, 3) for v in out[name]]}")
    return out


if __name__ == "__main__":
    main()
