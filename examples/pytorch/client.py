"""A PyTorch client for fedhive, written against Flower 1.x's NumPyClient API.

    python examples/pytorch/client.py --partition-id 0      # in one terminal
    python examples/pytorch/client.py --partition-id 1      # in another

``--server HOST:PORT`` (default 127.0.0.1:8080); ``--root-certificates CA.pem`` for TLS.
"""

from __future__ import annotations

import argparse

import torch
from task import Net, get_weights, load_partition, set_weights, test, train

import fedhive as fl


class TorchClient(fl.client.NumPyClient):
    """Trains ``Net`` on this site's digits; keeps a tenth of them to evaluate on."""

    def __init__(self, partition_id: int, num_partitions: int) -> None:
        x, y = load_partition(partition_id, num_partitions)
        cut = len(y) // 10
        self.x_val, self.y_val = x[:cut], y[:cut]
        self.x_train, self.y_train = x[cut:], y[cut:]
        self.model = Net()

    def get_parameters(self, config):
        return get_weights(self.model)

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        epochs = int(config.get("local_epochs", 1))
        loss = train(self.model, self.x_train, self.y_train, epochs, float(config.get("lr", 0.05)))
        return get_weights(self.model), len(self.y_train), {"loss": loss}

    def evaluate(self, parameters, config):
        set_weights(self.model, parameters)
        loss, accuracy = test(self.model, self.x_val, self.y_val)
        return loss, len(self.y_val), {"accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:8080", help="the server's HOST:PORT")
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=2)
    parser.add_argument("--root-certificates", help="CA certificate (PEM): connect with TLS")
    args = parser.parse_args()

    torch.manual_seed(args.partition_id)
    fl.client.start_numpy_client(
        server_address=args.server,
        client=TorchClient(args.partition_id, args.num_partitions),
        root_certificates=args.root_certificates,
    )


if __name__ == "__main__":
    main()
