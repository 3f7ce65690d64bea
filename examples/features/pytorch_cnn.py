"""A convolutional network on the 8x8 digits, trained with FedAvg by simulated clients
whose labels are skewed (Dirichlet 0.5)::

    python examples/features/pytorch_cnn.py --num-clients 10 --rounds 10

The clients are ordinary Flower-style ``NumPyClient``s; the server evaluates each round's
model on the test split.
"""

from __future__ import annotations

import argparse

from _task import accuracies, client_fn_for, fedavg_args, partition
from torch import nn

import fedhive as fl


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = self.features(x.reshape(-1, 1, 8, 8))
        return self.head(x.flatten(1))


def make_model() -> nn.Module:
    import torch

    torch.manual_seed(0)
    return Net()


def main(argv: list[str] | None = None) -> fl.server.History:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    parts = partition(args.num_clients, alpha=0.5)
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=0.5, min_fit_clients=2, **fedavg_args(make_model, args.local_epochs)
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn_for(make_model, parts),
        num_clients=args.num_clients,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        seed=0,
    )
    for server_round, accuracy in enumerate(accuracies(history)):
        print(f"round {server_round}: test accuracy {accuracy:.3f}")
    return history


if __name__ == "__main__":
    main()
