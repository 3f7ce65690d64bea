"""Flower's quickstart-pytorch, legacy API, with only the import changed.

A torch CNN-free MLP, a ``NumPyClient`` that moves weights through the model's
``state_dict``, ``client_fn(context: Context)`` and FedAvg with a weighted accuracy::

    python examples/flower/quickstart_pytorch.py --rounds 3
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
from _data import load_partition
from torch import nn

import fedhive as fl
from fedhive.common import Context, Metrics

NUM_PARTITIONS = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def train(net, x, y, epochs: int) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()


def test(net, x, y) -> tuple[float, float]:
    with torch.no_grad():
        out = net(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, net, data) -> None:
        self.net = net
        self.x, self.y, self.x_test, self.y_test = (torch.from_numpy(a) for a in data)

    def get_parameters(self, config):
        return [val.cpu().numpy() for _, val in self.net.state_dict().items()]

    def set_parameters(self, parameters):
        params_dict = zip(self.net.state_dict().keys(), parameters, strict=True)
        state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
        self.net.load_state_dict(state_dict, strict=True)

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        train(self.net, self.x, self.y, epochs=int(config.get("local_epochs", 1)))
        return self.get_parameters(config={}), len(self.x), {}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        loss, accuracy = test(self.net, self.x_test, self.y_test)
        return loss, len(self.x_test), {"accuracy": accuracy}


def client_fn(context: Context) -> fl.client.Client:
    partition_id = int(context.node_config["partition-id"])
    return FlowerClient(Net(), load_partition(partition_id, NUM_PARTITIONS)).to_client()


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    accuracies = [num_examples * float(m["accuracy"]) for num_examples, m in metrics]
    examples = [num_examples for num_examples, _ in metrics]
    return {"accuracy": sum(accuracies) / sum(examples)}


def main(rounds: int = 3) -> fl.server.History:
    strategy = fl.server.strategy.FedAvg(
        evaluate_metrics_aggregation_fn=weighted_average,
        on_fit_config_fn=lambda server_round: {"local_epochs": 2},
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=NUM_PARTITIONS,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=0,
    )
    for rnd, acc in history.metrics_distributed["accuracy"]:
        print(f"round {rnd}: accuracy {acc:.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args().rounds)
